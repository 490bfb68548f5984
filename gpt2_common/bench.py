"""What timing a training step needs in either framework: the same random batches for every variant, and windows
of steps that take turns, so that a machine that slows down mid-run slows every variant alike. A stepper is
gpt2_jax.stepper.JaxStepper or gpt2_torch.stepper.TorchStepper (anything with `run(steps)` that waits for its
steps); scripts/bench.py and scripts/profile_step.py drive them. And the command line the benchmark scripts share.
"""

from __future__ import annotations

import argparse
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


def bench_parser(doc: str, *, repeats: int, config: str | None = None, frameworks: str | None = None,
                 ) -> argparse.ArgumentParser:
    """The command line of a benchmark script: its docstring's first paragraph as the description and the rest as
    the epilog, --repeats (timed rounds, the variants taking turns) and --json; and where it times models from a
    config (`config`: the default preset), --config, --frameworks (of jax, torch, hf) and --torch-threads."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if config is not None:
        parser.add_argument("--config", default=config, help="preset or path (default: %(default)s)")
        parser.add_argument("--frameworks", default=frameworks, help="any of jax, torch, hf (transformers) "
                            "(default: %(default)s)")
        parser.add_argument("--torch-threads", type=int, default=None,
                            help="torch.set_num_threads for torch and transformers (default: torch's own choice)")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed rounds (default: %(default)s)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    return parser
