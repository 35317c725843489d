"""Working memory of full attention at long context: stm's `memory=full` against Hugging Face Llama.

One forward pass (batch 1, no gradients, float32) over 2K, 8K and 32K random tokens in the benchmark shape of
train_speed.py (6 layers, width 256, 4 heads, SwiGLU width 704, vocabulary 256), each system giving the logits of
every position:

- `stm-full`: stm's Transformer(attention='sdpa') read by `run_segments` under `FullAttention()` (the whole
  input in one segment), as an evaluation with `memory=full` reads it;
- `hf-llama`: transformers `LlamaForCausalLM` (sdpa) of the same shape, random weights,
  `model(input_ids, use_cache=False)`;
- `hf-llama-cache`: the same model called as `model(input_ids)`, which keeps its default key/value cache;
- `stm-hf-full`: that Llama inside stm's `HFCausalLM`, read by `run_segments` under `FullAttention()`.

Each (system, length) runs in a fresh worker process, one after the other (never two footprints at once), and
is measured in one forward pass:

- peak live tensor bytes (`memory_meter.LiveTensorBytes`): tensor storage alive at once during the pass, above the
  weights and the input. Exact and repeatable: it counts tensors, not what the allocator keeps;
- peak extra resident memory (`memory_meter.PeakMemory`): the worker's resident high-water above its size after the
  model was built and had read 64 tokens;
- seconds: the pass itself (it runs under the counting mode, whose cost per operation is small beside the
  attention at these lengths; on a shared CPU the time is the least reliable column).

The goal (issue 13): stm-full at 32K needs no more working memory than hf-llama.

    python benchmarks/full_attention_memory.py                            # every system at 2K, 8K, 32K
    python benchmarks/full_attention_memory.py --quick                    # tiny shape and lengths
    python benchmarks/full_attention_memory.py --systems stm-full --lengths 32768 --merge
                                   # adds to (or replaces in) the saved result; each entry keeps its own date
    python benchmarks/full_attention_memory.py --before OTHER.json        # copies OTHER's stm figures as
                                                                          # "before", e.g. a run on older code
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import memory_meter  # noqa: E402
from workers import Worker, WorkerError  # noqa: E402

SYSTEMS = {
    "stm-full": "stm Transformer(attention='sdpa') read by run_segments under FullAttention() (one segment)",
    "hf-llama": "transformers LlamaForCausalLM (sdpa), same shape, model(input_ids, use_cache=False)",
    "hf-llama-cache": "the same LlamaForCausalLM called as model(input_ids): its default key/value cache kept",
    "stm-hf-full": "that LlamaForCausalLM inside stm's HFCausalLM, read by run_segments under FullAttention()",
}
STM_SYSTEMS = ("stm-full", "stm-hf-full")
LENGTHS = (2048, 8192, 32768)
SHAPE = dict(vocab_size=256, d_model=256, n_layers=6, n_heads=4)
QUICK_SHAPE = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=2)
QUICK_LENGTHS = (256, 1024)
WARMUP_TOKENS = 64
GOAL = "stm-full's peak live tensor bytes at the longest length <= hf-llama's"


def d_ff_of(d_model: int) -> int:
    """stm's default SwiGLU width, which the Llama peers take as their intermediate size."""
    from stm.models.transformer import TransformerConfig

    return TransformerConfig(vocab_size=1, d_model=d_model).d_ff


def llama(shape: dict, max_length: int):
    """A random transformers Llama of the shape (tied embeddings, as stm's Transformer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=shape["vocab_size"], hidden_size=shape["d_model"],
                         intermediate_size=d_ff_of(shape["d_model"]), num_hidden_layers=shape["n_layers"],
                         num_attention_heads=shape["n_heads"], num_key_value_heads=shape["n_heads"],
                         max_position_embeddings=max_length, tie_word_embeddings=True, rms_norm_eps=1e-6,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def stm_source() -> dict:
    """Which stm the worker imported: its folder and that checkout's commit."""
    import stm

    root = Path(stm.__file__).resolve().parents[1]
    return {"path": str(root), **common.git_commit(root)}


