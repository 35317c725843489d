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

from pathlib import Path

import numpy as np


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
        if gguf_file is not None:
            kwargs["gguf_file"] = gguf_file
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(Path(name_or_path).expanduser())
                                                           if looks_local else name_or_path, **kwargs)
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

    def encode_with_byte_counts(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        return self.encode_batch_with_byte_counts([text])[0]

    def encode_batch_with_byte_counts(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """One call for the whole batch: a fast tokenizer encodes it in parallel."""
        if not getattr(self.tokenizer, "is_fast", False):
            raise TypeError(f"tokenizer '{self.name}' is not a fast tokenizer; byte counts need offsets")
        enc = self.tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return [self._with_byte_counts(text, ids, offsets)
                for text, ids, offsets in zip(texts, enc["input_ids"], enc["offset_mapping"])]

    @staticmethod
    def _with_byte_counts(text: str, token_ids, offset_mapping) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(token_ids, dtype=np.int64)
        char_ends = np.asarray([end for _, end in offset_mapping], dtype=np.int64)
        if text.isascii():
            byte_ends = char_ends
        else:
            char_bytes = np.fromiter((len(c.encode("utf-8")) for c in text), dtype=np.int64, count=len(text))
            byte_ends = np.concatenate([[0], np.cumsum(char_bytes)])[char_ends]
        # a token accounts for the bytes from the previous token's end to its own end (whitespace included)
        byte_ends = np.maximum.accumulate(byte_ends) if len(byte_ends) else byte_ends
        counts = np.diff(np.concatenate([[0], byte_ends]))
        if len(counts):
            counts[-1] += len(text.encode("utf-8")) - byte_ends[-1]
        return ids, counts

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r})"


Tokenizer = ByteTokenizer | HFTokenizer
