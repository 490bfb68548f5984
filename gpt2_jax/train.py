"""The JAX trainer: its backend for the run policy of gpt2_common/run.py (the steps that gpt2_jax.step compiles over
the mesh, restoring with gpt2_jax/resume.py, saving with gpt2_jax/saves.py, evaluating with gpt2_jax/evaluate.py,
sampling), and its command line: the JAX column of docs/architecture.md's backend table.

  python scripts/train_jax.py --config shakespeare [--run-dir DIR] [--init-from PATH] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from gpt2_common import run
from gpt2_common.config import Config, DataConfig, LoggingConfig
from gpt2_common.evaluation import training_hellaswag
from gpt2_common.flops import peak_flops
from gpt2_common.loaders import data_paths, open_loaders
from gpt2_common.metrics import check_logging_packages
from gpt2_common.named_inputs import fetch_named_inputs
from gpt2_formats import check_framework, init_weights
from gpt2_jax import resume, sharding
from gpt2_jax.layout import resume_step
from gpt2_jax.evaluate import evaluate_params
from gpt2_jax.sample import sample_text
from gpt2_jax.saves import AsyncSaves, verified
from gpt2_jax.step import Trainer, build_trainer
from gpt2_jax.weights import from_canonical


_compiled_trainer = functools.lru_cache(maxsize=4)(build_trainer)


def _cached_trainer(config: Config, mesh: Mesh) -> Trainer:
    """Runs of one config in one process (a notebook, a sweep, a test that stops and resumes) compile their steps
    once; so do configs that differ only in what the steps never see (data, logging, how often to log, evaluate,
    save or sample, the NaN policy)."""
    t = config.train
    key = dataclasses.replace(config, name="", data=DataConfig(), logging=LoggingConfig(), train=dataclasses.replace(
        t, eval_interval=0, save_interval=0, keep_checkpoints=1, log_interval=1, sample_interval=0, keep_best=True,
        save_every_epoch=False, nan_policy="stop"))
    trainer = _compiled_trainer(key, mesh)
    return dataclasses.replace(trainer, config=config)


class JaxBackend:
    """The run policy's backend on a mesh of devices: the train state lives here, between the policy's calls; its
    restore half is gpt2_jax/resume.py, its save half gpt2_jax/saves.py."""

    framework = "jax"

    def __init__(self, config: Config, run_dir: Path, *, init_from: str | None = None, resume_from: str | None = None,
                 devices: list | None = None, allow_config_change: bool = False):
        self.config, self.run_dir, self.init_from, self.resume_from = config, Path(run_dir), init_from, resume_from
        self.allow_config_change = allow_config_change
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.is_main, self.multi_process = jax.process_index() == 0, jax.process_count() > 1
        check_framework(self.checkpoint_dir, "jax")
        check_logging_packages(config.logging)
        if self.multi_process:  # one process fetches what the run names on the Hub; the others then find it cached
            if self.is_main:
                fetch_named_inputs(config, init_from)
            multihost_utils.sync_global_devices("gpt2_jax: named inputs fetched")
        self.mesh = sharding.make_mesh(config.mesh, devices)
        self.trainer = _cached_trainer(config, self.mesh)
        self.train_loader, self.val_loader = _loaders(config, self.trainer)
        self.hellaswag = training_hellaswag(config)
        peak = peak_flops(jax.devices()[0].device_kind, config.train.precision)
        self.peak_flops = peak * jax.device_count() if peak else None
        self.state, self.saves = None, AsyncSaves(self.checkpoint_dir, config.train.keep_checkpoints)

    def describe(self) -> str:
        return f"{jax.device_count()} {jax.devices()[0].device_kind} devices as {dict(self.mesh.shape)}"

    def param_counts(self) -> dict[str, int]:
        leaves = jax.tree_util.tree_flatten_with_path(self.trainer.abstract_state.params)[0]
        return {"/".join(str(getattr(k, "key", k)) for k in path): int(np.prod(leaf.shape)) for path, leaf in leaves}

    def start(self) -> run.Start:
        """The newest checkpoint that restores (each one after it that does not skipped with a warning and set
        aside), else new weights (--init-from's, when given). A refused start leaves the run directory as it was."""
        resume.sweep_partial_saves(self.checkpoint_dir)
        aside = resume.set_aside_after(self.checkpoint_dir, resume_step(self.resume_from, self.checkpoint_dir)) \
            if self.resume_from else None
        manager = self.saves.manager(create=False)
        if manager is not None and manager.all_steps():
            self.state, start = resume.resume(manager, self.trainer, self.config, newest_only=bool(self.resume_from),
                                              allow_config_change=self.allow_config_change, init_from=self.init_from)
            start = dataclasses.replace(start, set_aside=str(aside) if aside else None)
        else:
            params = from_canonical(init_weights(self.init_from, self.config.model), self.config.model) \
                if self.init_from else None
            self.state = self.trainer.init(jax.random.PRNGKey(self.config.train.seed), params)
            start = run.Start(initialised_from=self.init_from)
        self.train_loader.batch(start.position)  # read once here: a bad shard ends the run before it writes anything
        self.val_batches = [self.trainer.put(self.val_loader.batch(i)) for i in range(self.config.train.eval_steps)]
        return start

    def step(self, position: int) -> Callable[[], run.StepMetrics]:
        self.saves.raise_failed()  # a background save that failed ends the run before another step
        self.state, metrics = self.trainer.step(self.state, self.train_loader, position)

        def host_metrics() -> run.StepMetrics:
            values = jax.device_get(metrics)
            extras = {"loss_scale": float(values["loss_scale"])} if "loss_scale" in values else {}
            return run.StepMetrics(float(values["loss"]), float(values["grad_norm"]), float(values["lr"]), extras)

        return host_metrics

    def epoch_of(self, position: int) -> int:
        return self.train_loader.epoch_of(position)

    def evaluate(self) -> dict[str, float]:
        return evaluate_params(self.trainer, self.state.params, self.val_batches, self.hellaswag)

    def save(self, step: int, position: int, meta: dict, *, best: bool = False, same_as_last: bool = False) -> str:
        """An async orbax save (every process calls it; orbax writes each shard once)."""
        return self.saves.save(step, self.state, self.config, position, meta, best=best)

    def verified(self, path: str) -> bool:
        return verified(path)

    def sample(self, max_new_tokens: int, seed: int) -> str:
        """Every process joins the generation (the parameters may span them all)."""
        return sample_text(self.trainer.model, self.state.params, "\n", max_new_tokens, seed=seed,
                           sharding=sharding.replicated(self.trainer.mesh))

    def agree(self, flag: bool) -> bool:
        return bool(multihost_utils.process_allgather(np.int32(flag)).max())

    def wait(self) -> None:
        jax.block_until_ready(self.state)

    def memory_in_use(self) -> int | None:
        """Bytes in use on this process's first device, where the device reports it (GPUs and TPUs; not the CPU)."""
        try:
            stats = jax.local_devices()[0].memory_stats()
        except Exception:  # some backends raise rather than return None
            return None
        return stats.get("bytes_in_use") if stats else None

    def close(self) -> None:
        self.saves.close()


def train(config: Config, run_dir: str | Path, *, init_from: str | None = None, resume_from: str | None = None,
          stop_at: int | None = None, sample_tokens: int = 200, allow_config_change: bool = False,
          log: Callable[[str], None] = print, devices: list | None = None) -> run.RunEnd:
    """Trains `config` in `run_dir` with the run policy of gpt2_common.run (the same signature as
    gpt2_torch.train.train, plus `devices`: the devices of the mesh, default all)."""
    backend = JaxBackend(config, Path(run_dir), init_from=init_from, resume_from=resume_from, devices=devices,
                         allow_config_change=allow_config_change)
    return run.train(backend, config, Path(run_dir), stop_at=stop_at, sample_tokens=sample_tokens, log=log)


# --- helpers of the backend -----------------------------------------------------------------------------------------

def _loaders(config: Config, trainer: Trainer):
    """Train and validation loaders for this process's rows of every micro-batch."""
    if config.data.format == "tokens" and jax.process_count() > 1:
        if jax.process_index() == 0:  # one process prepares an embedded corpus; the others wait, then read it
            data_paths(config)
        multihost_utils.sync_global_devices("gpt2_jax: data prepared")
    t = config.train
    index, count = sharding.process_rows(trainer.micro_batch_sharding, (t.micro_batch_size, config.model.block_size))
    return open_loaders(config, index, count, progress=jax.process_index() == 0)


# --- command line ---------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    """scripts/train_jax.py: its flags and config are checked without JAX first (gpt2_formats.launch)."""
    from gpt2_formats.launch import train_main

    train_main("jax", argv)
