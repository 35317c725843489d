"""The systems long_context.py measures, each built in its own worker process: stm's memories decoding through
`SegmentDecoder` (`StmSystem`) and Hugging Face `generate` with the whole context in its cache (`HFSystem`), both
on the model of the composed eval config (`compose`); and the text they read (`text_tokens`).
"""

from __future__ import annotations

import copy
import inspect
import math
import statistics
import time
import warnings

import common
import memory_meter
from stream_inference import state_size

UNTRAINED_ALLOWED = ("rmt",)  # its memory tokens are freshly initialised: a cost measurement only
TEXT_FILE = "mansfieldpark.txt"  # one of the shipped Austen novels: about 200K of SmolLM2's tokens


def compose(overrides: list[str]):
    """The eval config composed with `overrides`, as `python eval.py <overrides>` composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from stm.app import resolvers  # noqa: F401  (the resolvers conf/ uses)
    from stm.app.config import config_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        return hydra_compose(config_name="eval", overrides=list(overrides))


def model_name(cfg) -> str:
    return str(cfg.model.get("name_or_path") or cfg.model["_target_"].rsplit(".", 1)[-1])


def text_tokens(tokenizer, n_tokens: int, file: str = TEXT_FILE) -> list[int]:
    """The first `n_tokens` tokens of a shipped Austen novel in `tokenizer`'s ids (a prefix of the text, grown
    until it holds enough)."""
    from stm.data.text import read_documents, sample_files

    path = next((f for f in sample_files("austen") if f.name == file), None)
    if path is None:
        names = [f.name for f in sample_files("austen")]
        raise FileNotFoundError(f"{file} is not one of the shipped Austen novels ({names})")
    text = read_documents([path], key="long_context text")[0][1]
    chars = 8 * n_tokens
    while True:
        ids = list(tokenizer.encode(text[:chars]))
        if len(ids) > n_tokens:  # the last token of a cut prefix may be cut too: keep one more than needed
            return ids[:n_tokens]
        if chars >= len(text):
            raise ValueError(f"{file} holds {len(ids)} tokens of {tokenizer!r}; the run needs {n_tokens + 1} "
                             f"(lower --target-start or --lengths)")
        chars *= 2


def _nll(logits, target: int) -> float:
    import torch

    return float(-torch.log_softmax(logits.float(), dim=-1)[target])


def _ppl(nll: list[float]) -> float:
    return math.exp(statistics.fmean(nll))


class _Base:
    """What both kinds of system share: the worker's threads, the model built from the composed config."""

    def __init__(self, overrides: list[str], vocab_size: int, threads: int):
        warnings.filterwarnings("ignore")
        import torch

        from stm.app.run import build, seed_everything

        common.set_threads(threads)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the GGUF de-quantisation's bar, once per worker
        self.torch = torch
        self.cfg = compose(overrides)
        seed_everything(self.cfg.get("seed"))  # as eval.py: rmt's fresh memory tokens are the seed's
        self.model = build(self.cfg.model, vocab_size=self.cfg.model.get("vocab_size") or vocab_size).eval()

    def run(self, context: list[int], target: list[int], new_tokens: int) -> dict:
        torch = self.torch
        ids = torch.tensor([context], dtype=torch.long)
        memory_meter.release_free_memory()
        peak = memory_meter.PeakMemory("cpu")
        peak.start()
        started = time.perf_counter()
        with torch.no_grad():
            out = self._generate(ids, new_tokens)
            out["memory"] = peak.record()
            out["peak_extra_bytes"] = out["memory"]["peak_extra_bytes"]
            nll = self._target_nll(target)
        steps = out.pop("step_s")
        out.update(tokens=len(context), point_s=time.perf_counter() - started, target_nll=nll,
                   target_nll_mean=statistics.fmean(nll), target_ppl=_ppl(nll),
                   decode_s_per_token=statistics.fmean(steps) if steps else None,
                   decode_s_median=statistics.median(steps) if steps else None, decode_steps=len(steps))
        self._forget()
        return out


