"""Training speed and peak memory: stm's mechanisms next to peers from PyPI, side by side in one run.

Every system has the same shape (6 layers, width 256, 4 heads of 64, SwiGLU/GEGLU width 704, byte vocabulary
of 256), reads batches of 4 samples of 2048 tokens, float32, and takes one AdamW step per batch:

    ours   stm.models.Transformer + memory none | full | rmt (16 tokens) | armt (rmt's 16 tokens plus an
           associative matrix in every layer, key_dim 32, nu 3) | xl (mem_len 512) | swa (window 512),
           through stm.loop.segments.run_segments, segments of 512 (full: one segment of 2048)
    peers  x-transformers TransformerWrapper(Decoder): full causal over 2048; local attention
           (attn_max_attend_past=511: each token sees itself and the 511 before it, as our window 512);
           Transformer-XL memories (max_mem_len=512, 4 segments of 512 passing mems / return_mems)
           local-attention (lucidrains) LocalTransformer over 2048: blocked sliding-window attention
           (window_size=511, look_backward=1, exact_windowsize=True: itself and the 511 before it, see
           _build_la_local)
           recurrent-memory-transformer-pytorch: RecurrentMemoryTransformer (16 memory tokens, seq_len 512)
           through its RecurrentMemoryTransformerWrapper over 4 segments
           Hugging Face LlamaForCausalLM (attn_implementation="sdpa") over 2048 tokens

Each system is built in its own worker process; the driver gives every system one untimed and one timed
training step per round, rotating the order, for the same number of warm-up and measured steps everywhere
(measured rounds shrink to fit `--budget-s`, the shape never does). Between its turns a worker gives its
free memory back to the kernel, so that only one training footprint is resident at a time.

Reported: tokens/s, seconds/step (median), parameter count, peak extra memory (resident-set high-water
above the worker's size after build), the time one step spends inside the matmul and fused-attention kernels
(one profiled step after the timed ones), and for each of our mechanisms the ratio of its tokens/s to the
fastest matching peer, with its ceiling: the ratio it would reach if everything outside those kernels were
free (when the ceiling is below the goal, no rewrite around the same kernels can reach the goal). armt has
no peer on PyPI: it is compared with our own rmt in the same run instead (OWN_BASELINES: the goal is rmt's
tokens/s over armt's at most 1.25, i.e. armt at least 1/1.25 = 80% of rmt's speed).

    python benchmarks/train_speed.py                 # the full run (about 10 minutes on 2 cores)
    python benchmarks/train_speed.py --quick         # a tiny shape, to check that everything runs
    python benchmarks/train_speed.py --precision fp32,bf16   # each system in both, side by side
                                                             # (train_speed_fp32_bf16.json)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

OURS = ("none", "full", "rmt", "armt", "xl", "swa")
PEERS = ("xt-full", "xt-local", "la-local", "xt-xl", "rmt-pytorch", "hf-llama")
# which peers each of our mechanisms is compared with (the fastest of them)
MATCHING_PEERS = {
    "none": ("xt-full", "hf-llama"),
    "full": ("xt-full", "hf-llama"),
    "swa": ("xt-local", "la-local"),
    "xl": ("xt-xl",),
    "rmt": ("rmt-pytorch",),
}
GOAL_RATIO = 1.3
# ours against ours, in the same run: mechanism -> (the mechanism of ours it extends, the largest slowdown
# allowed: the baseline's tokens/s / its tokens/s)
OWN_BASELINES = {
    "armt": ("rmt", 1.25),
}
# the compute kernels every system calls: dense matmuls, and (matched by name) SDPA's fused attention ops,
# forward and backward
KERNEL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")

FULL_SHAPE = dict(vocab_size=256, d_model=256, n_layers=6, n_heads=4, segment_len=512, n_segments=4, batch=4,
                  memory_tokens=16, mem_len=512, window=512, key_dim=32, nu=3)
QUICK_SHAPE = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=2, segment_len=64, n_segments=4, batch=2,
                   memory_tokens=4, mem_len=64, window=64, key_dim=32, nu=3)


def d_ff_of(d_model: int) -> int:
    """stm's default SwiGLU width (TransformerConfig): 8/3 * d_model rounded up to a multiple of 64."""
    return 64 * math.ceil(d_model * 8 / 3 / 64)


