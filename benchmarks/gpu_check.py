"""One prepared GPU check: flex vs SDPA agreement, then training throughput and MFU at SmolLM2-135M size.

(a) Agreement. The same `stm.models.Transformer` with `attention="flex"` and `attention="sdpa"` (one model,
    the backend switched in its config, so the weights are the very same) over full causal attention and
    over streamed mechanisms (swa with windows shorter and longer than a segment, xl, rmt), in float32 and
    under bf16 autocast: max abs difference of logits, loss and every gradient, also relative to the
    largest value. Under bf16 the yardstick is bf16's own effect (sdpa bf16 vs sdpa fp32), given beside.
(b) Throughput. A SmolLM2-135M-shaped stm Transformer (30 layers, width 576, 9 heads of 64, SwiGLU 1536,
    vocabulary 49152, tied embeddings) trained with bf16 autocast and fused AdamW on batches of 16 x 2048
    tokens: none/xl/swa/rmt as 4 segments of 512, full as one segment of 2048, with stm's flex path (and its
    sdpa path), next to Hugging Face LlamaForCausalLM of the same shape (attn_implementation eager and sdpa).
    tokens/s (text tokens), seconds/step (median), peak CUDA memory, and
        MFU = (6 * N_non_embedding * tokens/s + attention FLOP/s) / 989e12
    with attention FLOP per text token = 12 * n_layers * d_model * (unmasked (query, key) pairs per step /
    text tokens per step): QK^T and AV, 2 FLOP per multiply-add, x3 for forward + backward, counting only the
    pairs the mask lets through. 989e12 is the dense bf16 peak of an H100/H200 SXM.

Everything is caught per case: an error, a time-out of the budget or an out-of-memory is recorded and the
run goes on. Results are written after every case to `<out>/gpu_check.json`, `<out>` being `--out`,
else `$OUT`, else benchmarks/results.

    python benchmarks/gpu_check.py                  # the full check on a GPU (~5 minutes on an H200)
    python benchmarks/gpu_check.py --compile        # also torch.compile'd models
    python benchmarks/gpu_check.py --smoke          # tiny sizes; runs on CPU too
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
import types
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import memory_meter  # noqa: E402

PEAK_FLOPS = 989e12  # dense bf16, H100/H200 SXM
MFU_FORMULA = ("MFU = (6 * params_non_embedding * tokens_per_s + attention_flops_per_token * tokens_per_s) / 989e12; "
               "attention_flops_per_token = 12 * n_layers * d_model * unmasked_query_key_pairs_per_step / "
               "text_tokens_per_step (QK^T and AV, forward + backward, only the pairs the mask lets through, "
               "memory-token queries included); tokens = text tokens (memory tokens not counted); "
               "params_non_embedding excludes the (tied) token embedding")

SMOL = dict(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, d_ff=1536)
SMOKE_MODEL = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=2, d_ff=128)
CHECK_MODEL = dict(vocab_size=512, d_model=256, n_layers=2, n_heads=4, d_ff=704)
SMOKE_CHECK_MODEL = dict(vocab_size=128, d_model=32, n_layers=2, n_heads=2, d_ff=64)


def import_stm():
    """stm's backbone needs only torch (no Hydra / OmegaConf), as on a bare GPU image."""
    from stm.loop.segments import run_segments
    from stm.memory import FullAttention, NoMemory, RecurrentMemoryTokens, SegmentRecurrence, SlidingWindow
    from stm.models import Transformer
    from stm.models.attention import build_attention_mask

    return types.SimpleNamespace(Transformer=Transformer, run_segments=run_segments, NoMemory=NoMemory,
                                 FullAttention=FullAttention, RecurrentMemoryTokens=RecurrentMemoryTokens,
                                 SegmentRecurrence=SegmentRecurrence, SlidingWindow=SlidingWindow,
                                 build_attention_mask=build_attention_mask)


def make_memory(stm, kind: str, arg: int | None):
    return {
        "none": lambda: stm.NoMemory(),
        "full": lambda: stm.FullAttention(),
        "rmt": lambda: stm.RecurrentMemoryTokens(num_memory_tokens=arg),
        "xl": lambda: stm.SegmentRecurrence(mem_len=arg),
        "swa": lambda: stm.SlidingWindow(window=arg),
    }[kind]()