class Reader:
    """One system reading `length` tokens in one forward pass (in its own worker process)."""

    def __init__(self, system: str, length: int, shape: dict, threads: int):
        warnings.filterwarnings("ignore")
        import torch

        common.set_threads(threads)
        self.torch = torch
        self.forward, params = self._build(system, shape, length)
        generator = torch.Generator().manual_seed(1234)
        self.ids = torch.randint(0, shape["vocab_size"], (1, length), generator=generator)
        with torch.no_grad(), memory_meter.LiveTensorBytes():  # the mode's first use imports torch._dynamo (seconds)
            self.forward(self.ids[:, :WARMUP_TOKENS])
        memory_meter.release_free_memory()
        self.peak = memory_meter.PeakMemory("cpu")
        self.peak.start()
        self.info = {"params": params, "stm": stm_source()}

    def _build(self, system: str, shape: dict, length: int):
        import torch

        from stm.loop.segments import run_segments
        from stm.memory import FullAttention

        if system == "stm-full":
            from stm.models import Transformer

            torch.manual_seed(0)
            model = Transformer(vocab_size=shape["vocab_size"], d_model=shape["d_model"], n_layers=shape["n_layers"],
                                n_heads=shape["n_heads"], attention="sdpa").eval()
        elif system in ("hf-llama", "hf-llama-cache"):
            model = llama(shape, length)

            def forward(ids):
                if system == "hf-llama-cache":
                    return model(input_ids=ids).logits  # the config's default: use_cache=True
                return model(input_ids=ids, use_cache=False).logits

            return forward, sum(p.numel() for p in model.parameters())
        elif system == "stm-hf-full":
            from stm.models.hf import HFCausalLM

            with tempfile.TemporaryDirectory() as folder:
                llama(shape, length).save_pretrained(folder)
                model = HFCausalLM(folder, attn_implementation="sdpa").eval()
        else:
            raise ValueError(f"unknown system {system!r}; choose from {list(SYSTEMS)}")
        memory = FullAttention()

        def forward(ids):
            return run_segments(model, memory, ids, segment_len=None, return_logits=True).logits

        return forward, sum(p.numel() for p in model.parameters())

    def measure(self) -> dict:
        torch = self.torch
        with torch.no_grad(), memory_meter.LiveTensorBytes() as live:
            start = time.perf_counter()
            logits = self.forward(self.ids)
            seconds = time.perf_counter() - start
            shape = list(logits.shape)
            del logits
        return {"tokens": self.ids.shape[1], "seconds": seconds, "logits_shape": shape, "live": live.record(),
                "rss": self.peak.record()}


def measure(system: str, length: int, shape: dict, threads: int, timeout_s: float) -> dict:
    entry = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "load_average_before": common.load_average()}
    worker = None
    try:
        worker = Worker(Reader, dict(system=system, length=length, shape=shape, threads=threads),
                        f"{system}-{length}")
        entry.update(worker.info)
        entry.update(worker.call("measure", timeout=timeout_s))
    except WorkerError as exc:
        entry["error"] = str(exc)
    finally:
        if worker is not None:
            worker.close()
    entry["load_average_after"] = common.load_average()
    return entry


def live_mib(entry: dict | None) -> float | None:
    return memory_meter.mib(entry["live"]["peak_live_bytes"]) if entry and "live" in entry else None