class StmSystem(_Base):
    """stm: the composed config's memory over the model, decoding through `SegmentDecoder` (in a worker)."""

    def __init__(self, name: str, overrides: list[str], vocab_size: int, threads: int, segment_len: int,
                 warmup: list[int]):
        super().__init__(overrides, vocab_size, threads)
        from stm.app.untrained import untrained_parameters
        from stm.loop.decoder import SegmentDecoder
        from stm.loop.generation import sample_next
        from stm.memory import build_memory

        self.name, self.segment_len = name, segment_len
        self.SegmentDecoder, self.sample_next = SegmentDecoder, sample_next
        self.memory = build_memory(self.cfg.memory, self.model).eval()
        parts = self.torch.nn.ModuleDict({"model": self.model, "memory": self.memory})
        untrained = [n for n, _ in untrained_parameters(parts)]
        if untrained and name not in UNTRAINED_ALLOWED:
            raise ValueError(f"{name}: {len(untrained)} parameters are untrained ({untrained[:4]}...), so its "
                             f"perplexity would mean nothing; only {UNTRAINED_ALLOWED} may run untrained here")
        from omegaconf import OmegaConf

        self.info = {"memory": OmegaConf.to_container(self.cfg.memory), "untrained_parameters": untrained,
                     "params": sum(p.numel() for p in parts.parameters())}
        self.decoder = None
        self.run(warmup[:-4], warmup[-4:], 4)  # lazy initialisation, thread pools: not in the first length's figures

    def _generate(self, ids, new_tokens: int) -> dict:
        torch = self.torch
        start = time.perf_counter()
        decoder = self.SegmentDecoder(self.model, self.memory, ids, self.segment_len)
        prefill = time.perf_counter() - start
        decoder.select(torch.tensor([0, 0]))  # row 1: a copy of the read context for the teacher-forced target
        tokens = [int(self.sample_next(decoder.logits[:1])[0])]
        steps = []
        for _ in range(new_tokens - 1):
            t0 = time.perf_counter()
            decoder.append(torch.tensor([tokens[-1], 0]), rows=[0])
            tokens.append(int(self.sample_next(decoder.logits[:1])[0]))
            steps.append(time.perf_counter() - t0)
        row = decoder.rows[0]
        carried = state_size([row.state, row.past])
        self.decoder = decoder
        return {"prefill_s": prefill, "generated": tokens, "step_s": steps, "cache_bytes": carried["bytes"],
                "cache": carried}

    def _target_nll(self, target: list[int]) -> list[float]:
        decoder, torch = self.decoder, self.torch
        nll = [_nll(decoder.logits[1], target[0])]
        for i in range(1, len(target)):
            decoder.append(torch.tensor([0, target[i - 1]]), rows=[1])
            nll.append(_nll(decoder.logits[1], target[i]))
        return nll

    def _forget(self) -> None:
        self.decoder = None


class HFSystem(_Base):
    """Hugging Face `generate`, greedy, the whole context in its key/value cache, on the model inside stm's
    wrapper (in a worker)."""

    def __init__(self, overrides: list[str], vocab_size: int, threads: int, warmup: list[int]):
        super().__init__(overrides, vocab_size, threads)
        from transformers import LogitsProcessorList

        self.lm = self.model.causal_lm.eval()
        params = inspect.signature(self.lm.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.24
        self.generation_config = copy.deepcopy(self.lm.generation_config)
        self.generation_config.eos_token_id = None  # always `new_tokens` tokens, like the stm systems' loop
        self.generation_config.do_sample = False
        self.generation_config.return_dict_in_generate = True
        self.generation_config.output_logits = True  # the first step's logits score the target's first token
        if self.generation_config.pad_token_id is None:
            self.generation_config.pad_token_id = 0  # no padding in a batch of one; set only to keep generate quiet
        self.LogitsProcessorList = LogitsProcessorList
        self.info = {"attn_implementation": self.lm.config._attn_implementation, "model_class": type(self.lm).__name__,
                     "params": sum(p.numel() for p in self.lm.parameters())}
        self.cache = self.first_logits = self.n_context = None
        self.run(warmup[:-4], warmup[-4:], 4)

    def _generate(self, ids, new_tokens: int) -> dict:
        torch = self.torch
        clock: list[float] = []

        def note_time(input_ids, scores):  # called once per step, after its forward, before choosing the token
            clock.append(time.perf_counter())
            return scores

        self.generation_config.max_new_tokens = new_tokens
        start = time.perf_counter()
        out = self.lm.generate(ids, attention_mask=torch.ones_like(ids), generation_config=self.generation_config,
                               logits_processor=self.LogitsProcessorList([note_time]))
        generated = out.sequences[0, ids.shape[1]:].tolist()
        if len(generated) != new_tokens:
            raise RuntimeError(f"hf generate gave {len(generated)} tokens, asked for {new_tokens}")
        self.cache, self.first_logits, self.n_context = out.past_key_values, out.logits[0][0], ids.shape[1]
        cache_bytes = sum(t.numel() * t.element_size() for layer in self.cache.layers
                          for t in (layer.keys, layer.values))
        return {"prefill_s": clock[0] - start, "generated": generated,
                "step_s": [b - a for a, b in zip(clock, clock[1:])], "cache_bytes": cache_bytes}

    def _target_nll(self, target: list[int]) -> list[float]:
        torch = self.torch
        nll = [_nll(self.first_logits, target[0])]
        if len(target) > 1:
            self.cache.crop(self.n_context - self.cache.get_seq_length())  # back to the context alone
            out = self.lm(input_ids=torch.tensor([target[:-1]]), use_cache=True, **{self.cache_arg: self.cache})
            nll += [_nll(out.logits[0, i], target[i + 1]) for i in range(len(target) - 1)]
        return nll

    def _forget(self) -> None:
        self.cache = self.first_logits = None