# ------------------------------------------------------------------------------ systems (in the worker)

class TrainSystem:
    """One system under test, built inside its worker process; `step()` is one optimizer step."""

    def __init__(self, system: str, shape: dict, threads: int, seed: int = 0, lr: float = 3e-4,
                 precision: str = "fp32"):
        warnings.filterwarnings("ignore")
        import torch

        common.set_threads(threads)
        torch.manual_seed(seed)
        self.torch, self.system, self.shape = torch, system, shape
        self.autocast_bf16 = precision == "bf16"  # weights and optimizer stay float32 (mixed precision)
        seq = shape["segment_len"] * shape["n_segments"]
        generator = torch.Generator().manual_seed(1234)  # the same batch for every system
        stream = torch.randint(0, shape["vocab_size"], (shape["batch"], seq + 1), generator=generator)
        self.stream, self.inputs, self.labels = stream, stream[:, :-1], stream[:, 1:]

        build = getattr(self, "_build_" + system.replace("-", "_"), None) or self._build_stm
        self.modules, self.run, self.description = build()
        params = {id(p): p for m in self.modules for p in m.parameters()}
        self.optimizer = torch.optim.AdamW(params.values(), lr=lr)
        for m in self.modules:
            m.train()
        self.info = {
            "params": sum(p.numel() for p in params.values()),
            "tokens_per_step": shape["batch"] * seq,
            "description": self.description,
            "threads": torch.get_num_threads(),
        }
        self.losses: list[float] = []
        self.peak = common.PeakMemory("cpu")
        self.peak.start()

    # each builder returns (modules whose parameters train, a function computing the loss, description)

    def _build_stm(self):
        from stm.loop.segments import run_segments
        from stm.memory import (
            AssociativeMemory,
            FullAttention,
            NoMemory,
            RecurrentMemoryTokens,
            SegmentRecurrence,
            SlidingWindow,
        )
        from stm.models import Transformer

        s = self.shape
        model = Transformer(vocab_size=s["vocab_size"], d_model=s["d_model"], n_layers=s["n_layers"],
                            n_heads=s["n_heads"], attention="sdpa")
        memory = {
            "none": lambda: NoMemory(),
            "full": lambda: FullAttention(),
            "rmt": lambda: RecurrentMemoryTokens(num_memory_tokens=s["memory_tokens"]),
            # rmt's memory tokens plus an associative matrix in every layer (layers=None: all)
            "armt": lambda: AssociativeMemory(num_memory_tokens=s["memory_tokens"], key_dim=s["key_dim"], nu=s["nu"],
                                              layers=None),
            "xl": lambda: SegmentRecurrence(mem_len=s["mem_len"]),
            "swa": lambda: SlidingWindow(window=s["window"]),
        }[self.system]()
        memory.bind(model)

        def loss():
            return run_segments(model, memory, self.inputs, labels=self.labels, segment_len=s["segment_len"],
                                bptt_depth=None).loss

        # one line (a memory with submodules, as armt, would print its module tree)
        what = f"{type(memory).__name__}({memory.extra_repr()})"
        return [model, memory], loss, f"stm Transformer(attention='sdpa') + {what}"

    def _xt_decoder_kwargs(self):
        s = self.shape
        return dict(dim=s["d_model"], depth=s["n_layers"], heads=s["n_heads"],
                    attn_dim_head=s["d_model"] // s["n_heads"], attn_flash=True, rotary_pos_emb=True,
                    use_rmsnorm=True, ff_glu=True, ff_swish=True, ff_mult=d_ff_of(s["d_model"]) / s["d_model"],
                    ff_no_bias=True)

    def _cross_entropy(self, logits, labels):
        F = self.torch.nn.functional
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())

    def _build_xt_full(self, **attn_kwargs):
        from x_transformers import Decoder, TransformerWrapper

        s = self.shape
        seq = s["segment_len"] * s["n_segments"]
        model = TransformerWrapper(num_tokens=s["vocab_size"], max_seq_len=seq, use_abs_pos_emb=False,
                                   tie_embedding=True, attn_layers=Decoder(**self._xt_decoder_kwargs(), **attn_kwargs))

        def loss():
            return self._cross_entropy(model(self.inputs), self.labels)

        what = f"local attention, attn_max_attend_past={attn_kwargs['attn_max_attend_past']}" if attn_kwargs \
            else "full causal attention"
        return [model], loss, f"x-transformers TransformerWrapper(Decoder) over {seq} tokens, {what}"

    def _build_xt_local(self):
        # a query sees keys at distance <= max_attend_past: itself and the window - 1 before it
        return self._build_xt_full(attn_max_attend_past=self.shape["window"] - 1)

    def _build_la_local(self):
        """local-attention's LocalTransformer: causal attention in blocks of `window_size` tokens, each block's
        queries against its own block and the `look_backward` blocks before it. With exact_windowsize=True (its
        LocalMHA's default) a key is kept when it is at most window_size * look_backward positions before the
        query, so a query sees itself and the window_size * look_backward tokens before it. Our window of W (each
        token sees itself and the W - 1 before it) is therefore window_size * look_backward = W - 1: here
        window_size=511, look_backward=1. That is exactly our window, for every token, the first ones included
        (a token near the start sees all the tokens before it, as ours). 511 does not divide 2048, so LocalMHA
        pads the sequence at the end to 2555 (its autopad, always on): the padding only adds positions after
        every real query (the causal mask hides them from it) and is cut off the output, but its queries are
        computed too (25% more attention rows). The power-of-two configuration window_size=512, look_backward=1
        pads nothing but lets a query see 512 tokens before it (a window of 513), and without exact_windowsize
        a query sees between 513 and 1024 keys (the whole previous block). The other exact factoring of 511
        (window_size=73, look_backward=7) pads less but copies every key and value 8 times.

        Shapes that differ where the package does not let us choose: a learned absolute position embedding
        (max_seq_len x width, on top of the rotary embedding inside the attention), LayerNorm instead of RMSNorm,
        GEGLU instead of SwiGLU (same width), an untied output layer. One residual stream
        (num_residual_streams=1: no hyper-connections), as everyone else."""
        from local_attention import LocalTransformer

        s = self.shape
        seq = s["segment_len"] * s["n_segments"]
        window, look_backward = s["window"] - 1, 1
        d_ff = d_ff_of(s["d_model"])
        model = LocalTransformer(
            num_tokens=s["vocab_size"], max_seq_len=seq, dim=s["d_model"], depth=s["n_layers"], causal=True,
            local_attn_window_size=window, look_backward=look_backward, exact_windowsize=True,
            dim_head=s["d_model"] // s["n_heads"], heads=s["n_heads"],
            ff_mult=d_ff * 3 / (2 * s["d_model"]),  # its GEGLU width is int(dim * mult * 2 / 3)
            num_residual_streams=1,
        )

        def loss():
            return self._cross_entropy(model(self.inputs), self.labels)

        return [model], loss, (f"local-attention LocalTransformer over {seq} tokens, local_attn_window_size={window}, "
                               f"look_backward={look_backward}, exact_windowsize=True: itself and the "
                               f"{window * look_backward} before it")

    def _build_xt_xl(self):
        from x_transformers import Decoder, TransformerWrapper

        s = self.shape
        model = TransformerWrapper(num_tokens=s["vocab_size"], max_seq_len=s["segment_len"],
                                   max_mem_len=s["mem_len"], use_abs_pos_emb=False, tie_embedding=True,
                                   attn_layers=Decoder(**self._xt_decoder_kwargs()))
        L = s["segment_len"]

        def loss():
            mems, total = None, 0.0
            for k in range(s["n_segments"]):
                logits, mems = model(self.inputs[:, k * L:(k + 1) * L], mems=mems, return_mems=True)
                total = total + self._cross_entropy(logits, self.labels[:, k * L:(k + 1) * L])
            return total / s["n_segments"]

        return [model], loss, (f"x-transformers TransformerWrapper(max_mem_len={s['mem_len']}) over "
                               f"{s['n_segments']} segments of {L}, passing mems/return_mems (detached)")

    def _build_rmt_pytorch(self):
        from recurrent_memory_transformer_pytorch import RecurrentMemoryTransformer, RecurrentMemoryTransformerWrapper

        s = self.shape
        d_ff = d_ff_of(s["d_model"])
        transformer = RecurrentMemoryTransformer(
            s["d_model"], num_tokens=s["vocab_size"], depth=s["n_layers"], heads=s["n_heads"],
            dim_head=s["d_model"] // s["n_heads"], num_memory_tokens=s["memory_tokens"], seq_len=s["segment_len"],
            causal=True, ff_mult=d_ff * 3 / (2 * s["d_model"]),  # its GEGLU width is int(dim * mult * 2 / 3)
            use_flash_attn=True, abs_pos_emb=False, rotary_pos_emb=True,
            use_xl_memories=False,  # plain RMT: the wrapper never feeds XL memories back anyway
            num_residual_streams=1,  # no hyper-connections: one residual stream, as everyone else
        )
        wrapper = RecurrentMemoryTransformerWrapper(transformer)

        def loss():
            out, _ = wrapper(self.stream, return_loss=True)  # it splits off the labels itself
            return out

        return [wrapper], loss, (f"recurrent-memory-transformer-pytorch RecurrentMemoryTransformerWrapper, "
                                 f"{s['memory_tokens']} memory tokens, seq_len {s['segment_len']}, "
                                 f"{s['n_segments']} segments, full BPTT")

    def _build_hf_llama(self):
        from transformers import LlamaConfig, LlamaForCausalLM

        s = self.shape
        seq = s["segment_len"] * s["n_segments"]
        config = LlamaConfig(vocab_size=s["vocab_size"], hidden_size=s["d_model"],
                             intermediate_size=d_ff_of(s["d_model"]), num_hidden_layers=s["n_layers"],
                             num_attention_heads=s["n_heads"], num_key_value_heads=s["n_heads"],
                             max_position_embeddings=seq, tie_word_embeddings=True, attn_implementation="sdpa")
        model = LlamaForCausalLM(config)

        def loss():
            return self._cross_entropy(model(input_ids=self.inputs, use_cache=False).logits, self.labels)

        return [model], loss, f"transformers LlamaForCausalLM (sdpa) over {seq} tokens, full causal"

    def step(self) -> dict:
        start = time.perf_counter()
        with self.torch.autocast("cpu", dtype=self.torch.bfloat16, enabled=self.autocast_bf16):
            loss = self.run()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        self.losses.append(float(loss.detach()))
        return {"seconds": seconds, "loss": self.losses[-1]}

    def profile(self) -> dict:
        """One more training step under the profiler: the time spent inside the matmul and fused-attention
        kernels (self time, wall clock of the calling thread), which no rewrite around them can remove."""
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            self.step()
        kernels, total = {}, 0.0
        for event in prof.key_averages():
            total += event.self_cpu_time_total / 1e6
            if event.key in KERNEL_OPS or "scaled_dot_product" in event.key:
                kernels[event.key] = kernels.get(event.key, 0.0) + event.self_cpu_time_total / 1e6
        return {"kernel_s": sum(kernels.values()), "profiled_step_s": total, "kernels_s": kernels}

    def memory(self) -> dict:
        return self.peak.record()

    def trim(self) -> int:
        common.release_free_memory()
        return common.rss_bytes()