def comparisons(results: dict, lengths: list[int]) -> list[dict]:
    """Per length, each stm system's live peak and resident peak over each Hugging Face system's."""
    rows = []
    for n in lengths:
        for ours in STM_SYSTEMS:
            for peer in ("hf-llama", "hf-llama-cache"):
                a, b = results.get(ours, {}).get(str(n)), results.get(peer, {}).get(str(n))
                if not a or not b or "live" not in a or "live" not in b:
                    continue
                rows.append({"tokens": n, "ours": ours, "peer": peer,
                             "live_ratio": a["live"]["peak_live_bytes"] / b["live"]["peak_live_bytes"],
                             "rss_ratio": (a["rss"]["peak_extra_bytes"] / b["rss"]["peak_extra_bytes"]
                                           if b["rss"]["peak_extra_bytes"] else None)})
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of " + ", ".join(SYSTEMS))
    p.add_argument("--lengths", default=None, help="comma-separated token counts (default 2048,8192,32768)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timeout-s", type=float, default=1800, help="the longest one forward pass may take")
    p.add_argument("--quick", action="store_true", help="tiny shape and lengths: checks that everything runs")
    p.add_argument("--merge", action="store_true", help="keep the saved result's other entries")
    p.add_argument("--before", default=None, help="a result file whose stm figures to record as 'before'")
    p.add_argument("--name", default=None, help="result name (default full_attention_memory[_quick])")
    p.add_argument("--results-dir", default=None)
    args = p.parse_args(argv)
    args.name = args.name or ("full_attention_memory_quick" if args.quick else "full_attention_memory")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    t0 = time.perf_counter()
    shape = dict(QUICK_SHAPE if args.quick else SHAPE)
    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else \
        list(QUICK_LENGTHS if args.quick else LENGTHS)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        raise SystemExit(f"--systems: unknown {unknown}; choose from {list(SYSTEMS)}")
    path = Path(args.results_dir or common.RESULTS_DIR) / f"{args.name}.json"
    saved = json.loads(path.read_text()) if args.merge and path.is_file() else {}
    if saved and saved["config"]["shape"] != shape:
        raise SystemExit(f"--merge: {path} was measured in the shape {saved['config']['shape']}, not {shape}")

    results = saved.get("results", {})
    for n in lengths:
        for system in systems:
            common.progress(f"{system}: one forward over {n} tokens")
            entry = measure(system, n, shape, args.threads, args.timeout_s)
            results.setdefault(system, {})[str(n)] = entry
            common.progress(f"{system} {n}: " + (entry["error"].splitlines()[0] if "error" in entry else
                            f"{entry['seconds']:.1f} s, live {live_mib(entry)} MiB, resident "
                            f"{memory_meter.mib(entry['rss']['peak_extra_bytes'])} MiB"))
    all_lengths = sorted({int(n) for per_length in results.values() for n in per_length})
    order = [s for s in SYSTEMS if s in results]

    result = {
        "benchmark": "full_attention_memory",
        "command": common.command_line(),
        "environment": common.environment(),
        "config": {"shape": shape, "d_ff": d_ff_of(shape["d_model"]), "lengths": all_lengths, "batch": 1,
                   "dtype": "float32", "grad": False, "threads": args.threads, "warmup_tokens": WARMUP_TOKENS,
                   "systems": {s: SYSTEMS[s] for s in order},
                   "live": "peak bytes of tensor storage alive at once in the forward pass, above the weights and "
                           "the input (memory_meter.LiveTensorBytes)",
                   "rss": "peak resident set above the worker's size after build and a 64-token warm-up",
                   "seconds": "the forward pass, under the counting mode"},
        "results": {s: results[s] for s in order},
        "comparisons": comparisons(results, all_lengths),
        "goal": GOAL,
        "wall_s": time.perf_counter() - t0,
    }
    longest = str(all_lengths[-1]) if all_lengths else None
    ours, peer = (results.get(s, {}).get(longest) for s in ("stm-full", "hf-llama"))
    if ours and peer and "live" in ours and "live" in peer:
        result["meets_goal"] = ours["live"]["peak_live_bytes"] <= peer["live"]["peak_live_bytes"]
    if args.before:  # another run's stm figures (e.g. on the code before a change), for the table's before column
        other = json.loads(Path(args.before).read_text())
        result["before"] = {"command": other["command"], "environment": other["environment"],
                            "results": {s: v for s, v in other["results"].items() if s in STM_SYSTEMS}}
    elif saved.get("before"):
        result["before"] = saved["before"]
    path = common.save_result(args.name, result, args.results_dir)
    common.progress(f"wrote {path} in {result['wall_s']:.0f} s")
    return result


if __name__ == "__main__":
    main()
