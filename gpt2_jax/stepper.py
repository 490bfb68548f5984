"""The JAX trainer's step on fixed batches, for the tools that time it (scripts/bench.py) and profile it
(scripts/profile_step.py): the same step as training, without the loader, the logging or the checkpoints.
gpt2_torch.stepper is its PyTorch twin; both take the micro-batches of gpt2_common.bench.random_micro_batches.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import numpy as np

from gpt2_common.config import Config
from gpt2_common.trace import trace_events
from gpt2_jax import sharding
from gpt2_jax.memory import step_bytes
from gpt2_jax.step import build_trainer


class JaxStepper:
    name = "jax"

    def __init__(self, config: Config, micro_batches: list[tuple[np.ndarray, np.ndarray]]):
        self.config = config
        self.trainer = build_trainer(config, sharding.make_mesh(config.mesh))
        self.state = self.trainer.init(jax.random.PRNGKey(config.train.seed))
        self.batches = self.trainer.step_batches(micro_batches)
        self.device = jax.devices()[0]
        self.device_kind = self.device.device_kind

    def run(self, steps: int) -> None:
        """`steps` optimizer steps, waited for."""
        for _ in range(steps):
            for batch in self.batches:
                self.state, _ = self.trainer.train_step(self.state, batch)
        jax.block_until_ready(self.state)

    def peak_bytes(self) -> int:
        # JAX's peak_bytes_in_use is the process's and cannot be reset, so it would charge every JAX variant with
        # the largest one's peak; the compiled step's own buffers are per variant.
        return step_bytes(self.trainer).peak

    def profile(self, steps: int, trace_dir: Path) -> tuple[list[dict], float]:
        """Runs `steps` steps under jax.profiler; the trace's events and the steps' wall time."""
        with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
            start = time.perf_counter()
            self.run(steps)
            wall = time.perf_counter() - start
        return trace_events(next(trace_dir.rglob("perfetto_trace.json.gz"))), wall
