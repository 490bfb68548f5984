"""The NaN test hook, kept out of the trainers: a backend wrapper that makes one optimizer step's loss NaN, so that
the run policy's divergence handling (train.nan_policy) is tested through each framework's real step."""

from __future__ import annotations

from pathlib import Path

from gpt2_common import run
from gpt2_common.config import Config


class NanAtStep:
    """Wraps a trainer's backend; optimizer step `nan_step` (1-based) sees NaN: its loss, gradient and update."""

    def __init__(self, backend, nan_step: int):
        self.backend, self.nan_step, self.next_step = backend, nan_step, None

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def start(self) -> run.Start:
        start = self.backend.start()
        self.next_step = start.step + 1
        return start

    def step(self, position: int):
        step, self.next_step = self.next_step, self.next_step + 1
        if step != self.nan_step:
            return self.backend.step(position)
        return _poisoned_step(self.backend, position)


def _poisoned_step(backend, position: int):
    if backend.framework == "jax":  # NaN parameters for this one step; the step then keeps them (no update)
        import jax
        import jax.numpy as jnp

        params = backend.state.params
        backend.state = backend.state.replace(params=jax.tree.map(lambda p: p * jnp.nan, params))
        metrics = backend.step(position)
        backend.state = backend.state.replace(params=params)
        return metrics
    hook = backend.raw_model.register_forward_hook(lambda module, inputs, output: output * float("nan"))
    try:
        return backend.step(position)
    finally:
        hook.remove()


def train_with_nan_at(framework: str, config: Config, run_dir: Path, nan_step: int, **run_kwargs) -> run.RunEnd:
    """One process's run of `framework`'s trainer whose step `nan_step` diverges."""
    if framework == "jax":
        import jax

        from gpt2_jax.train import JaxBackend

        backend = JaxBackend(config, run_dir, devices=jax.devices()[:1])
    else:
        import torch

        from gpt2_torch.distributed import Distributed
        from gpt2_torch.train import TorchBackend

        backend = TorchBackend(config, run_dir, Distributed(0, 1, torch.device("cpu")))
    return run.train(NanAtStep(backend, nan_step), config, run_dir, sample_tokens=0, **run_kwargs)
