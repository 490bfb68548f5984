"""The PyTorch reference's step on fixed batches, for the tools that time it (scripts/bench.py) and profile it
(scripts/profile_step.py): gpt2_torch.step.train_step as training runs it, without the loader, the logging or the
checkpoints. gpt2_jax.stepper is its JAX twin; both take the micro-batches of gpt2_common.bench.random_micro_batches.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity

from gpt2_common.config import Config
from gpt2_common.trace import trace_events
from gpt2_torch.distributed import keep_freed_memory_for_reuse
from gpt2_torch.model import GPT
from gpt2_torch.optim import make_optimizer
from gpt2_torch.step import train_step


class TorchStepper:
    name = "torch"

    def __init__(self, config: Config, micro_batches: list[tuple[np.ndarray, np.ndarray]], compile: bool = False,
                 fused: bool | None = None):
        self.config = config
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            keep_freed_memory_for_reuse()  # as the trainer runs (for the whole process: every variant timed in it)
        torch.manual_seed(config.train.seed)
        self.model = GPT(config.model).to(self.device)
        self.optimizer = make_optimizer(self.model, config.train, fused=fused)
        self.step_model = torch.compile(self.model) if compile else self.model
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.train.precision == "fp16")
        self.batches = [tuple(torch.from_numpy(a).long().to(self.device) for a in b) for b in micro_batches]
        self.device_kind = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        self.update = 0
        self.peak = None

    def own_bytes(self) -> int:
        """What this stepper holds between steps: weights, gradients, optimizer state and batches."""
        tensors = [*self.model.parameters(), *(p.grad for p in self.model.parameters() if p.grad is not None),
                   *(v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)),
                   *(t for b in self.batches for t in b)]
        return sum(t.numel() * t.element_size() for t in tensors if t.device == self.device)

    def run(self, steps: int) -> None:
        """`steps` optimizer steps, waited for; on a GPU, the allocator's peak while they ran, less what other
        steppers of the same process hold (neither allocator counts per stepper)."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            others = torch.cuda.memory_allocated(self.device) - self.own_bytes()
        for _ in range(steps):
            train_step(self.step_model, self.optimizer, self.scaler, self.batches, self.update, self.config)
            self.update += 1
        if cuda:
            torch.cuda.synchronize(self.device)
            self.peak = max(self.peak or 0, torch.cuda.max_memory_allocated(self.device) - others)

    def peak_bytes(self) -> int | None:
        return self.peak

    def profile(self, steps: int, trace_dir: Path) -> tuple[list[dict], float]:
        """Runs `steps` steps under torch.profiler; the trace's events and the steps' wall time."""
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with torch.profiler.profile(activities=activities) as prof:
            start = time.perf_counter()
            self.run(steps)
            wall = time.perf_counter() - start
        path = trace_dir / "torch_trace.json"
        prof.export_chrome_trace(str(path))
        return trace_events(path), wall