def error_record(exc: BaseException) -> dict:
    return {"error": f"{type(exc).__name__}: {str(exc)[:2000]}", "out_of_memory": memory_meter.is_out_of_memory(exc),
            "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-4:])[-3000:]}


def free_cuda():
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Run:
    """The growing result, written after every case."""

    def __init__(self, args):
        self.args, self.t0 = args, time.perf_counter()
        self.data = {"benchmark": "gpu_check", "command": common.command_line(), "smoke": args.smoke,
                     "environment": common.environment(), "agreement": [], "throughput": [],
                     "mfu_formula": MFU_FORMULA, "peak_flops": PEAK_FLOPS}
        self.path = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def over_budget(self) -> bool:
        return bool(self.args.budget_s) and self.elapsed() > self.args.budget_s

    def save(self):
        self.data["wall_s"] = self.elapsed()
        self.path = common.save_result(self.args.name, self.data, self.args.out)


# ------------------------------------------------------------------------------------- (a) agreement

def agreement(run: Run, stm, device: str):
    import torch

    args = run.args
    cfg = SMOKE_CHECK_MODEL if args.smoke else CHECK_MODEL
    seg = 32 if args.smoke else 256
    n_seg, batch = 4, 2
    cases = [  # name, mechanism, its option, segment length
        ("full causal", "none", None, seg * n_seg),
        (f"swa window {seg // 4}", "swa", seg // 4, seg),  # sdpa: the banded path (window < segment / 2)
        (f"swa window {seg // 2}", "swa", seg // 2, seg),
        (f"swa window {seg + seg // 2}", "swa", seg + seg // 2, seg),
        (f"xl mem_len {seg}", "xl", seg, seg),
        ("rmt 8 tokens", "rmt", 8, seg),
    ]
    if args.agreement_cases:
        wanted = args.agreement_cases.split(",")
        cases = [c for c in cases if c[1] in wanted]
    grads = device.startswith("cuda")  # flex has no backward on CPU
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    for name, kind, opt, seg_len in cases:
        for dtype in ("fp32", "bf16"):
            if run.over_budget() or (args.agreement_budget_s and run.elapsed() > args.agreement_budget_s):
                run.data["agreement"].append({"case": name, "dtype": dtype, "skipped": "time budget"})
                continue
            common.progress(f"agreement: {name}, {dtype}")
            rec = {"case": name, "dtype": dtype, "model": cfg, "segment_len": seg_len, "batch": batch,
                   "tokens": seg * n_seg, "gradients": grads}
            try:
                rec.update(compare_backends(stm, cfg, kind, opt, seg_len, seg * n_seg, batch, dtype, device, grads))
            except Exception as exc:  # noqa: BLE001
                rec.update(error_record(exc))
            run.data["agreement"].append(rec)
            run.save()
            free_cuda()
    if not grads:
        run.data["agreement_note"] = "gradients not compared: flex_attention has no backward on CPU"


def compare_backends(stm, cfg, kind, opt, seg_len, n_tokens, batch, dtype, device, grads) -> dict:
    import torch

    torch.manual_seed(0)
    model = stm.Transformer(**cfg, attention="sdpa").to(device)
    memory = make_memory(stm, kind, opt)
    memory.bind(model)
    memory.to(device)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg["vocab_size"], (batch, n_tokens), generator=gen).to(device)
    labels = torch.randint(0, cfg["vocab_size"], (batch, n_tokens), generator=gen).to(device)
    params = dict(model.named_parameters()) | {f"memory.{k}": v for k, v in memory.named_parameters()}

    def forward(backend, low_precision):
        model.config.attention = backend
        for p in params.values():
            p.grad = None
        with torch.set_grad_enabled(grads), torch.autocast(device.split(":")[0], dtype=torch.bfloat16,
                                                           enabled=low_precision):
            out = stm.run_segments(model, memory, ids, labels=labels, segment_len=seg_len, return_logits=True)
            if grads:
                out.loss.backward()
        g = {k: p.grad.detach().float().clone() for k, p in params.items() if p.grad is not None}
        return out.logits.detach().float(), float(out.loss), g

    low = dtype == "bf16"
    ref_logits, ref_loss, ref_grads = forward("sdpa", low)
    start = time.perf_counter()
    flex_logits, flex_loss, flex_grads = forward("flex", low)
    rec = {"flex_first_call_s": time.perf_counter() - start, **diffs(ref_logits, ref_loss, ref_grads,
                                                                    flex_logits, flex_loss, flex_grads)}
    if low:  # yardstick: what bf16 itself moves, on the sdpa path
        fp_logits, fp_loss, fp_grads = forward("sdpa", False)
        rec["bf16_vs_fp32_sdpa"] = diffs(fp_logits, fp_loss, fp_grads, ref_logits, ref_loss, ref_grads)
    return rec


def diffs(a_logits, a_loss, a_grads, b_logits, b_loss, b_grads) -> dict:
    out = {"logits_max_abs_diff": float((a_logits - b_logits).abs().max()),
           "logits_max_abs": float(a_logits.abs().max()),
           "loss_abs_diff": abs(a_loss - b_loss)}
    out["logits_rel_diff"] = out["logits_max_abs_diff"] / max(out["logits_max_abs"], 1e-12)
    if a_grads:
        missing = sorted(set(a_grads) ^ set(b_grads))
        worst_name, worst, scale = None, 0.0, 0.0
        for k in set(a_grads) & set(b_grads):
            d = float((a_grads[k] - b_grads[k]).abs().max())
            scale = max(scale, float(a_grads[k].abs().max()))
            if d >= worst:
                worst_name, worst = k, d
        out.update(grad_max_abs_diff=worst, grad_worst_param=worst_name, grad_max_abs=scale,
                   grad_rel_diff=worst / max(scale, 1e-12), grads_missing_on_one_side=missing)
    return out


# ------------------------------------------------------------------------------------ (b) throughput

def attention_pairs_per_step(stm, kind: str, opt, seg: int, n_seg: int) -> int:
    """Unmasked (query, key) pairs one sample's forward computes, memory tokens included."""
    import torch

    if kind == "full":
        n = seg * n_seg
        return n * (n + 1) // 2
    total, history = 0, 0
    for _ in range(n_seg):
        n_prefix = n_suffix = opt if kind == "rmt" else 0
        n_past = min(history, opt - 1 if kind == "swa" else opt) if kind in ("xl", "swa") else 0
        L = n_prefix + seg + n_suffix
        mask = stm.build_attention_mask(n_past, L, batch_size=1, device="cpu",
                                        key_padding=torch.ones(1, n_past + L, dtype=torch.bool),
                                        window=opt if kind == "swa" else None, n_prefix=n_prefix)
        total += int(mask.sum()) if mask is not None else L * (L + 1) // 2
        history += seg
    return total


def throughput(run: Run, stm, device: str):
    import torch

    args = run.args
    cfg = SMOKE_MODEL if args.smoke else SMOL
    batch, seg, n_seg = (2, 32, 4) if args.smoke else (args.batch, 512, 4)
    mech_opt = {"none": None, "full": None, "xl": seg, "swa": seg, "rmt": 4 if args.smoke else 16}
    torch.set_float32_matmul_precision("high")
    on_gpu = device.startswith("cuda")
    backends = [b for b in args.attention.split(",") if b] if on_gpu else ["sdpa"]  # flex: no CPU backward
    configs = []  # most telling first, in case the budget runs out: stm's default path, the peer, the rest
    mechanisms = [m for m in args.mechanisms.split(",") if m]
    for compiled in ([False, True] if args.compile else [False]):
        for kind in mechanisms:
            configs.append(("stm", kind, backends[0], compiled))
        for impl in [h for h in args.hf.split(",") if h]:
            configs.append(("hf", "full", impl, compiled))
        for backend in backends[1:]:
            for kind in mechanisms:
                configs.append(("stm", kind, backend, compiled))
    run.data["throughput_config"] = {"model": cfg, "batch": batch, "segment_len": seg, "n_segments": n_seg,
                                     "tokens_per_step": batch * seg * n_seg, "autocast": "bfloat16",
                                     "optimizer": "AdamW(lr=3e-4, fused on CUDA)", "warmup": args.warmup,
                                     "steps": args.steps, "mechanism_options": mech_opt,
                                     "hf_num_key_value_heads": args.hf_kv_heads or cfg["n_heads"]}
    for family, kind, backend, compiled in configs:
        name = f"{family}-{kind}-{backend}" if family == "stm" else f"hf-llama-{backend}"
        name += "-compiled" if compiled else ""
        if run.over_budget():
            run.data["throughput"].append({"system": name, "skipped": "time budget"})
            continue
        common.progress(f"throughput: {name}")
        rec = {"system": name, "family": family, "mechanism": kind, "attention": backend, "compiled": compiled}
        try:
            rec.update(train_case(stm, cfg, family, kind, mech_opt[kind], backend, compiled, batch, seg, n_seg,
                                  device, args))
        except Exception as exc:  # noqa: BLE001
            rec.update(error_record(exc))
        run.data["throughput"].append(rec)
        run.save()
        free_cuda()


def train_case(stm, cfg, family, kind, opt, backend, compiled, batch, seg, n_seg, device, args) -> dict:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    on_gpu = device.startswith("cuda")
    n_tokens = seg * n_seg
    if family == "stm":
        model = stm.Transformer(**cfg, attention=backend, tie_embeddings=True).to(device)
        memory = make_memory(stm, kind, opt)
        memory.bind(model)
        memory.to(device)
        modules = [model, memory]
        n_embed = model.embed.weight.numel()
        pairs = attention_pairs_per_step(stm, kind, opt, seg, n_seg)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        hf_cfg = LlamaConfig(vocab_size=cfg["vocab_size"], hidden_size=cfg["d_model"],
                             intermediate_size=cfg["d_ff"], num_hidden_layers=cfg["n_layers"],
                             num_attention_heads=cfg["n_heads"],
                             num_key_value_heads=args.hf_kv_heads or cfg["n_heads"],
                             max_position_embeddings=n_tokens, tie_word_embeddings=True,
                             attn_implementation=backend)
        model = LlamaForCausalLM(hf_cfg).to(device)
        memory = None
        modules = [model]
        n_embed = model.get_input_embeddings().weight.numel()
        pairs = n_tokens * (n_tokens + 1) // 2
    forward_model = torch.compile(model) if compiled else model
    params = list({id(p): p for m in modules for p in m.parameters()}.values())
    n_params = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=3e-4, fused=on_gpu)
    gen = torch.Generator().manual_seed(1)
    stream = torch.randint(0, cfg["vocab_size"], (batch, n_tokens + 1), generator=gen).to(device)
    sync = torch.cuda.synchronize if on_gpu else None

    def loss_of(ids, labels):
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
            if family == "stm":
                seg_len = None if kind == "full" else seg
                return stm.run_segments(forward_model, memory, ids, labels=labels, segment_len=seg_len).loss
            logits = forward_model(input_ids=ids, use_cache=False).logits
            return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())

    micro = batch

    def step():
        for i in range(0, batch, micro):
            chunk = stream[i:i + micro]
            loss = loss_of(chunk[:, :-1], chunk[:, 1:]) * (chunk.shape[0] / batch)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    peak = memory_meter.PeakMemory(device)
    peak.start()
    first = time.perf_counter()
    while True:  # the first step: compiles, and finds a micro-batch that fits
        try:
            first_loss = step()
            break
        except Exception as exc:  # noqa: BLE001
            if not (on_gpu and memory_meter.is_out_of_memory(exc)) or micro == 1:
                raise
            optimizer.zero_grad(set_to_none=True)
            free_cuda()
            micro //= 2
            common.progress(f"  out of memory: micro-batch {micro} (gradient accumulation)")
    first_step_s = time.perf_counter() - first
    timing = common.time_steps(step, warmup=max(0, args.warmup - 1), repeats=args.steps, sync=sync)
    tokens_per_step = batch * n_tokens
    tps = tokens_per_step / timing["median_s"]
    layers, d = cfg["n_layers"], cfg["d_model"]
    attn_per_token = 12 * layers * d * pairs / n_tokens
    n_non_embed = n_params - n_embed
    flops_per_token = 6 * n_non_embed + attn_per_token
    return {
        "params": n_params, "params_non_embedding": n_non_embed, "micro_batch": micro,
        "first_step_s": first_step_s, "first_loss": first_loss, "seconds_per_step": timing["median_s"],
        "times_s": timing["times_s"], "tokens_per_step": tokens_per_step, "tokens_per_s": tps,
        "attention_pairs_per_sample": pairs, "attention_flops_per_token": attn_per_token,
        "model_flops_per_token": flops_per_token,
        "mfu": flops_per_token * tps / PEAK_FLOPS,
        "mfu_with_lm_head": (flops_per_token + 6 * cfg["vocab_size"] * d) * tps / PEAK_FLOPS,
        "memory": peak.record(),
        "peak_memory_gib": round(peak.peak_extra() / 2**30, 2),
    }


# ------------------------------------------------------------------------------------------------ main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or None,
                   help="folder for gpu_check.json (default $OUT, else benchmarks/results)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, CPU allowed: checks that all runs")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    p.add_argument("--skip-agreement", action="store_true")
    p.add_argument("--agreement-cases", default="", help="only these mechanisms' agreement cases (e.g. xl,rmt)")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--mechanisms", default="none,full,xl,swa,rmt")
    p.add_argument("--attention", default="flex,sdpa", help="stm backends to time on a GPU (default flex,sdpa)")
    p.add_argument("--hf", default="sdpa,eager", help="HF attention implementations (default sdpa,eager)")
    p.add_argument("--hf-kv-heads", type=int, default=None,
                   help="HF key/value heads (default: as many as query heads, stm's shape; SmolLM2 has 3)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--warmup", type=int, default=3, help="steps before timing, the first included")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--budget-s", type=float, default=320, help="skip what is left after this (0: no budget)")
    p.add_argument("--agreement-budget-s", type=float, default=120,
                   help="skip the agreement cases left after this many seconds (0: no limit)")
    p.add_argument("--device", default=None, help="default cuda if available, else cpu")
    p.add_argument("--name", default=None, help="result name (default gpu_check, or gpu_check_smoke)")
    args = p.parse_args(argv)
    if args.smoke:
        args.warmup, args.steps = min(args.warmup, 2), min(args.steps, 2)
    args.name = args.name or ("gpu_check_smoke" if args.smoke else "gpu_check")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not device.startswith("cuda") and not args.smoke:
        common.progress("no GPU: the full-size check needs one; running anyway (use --smoke for tiny sizes)")
    for key in ("recompile_limit", "cache_size_limit"):  # stm compiles flex once per shape: allow them all
        try:
            setattr(torch._dynamo.config, key, 64)
        except (AttributeError, TypeError):
            pass
    run = Run(args)
    stm = import_stm()
    run.data["device"] = device
    run.save()
    if not args.skip_agreement:
        agreement(run, stm, device)
    if not args.skip_throughput:
        throughput(run, stm, device)
    run.save()
    print_summary(run.data)
    common.progress(f"wrote {run.path} in {run.elapsed():.0f} s")
    return run.data


