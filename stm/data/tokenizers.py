"""Tokenizers: a built-in byte-level one (no download, the default) and any Hugging Face tokenizer.

Both expose the same small interface the data and task code use:

    vocab_size, pad_token_id, bos_token_id, eos_token_id
    encode(text) -> list[int]
    decode(ids) -> str
    encode_with_byte_counts(text) -> (ids, byte_counts)   # int64 arrays of equal length

`byte_counts[i]` is how many UTF-8 bytes of the text token i accounts for (they add up to the byte length
of the text), which makes bits per byte comparable across tokenizers.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from stm.models import gguf_cache


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus pad (256), bos (257) and eos (258)."""

    pad_token_id = 256
    bos_token_id = 257
    eos_token_id = 258
    vocab_size = 259
    name = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def encode_with_byte_counts(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
        return ids, np.ones_like(ids)

    def encode_batch_with_byte_counts(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        return [self.encode_with_byte_counts(t) for t in texts]

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A Hugging Face tokenizer by hub name or local path (a folder, or a GGUF file via `gguf_file`).

    Loading from the hub needs network or a filled hub cache; a local folder with `tokenizer.json` needs
    neither.
    """

    def __init__(self, name_or_path: str, gguf_file: str | None = None, **kwargs):
        from transformers import AutoTokenizer

        if name_or_path is None:
            raise ValueError("tokenizer.name_or_path is required for tokenizer=hf")
        looks_local = str(name_or_path).startswith((".", "/", "~")) or Path(name_or_path).exists()
        if looks_local and not Path(name_or_path).expanduser().exists():
            raise FileNotFoundError(f"tokenizer.name_or_path: {name_or_path} does not exist")
        source = str(Path(name_or_path).expanduser()) if looks_local else name_or_path
        if gguf_file is not None and looks_local and gguf_cache.enabled():
            source = str(gguf_cache.tokenizer_folder(source, gguf_file))  # converted once
        elif gguf_file is not None:
            kwargs["gguf_file"] = gguf_file
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        except (OSError, ValueError) as err:
            raise type(err)(
                f"tokenizer.name_or_path: could not load a tokenizer from '{name_or_path}' "
                f"(a hub name needs network or a filled cache; a local path needs tokenizer files): {err}"
            ) from err
        self.name = str(name_or_path)
        tok = self.tokenizer
        self.eos_token_id = tok.eos_token_id
        self.bos_token_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if self.eos_token_id is None:
            raise ValueError(f"tokenizer '{name_or_path}' defines no eos token; stm needs one to separate documents")

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    @property
    def has_chat_template(self) -> bool:
        """Whether the tokenizer has a chat template (`apply_chat_template` renders messages with it)."""
        return bool(getattr(self.tokenizer, "chat_template", None))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """[{"role", "content"}, ...] rendered by the tokenizer's chat template, as text."""
        if not self.has_chat_template:
            raise ValueError(f"tokenizer '{self.name}' has no chat template; set data.chat_template=false")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def encode_with_byte_counts(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        return self.encode_batch_with_byte_counts([text])[0]

    def encode_batch_with_byte_counts(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """One call for the whole batch: a fast tokenizer encodes it in parallel.

        Long texts (novels, meeting transcripts) are cut into pieces first, so that the cores share the work
        evenly; the cut falls before a space that starts a word after a non-space character, where a
        byte-level pre-tokenizer splits anyway, so the tokens are the same as for the whole text. Only
        tokenizers with a byte-level pre-tokenizer and no normaliser are cut (`_cuts_are_exact`)."""
        if not getattr(self.tokenizer, "is_fast", False):
            raise TypeError(f"tokenizer '{self.name}' is not a fast tokenizer; byte counts need offsets")
        pieces, owner = [], []
        for i, text in enumerate(texts):
            parts = split_for_parallel(text) if self._cuts_are_exact() else [text]
            pieces += parts
            owner += [i] * len(parts)
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None and backend.truncation is None and backend.padding is None:
            # the Rust tokenizer directly: the same tokens, without transformers' per-token Python lists
            encodings = backend.encode_batch(pieces, add_special_tokens=False)
            if self._cuts_are_exact():  # byte-level tokens: one character of a token's text is one byte
                lengths = self._byte_level_lengths()
                per_text = [[] for _ in texts]
                for i, e in zip(owner, encodings):
                    ids = np.asarray(e.ids, dtype=np.int64)
                    per_text[i].append((ids, lengths[ids]))
                return [(np.concatenate([a for a, _ in parts]), np.concatenate([b for _, b in parts]))
                        for parts in per_text]
            ids_and_offsets = [(e.ids, e.offsets) for e in encodings]
        else:
            enc = self.tokenizer(pieces, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
            ids_and_offsets = list(zip(enc["input_ids"], enc["offset_mapping"]))
        per_text: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in texts]
        for i, piece, (ids, offsets) in zip(owner, pieces, ids_and_offsets):
            per_text[i].append(self._with_byte_counts(piece, ids, offsets))
        return [(np.concatenate([a for a, _ in parts]), np.concatenate([b for _, b in parts])) for parts in per_text]

    def _byte_level_lengths(self) -> np.ndarray:
        """(vocab,) UTF-8 bytes each token stands for, for byte-level vocabularies (special tokens: 0)."""
        if getattr(self, "_lengths", None) is None:
            vocab = self.tokenizer.backend_tokenizer.get_vocab(with_added_tokens=False)
            lengths = np.zeros(max(self.vocab_size, max(vocab.values()) + 1), dtype=np.int64)
            for token, index in vocab.items():
                lengths[index] = len(token)
            self._lengths = lengths
        return self._lengths

    def _cuts_are_exact(self) -> bool:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        return backend is not None and backend.normalizer is None and "ByteLevel" in str(backend.pre_tokenizer)

    @staticmethod
    def _with_byte_counts(text: str, token_ids, offset_mapping) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(token_ids, dtype=np.int64)
        char_ends = np.asarray(offset_mapping, dtype=np.int64).reshape(-1, 2)[:, 1]
        if text.isascii():
            byte_ends = char_ends
        else:  # where each character starts in the UTF-8 bytes: at every byte that is not a continuation byte
            raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
            char_starts = np.flatnonzero((raw & 0xC0) != 0x80)
            byte_ends = np.append(char_starts, len(raw))[char_ends]
        # a token accounts for the bytes from the previous token's end to its own end (whitespace included)
        byte_ends = np.maximum.accumulate(byte_ends) if len(byte_ends) else byte_ends
        counts = np.diff(np.concatenate([[0], byte_ends]))
        if len(counts):
            counts[-1] += len(text.encode("utf-8")) - byte_ends[-1]
        return ids, counts

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r})"


Tokenizer = ByteTokenizer | HFTokenizer

_WORD_AFTER_NON_SPACE = re.compile(r"(?<=\S) (?=[A-Za-z])")


def split_for_parallel(text: str, piece_chars: int = 32_768) -> list[str]:
    """Cut a long text into pieces of about `piece_chars` characters, each cut right before a space that
    follows a non-space character and precedes a letter."""
    pieces, start = [], 0
    while len(text) - start > piece_chars:
        cut = _WORD_AFTER_NON_SPACE.search(text, start + piece_chars)
        if cut is None:
            break
        pieces.append(text[start:cut.start()])
        start = cut.start()
    pieces.append(text[start:])
    return pieces


def smollm2_tokenizer(**kwargs):
    """SmolLM2-135M-Instruct's tokenizer, read from the same GGUF file as the model."""
    from stm.models.hf import smollm2_gguf_path

    folder, file = smollm2_gguf_path()
    return HFTokenizer(name_or_path=folder, gguf_file=file, **kwargs)
