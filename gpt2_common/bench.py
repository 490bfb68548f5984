"""What timing a training step needs in either framework: the same random batches for every variant, and windows
of steps that take turns, so that a machine that slows down mid-run slows every variant alike. A stepper is
gpt2_jax.stepper.JaxStepper or gpt2_torch.stepper.TorchStepper (anything with `run(steps)` that waits for its
steps); scripts/bench.py and scripts/profile_step.py drive them.
"""

from __future__ import annotations

import time

import numpy as np

from gpt2_common.config import Config


def random_micro_batches(config: Config, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """An optimizer step's micro-batches of random token ids: the step's speed does not depend on which tokens."""
    m, t = config.model, config.train
    shape = (t.micro_batch_size, m.block_size)
    return [(rng.integers(0, m.vocab_size, shape, dtype=np.int32), rng.integers(0, m.vocab_size, shape,
                                                                               dtype=np.int32))
            for _ in range(t.grad_accum_steps)]


def interleaved_step_times(steppers, steps: int, warmup: int, repeats: int) -> list[list[float]]:
    """Seconds per step of each stepper in each of `repeats` windows of `steps` steps, the steppers taking turns
    within every window, after `warmup` untimed steps each (compilation and the first, slow steps)."""
    for stepper in steppers:
        stepper.run(warmup)
    times = [[] for _ in steppers]
    for _ in range(repeats):
        for stepper, own in zip(steppers, times):
            start = time.perf_counter()
            stepper.run(steps)
            own.append((time.perf_counter() - start) / steps)
    return times