def print_summary(data: dict) -> None:
    print("\nagreement (flex vs sdpa): case, dtype, logits max|diff| (rel), grad max|diff| (rel)")
    for r in data["agreement"]:
        if "error" in r or "skipped" in r:
            print(f"  {r['case']:22s} {r['dtype']:5s} {r.get('skipped') or r['error'].splitlines()[0][:150]}")
            continue
        g = f"{r['grad_max_abs_diff']:.3g} ({r['grad_rel_diff']:.2g})" if "grad_max_abs_diff" in r else "-"
        y = r.get("bf16_vs_fp32_sdpa", {}).get("logits_max_abs_diff")
        extra = f"   bf16 itself moves logits by {y:.3g}" if y is not None else ""
        print(f"  {r['case']:22s} {r['dtype']:5s} {r['logits_max_abs_diff']:.3g} ({r['logits_rel_diff']:.2g}) "
              f"{g}{extra}")
    print("\nthroughput: system, tokens/s, s/step, MFU, peak GiB")
    for r in data["throughput"]:
        if "tokens_per_s" not in r:
            print(f"  {r['system']:28s} {r.get('skipped') or r.get('error', '').splitlines()[0][:150]}")
            continue
        print(f"  {r['system']:28s} {r['tokens_per_s']:12,.0f} {r['seconds_per_step']:8.3f} "
              f"{r['mfu'] * 100:6.2f}% {r['peak_memory_gib']:8.2f}")


if __name__ == "__main__":
    main()