# -------------------------------------------------------------------------------------------- driver

def system_key(system: str, precision: str) -> str:
    """How a system is named in the results: `xl` in float32, `xl@bf16` under bf16 autocast."""
    return system if precision == "fp32" else f"{system}@{precision}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--systems", default=",".join(OURS + PEERS),
                   help="comma-separated subset of: " + ", ".join(OURS + PEERS))
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per system (default 2)")
    p.add_argument("--max-repeats", type=int, default=5, help="measured steps per system, at most (default 5)")
    p.add_argument("--min-repeats", type=int, default=3, help="measured steps per system, at least (default 3)")
    p.add_argument("--budget-s", type=float, default=570,
                   help="wall-clock budget; measured steps shrink (never below --min-repeats) to fit it")
    p.add_argument("--threads", type=int, default=2, help="torch threads per worker (default 2)")
    p.add_argument("--precision", default="fp32",
                   help="fp32 (the goal's setting), bf16 (torch.autocast('cpu', bfloat16), weights and AdamW in "
                        "float32, as trainer.precision=bf16-mixed), or both: fp32,bf16 (side by side)")
    p.add_argument("--quick", action="store_true", help="tiny shape and 1+2 steps: checks that all runs")
    p.add_argument("--name", default=None, help="result name (default train_speed, or train_speed_quick)")
    p.add_argument("--results-dir", default=None, help="where the JSON goes (default benchmarks/results)")
    args = p.parse_args(argv)
    if args.quick:
        args.warmup, args.min_repeats, args.max_repeats = 1, 2, 2
    args.precisions = [x.strip() for x in args.precision.split(",") if x.strip()]
    if not args.precisions or set(args.precisions) - {"fp32", "bf16"}:
        p.error(f"--precision: fp32, bf16 or fp32,bf16, got {args.precision!r}")
    suffix = "" if args.precisions == ["fp32"] else "_" + "_".join(args.precisions)
    args.name = args.name or ("train_speed_quick" if args.quick else "train_speed") + suffix
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    t0 = time.perf_counter()
    shape = dict(QUICK_SHAPE if args.quick else FULL_SHAPE)
    shape["d_ff"] = d_ff_of(shape["d_model"])
    names = [n.strip() for n in args.systems.split(",") if n.strip()]
    unknown = [n for n in names if n not in OURS + PEERS]
    if unknown:
        raise SystemExit(f"unknown systems {unknown}; choose from {OURS + PEERS}")
    load_before = common.load_average()

    workers, systems = {}, {}
    for precision in args.precisions:
        for system in names:
            name = system_key(system, precision)
            common.progress(f"building {name}")
            try:
                workers[name] = common.Worker(TrainSystem, dict(system=system, shape=shape, threads=args.threads,
                                                                precision=precision), name)
                systems[name] = {**workers[name].info, "times_s": [], "losses": []}
            except common.WorkerError as exc:
                systems[name] = {"error": str(exc)}
                common.progress(f"{name} failed to build: {str(exc).splitlines()[0]}")
            systems[name].update(system=system, precision=precision)

    def one_step(name):
        try:
            out = workers[name].call("step")
        except common.WorkerError as exc:
            systems[name]["error"] = str(exc)
            common.progress(f"{name} failed: {str(exc).splitlines()[0]}")
            workers.pop(name).kill()
            return None
        systems[name]["losses"].append(out["loss"])
        return out["seconds"]

    def trim(name):
        if name in workers:
            try:
                workers[name].call("trim")
            except common.WorkerError:
                pass

    # Warm-up: every system's first steps, one system after the other; each then gives its free memory
    # back, so that the idle workers hold only weights and optimizer state (ten resident training
    # footprints at once would not fit a small machine that others share).
    last_warmup = {}
    for name in list(workers):
        for w in range(args.warmup):
            seconds = one_step(name)
            if seconds is None:
                break
            last_warmup[name] = seconds
            common.progress(f"warm-up {w + 1}/{args.warmup} {name}: {seconds:.2f} s")
        trim(name)

    # A round gives every system one untimed step (its memory comes back from the kernel: page faults that
    # a steady training loop never pays) and then one timed step; the order rotates from round to round.
    round_s = 2 * sum(last_warmup.values()) or 1.0
    left = args.budget_s - (time.perf_counter() - t0) - 15
    repeats = max(args.min_repeats, min(args.max_repeats, int(left // round_s)))
    common.progress(f"{repeats} measured rounds of ~{round_s:.0f} s ({left:.0f} s of the budget left)")

    order = list(workers)
    for r in range(repeats):
        shift = r % max(1, len(order))
        for name in order[shift:] + order[:shift]:
            if name not in workers or one_step(name) is None:
                continue
            seconds = one_step(name)
            if seconds is not None:
                systems[name]["times_s"].append(seconds)
                common.progress(f"round {r + 1}/{repeats} {name}: {seconds:.2f} s")
            trim(name)

    for name, worker in workers.items():
        try:
            systems[name]["memory"] = worker.call("memory")
        except common.WorkerError as exc:
            systems[name]["memory"] = {"error": str(exc)}
        try:  # after the memory record: the profiled step may hold more
            systems[name].update(worker.call("profile"))
            common.progress(f"profiled {name}: {systems[name]['kernel_s']:.2f} s in matmul/attention kernels")
        except common.WorkerError as exc:
            systems[name]["profile_error"] = str(exc)
        worker.close()

    for rec in systems.values():
        rec["family"] = "stm" if rec["system"] in OURS else "peer"
        if rec.get("times_s"):
            rec["seconds_per_step"] = common.median(rec["times_s"])
            rec["tokens_per_s"] = rec["tokens_per_step"] / rec["seconds_per_step"]
            rec["loss_finite"] = all(math.isfinite(x) for x in rec["losses"])
        mem = rec.get("memory") or {}
        rec["peak_extra_mib"] = common.mib(mem.get("peak_extra_bytes"))

    comparisons = []
    for precision, base in ((p, o) for p in args.precisions for o in OURS if o in MATCHING_PEERS):
        ours = system_key(base, precision)
        if ours not in systems:
            continue
        peers = [system_key(p, precision) for p in MATCHING_PEERS[base]]
        candidates = [p for p in peers if systems.get(p, {}).get("tokens_per_s")]
        row = {"ours": ours, "peers": peers, "goal": GOAL_RATIO, "precision": precision}
        if candidates and systems[ours].get("tokens_per_s"):
            fastest = max(candidates, key=lambda p: systems[p]["tokens_per_s"])
            ratio = systems[ours]["tokens_per_s"] / systems[fastest]["tokens_per_s"]
            mem_ours, mem_peer = systems[ours]["peak_extra_mib"], systems[fastest]["peak_extra_mib"]
            row.update(fastest_peer=fastest, speed_ratio=ratio, meets_goal=ratio >= GOAL_RATIO,
                       memory_ratio=(mem_ours / mem_peer) if mem_ours and mem_peer else None)
            if systems[ours].get("kernel_s"):
                # the ratio ours would reach if everything outside its matmul/attention kernels took no time
                row["ceiling_ratio"] = systems[fastest]["seconds_per_step"] / systems[ours]["kernel_s"]
        comparisons.append(row)

    # ours against the mechanism of ours it extends, same precision, same run: what the extension costs
    own_comparisons = []
    for precision, (ours_base, (baseline_base, max_slowdown)) in (
            (p, item) for p in args.precisions for item in OWN_BASELINES.items()):
        ours, baseline = system_key(ours_base, precision), system_key(baseline_base, precision)
        if ours not in systems:
            continue
        row = {"ours": ours, "baseline": baseline, "precision": precision, "max_slowdown": max_slowdown}
        if baseline not in systems:
            row["note"] = f"{baseline} was not in this run (--systems)"
        tps_ours, tps_base = systems[ours].get("tokens_per_s"), systems.get(baseline, {}).get("tokens_per_s")
        if tps_ours and tps_base:
            slowdown = tps_base / tps_ours
            mem_ours, mem_base = systems[ours]["peak_extra_mib"], systems[baseline]["peak_extra_mib"]
            row.update(baseline_tokens_per_s=tps_base, tokens_per_s=tps_ours, slowdown=slowdown,
                       meets_goal=slowdown <= max_slowdown,
                       memory_ratio=(mem_ours / mem_base) if mem_ours and mem_base else None,
                       params_ratio=systems[ours]["params"] / systems[baseline]["params"])
        own_comparisons.append(row)

    # the same system in bf16 against fp32, when both ran (side by side in this run)
    def step_s(key):
        return systems.get(key, {}).get("seconds_per_step")

    bf16_speedups = {system: step_s(system) / step_s(system_key(system, "bf16")) for system in names
                     if step_s(system) and step_s(system_key(system, "bf16"))}

    result = {
        "benchmark": "train_speed",
        "command": common.command_line(),
        "environment": common.environment(),
        "load_average_before": load_before,
        "load_average_after": common.load_average(),
        "config": {**shape, "dtype": " and ".join({"fp32": "float32", "bf16": "bf16 autocast (mixed)"}[p]
                                                    for p in args.precisions),
                   "optimizer": "AdamW(lr=3e-4)", "threads": args.threads,
                   "tokens_per_sample": shape["segment_len"] * shape["n_segments"], "warmup": args.warmup,
                   "repeats": repeats, "timing": "median of measured steps; one worker process per system; "
                   "interleaved rounds with rotating order, each system's timed step preceded by an untimed one "
                   "(the worker gives its free memory back between turns)",
                   "memory": "peak extra resident memory of the worker over all its steps (high-water minus "
                   "resident size after build; includes activations, gradients and AdamW state)",
                   "kernels": "one more step per system under torch.profiler after the timed rounds: self time of "
                   + ", ".join(KERNEL_OPS) + " and SDPA's fused attention ops (forward and backward); "
                   "ceiling_ratio = the fastest peer's s/step / our kernel s/step",
                   "own_comparisons": "ours against the mechanism of ours it extends (" + ", ".join(
                       f"{a} vs {b}: goal slowdown <= {g}" for a, (b, g) in OWN_BASELINES.items())
                   + "); slowdown = the baseline's tokens/s / ours"},
        "systems": systems,
        "comparisons": comparisons,
        "own_comparisons": own_comparisons,
        "bf16_speedups": bf16_speedups,
        "wall_s": time.perf_counter() - t0,
    }
    path = common.save_result(args.name, result, args.results_dir)
    common.progress(f"wrote {path} in {result['wall_s']:.0f} s")
    for row in comparisons:
        if "speed_ratio" in row:
            ceiling = f", ceiling x{row['ceiling_ratio']:.2f}" if "ceiling_ratio" in row else ""
            print(f"{row['ours']:5s} vs {row['fastest_peer']:12s} speed x{row['speed_ratio']:.2f}{ceiling}")
    for row in own_comparisons:
        if "slowdown" in row:
            print(f"{row['ours']:5s} vs {row['baseline']:12s} {row['baseline']} tokens/s / {row['ours']} tokens/s "
                  f"x{row['slowdown']:.2f} (goal <= {row['max_slowdown']}: "
                  f"{'met' if row['meets_goal'] else 'not met'})")
    return result


if __name__ == "__main__":
    main()
