"""The systems under test of `train_speed.py`, one per worker process: `TrainSystem` builds stm's transformer
with one of our memories (or a peer, through `PeerModels` of `train_speed_peers.py`), and times one AdamW
step, profiles one, and reports its peak memory when the driver asks."""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import memory_meter  # noqa: E402
from train_speed_peers import PeerModels  # noqa: E402

# the compute kernels every system calls: dense matmuls, and (matched by name) SDPA's fused attention ops,
# forward and backward
KERNEL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


class TrainSystem(PeerModels):
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
        self.peak = memory_meter.PeakMemory("cpu")
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
        memory_meter.release_free_memory()
        return memory_meter.rss_bytes()
