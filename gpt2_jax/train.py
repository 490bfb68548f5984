"""The JAX trainer: its backend for the run policy of gpt2_common/run.py (the steps that gpt2_jax.step compiles over
the mesh, orbax checkpoints, evaluation and sampling), and its command line.

  python scripts/train_jax.py --config shakespeare [--run-dir DIR] [--init-from PATH] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from gpt2_common import run
from gpt2_common.cli import resolve_run, train_parser
from gpt2_common.config import Config, DataConfig, LoggingConfig, loads_toml
from gpt2_common.errors import UserError
from gpt2_common.evaluation import hellaswag_correct, training_hellaswag
from gpt2_common.faults import check_same_config, check_same_model, warn
from gpt2_common.flops import peak_flops
from gpt2_common.loaders import data_paths, open_loaders
from gpt2_common.metrics import check_logging_packages
from gpt2_common.named_inputs import fetch_named_inputs
from gpt2_common.runlock import set_aside
from gpt2_formats import check_framework, init_weights
from gpt2_jax import checkpoint, distributed, sharding
from gpt2_jax.evaluate import model_token_nll
from gpt2_jax.optim import uses_multisteps
from gpt2_jax.sample import sample_text
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
    """The run policy's backend on a mesh of devices: the train state lives here, between the policy's calls."""

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
        self.state, self.manager, self.best_manager = None, None, None
        self.pending: dict[int, str] = {}  # the checkpoint each manager last started writing
        # A failed background save is reported once, as a line that names it (gpt2_common.run), not also as
        # orbax's logged traceback.
        logging.getLogger("absl").addFilter(_quiet_orbax_background_errors)

    def describe(self) -> str:
        return f"{jax.device_count()} {jax.devices()[0].device_kind} devices as {dict(self.mesh.shape)}"

    def param_counts(self) -> dict[str, int]:
        leaves = jax.tree_util.tree_flatten_with_path(self.trainer.abstract_state.params)[0]
        return {"/".join(str(getattr(k, "key", k)) for k in path): int(np.prod(leaf.shape)) for path, leaf in leaves}

    def start(self) -> run.Start:
        """The newest checkpoint that restores (each damaged one after it skipped with a warning), else new weights
        (--init-from's, when given). Nothing is created in the run directory here: a refused start leaves it as
        it was."""
        _drop_partial_saves(self.checkpoint_dir, self.is_main)
        set_aside_in = self._set_aside_newer_than(self.resume_from) if self.resume_from else None
        if self.checkpoint_dir.is_dir():
            self.manager = self._manager(self.checkpoint_dir, self.config.train.keep_checkpoints)
        steps = sorted(self.manager.all_steps()) if self.manager else []
        if steps:
            start = self._restore(steps[-1:] if self.resume_from else steps)
            start = dataclasses.replace(start, set_aside=set_aside_in)
        else:
            params = from_canonical(init_weights(self.init_from, self.config.model), self.config.model) \
                if self.init_from else None
            self.state = self.trainer.init(jax.random.PRNGKey(self.config.train.seed), params)
            start = run.Start(initialised_from=self.init_from)
        self.train_loader.batch(start.position)  # read once here: a bad shard ends the run before it writes anything
        self.val_batches = [self.trainer.put(self.val_loader.batch(i)) for i in range(self.config.train.eval_steps)]
        return start

    def _set_aside_newer_than(self, chosen: str) -> str | None:
        """--resume-from: the step folder it names stays the newest; the newer ones (and a newer best) move aside."""
        chosen = Path(chosen)
        steps = sorted(int(d.name) for d in self.checkpoint_dir.glob("*") if d.name.isdigit() and d.is_dir())
        if chosen.parent != self.checkpoint_dir or not chosen.name.isdigit() or int(chosen.name) not in steps:
            raise UserError(f"--resume-from '{chosen}' is not a checkpoint of this run; give one of its step folders "
                            f"({', '.join(str(self.checkpoint_dir / str(s)) for s in steps) or 'it has none'})")
        step, best = int(chosen.name), self.checkpoint_dir / checkpoint.BEST_DIR
        newer = [self.checkpoint_dir / str(s) for s in steps if s > step]
        newer += [d for d in best.glob("*") if d.name.isdigit() and int(d.name) > step]
        where = set_aside(newer, self.run_dir, step) if self.is_main else None
        if self.multi_process:
            multihost_utils.sync_global_devices("gpt2_jax: newer checkpoints set aside")
        return str(where) if where else None

    def _restore(self, steps: list[int]) -> run.Start:
        config, directory = self.config, self.checkpoint_dir
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                self.trainer.abstract_state, self.trainer.state_shardings)
        for step in reversed(steps):
            step_dir = directory / str(step)
            try:
                saved = loads_toml(checkpoint.read_meta(step_dir)["config_toml"])
            except Exception as err:
                warn(f"skipping checkpoint {step_dir}: its meta does not read ({_first_line(err)}); trying the one "
                     "before")
                continue
            check_same_model(saved, config, self.run_dir)
            _check_resumable(saved, config, directory)
            check_same_config(saved, config, self.run_dir, self.allow_config_change)
            try:
                self.state, meta = checkpoint.restore(self.manager, abstract, step)
            except Exception as err:
                warn(f"skipping checkpoint {step_dir}: it does not restore ({_first_line(err)}); trying the one before")
                continue
            if self.init_from:
                warn(f"--init-from {self.init_from} ignored: the run resumes from its own checkpoint")
            best = meta.get("best_val_loss")
            return run.Start(step=int(meta["step"]), position=int(meta["loader_position"]),
                             skipped_steps=int(meta.get("skipped_steps", 0)),
                             best_val_loss=math.inf if best is None else float(best), resumed_from=str(step_dir))
        if self.resume_from:
            raise UserError(f"--resume-from '{self.resume_from}' does not restore (see the warning above); give "
                            "another of the run's checkpoints")
        raise UserError(f"none of the {len(steps)} checkpoints in '{directory}' restores; move them away to start "
                        "afresh, or give another --run-dir")

    def step(self, position: int) -> Callable[[], run.StepMetrics]:
        self.state, metrics = self.trainer.step(self.state, self.train_loader, position)

        def host_metrics() -> run.StepMetrics:
            values = jax.device_get(metrics)
            extras = {"loss_scale": float(values["loss_scale"])} if "loss_scale" in values else {}
            return run.StepMetrics(float(values["loss"]), float(values["grad_norm"]), float(values["lr"]), extras)

        return host_metrics

    def epoch_of(self, position: int) -> int:
        return self.train_loader.epoch_of(position)

    def evaluate(self) -> dict[str, float]:
        record = {}
        if self.val_batches:
            losses = [self.trainer.eval_step(self.state.params, batch) for batch in self.val_batches]
            record["val_loss"] = float(np.mean(jax.device_get(losses)))
        if self.hellaswag is not None:
            record.update(_hellaswag_scores(self.trainer, self.state.params, self.hellaswag))
        return record

    def save(self, step: int, position: int, meta: dict, *, best: bool = False, same_as_last: bool = False) -> str:
        """An async orbax save (every process calls it; orbax writes each shard once)."""
        if best:
            if self.best_manager is None:  # checkpoints/best: the lowest validation loss so far, made on first use
                self.best_manager = self._manager(self.checkpoint_dir / checkpoint.BEST_DIR, 1)
            manager, directory = self.best_manager, self.checkpoint_dir / checkpoint.BEST_DIR
        else:
            if self.manager is None:
                self.manager = self._manager(self.checkpoint_dir, self.config.train.keep_checkpoints)
            manager, directory = self.manager, self.checkpoint_dir
        try:  # orbax waits for the previous save first: its failure surfaces here, and names its own checkpoint
            manager.wait_until_finished()
        except Exception as err:
            raise run.SaveFailed(self.pending.get(id(manager), str(directory)), err) from err
        path = str(directory / str(step))
        try:
            checkpoint.save(manager, self.state, self.config, position, meta)
        except Exception as err:
            raise run.SaveFailed(path, err) from err
        self.pending[id(manager)] = path
        return path

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
        managers, self.manager, self.best_manager = [m for m in (self.manager, self.best_manager) if m], None, None
        failure = None
        for manager in managers:
            try:
                manager.wait_until_finished()
            except Exception as err:  # keep closing the other; report the first failure
                failure = failure or run.SaveFailed(self.pending.get(id(manager), str(self.checkpoint_dir)), err)
            finally:
                manager.close()
        logging.getLogger("absl").removeFilter(_quiet_orbax_background_errors)
        if failure is not None:
            raise failure

    @staticmethod
    def _manager(directory: Path, keep: int):
        return checkpoint.checkpoint_manager(directory, keep)


def train(config: Config, run_dir: str | Path, *, init_from: str | None = None, resume_from: str | None = None,
          stop_at: int | None = None, sample_tokens: int = 200, allow_config_change: bool = False,
          log: Callable[[str], None] = print, devices: list | None = None) -> run.RunEnd:
    """Trains `config` in `run_dir` with the run policy of gpt2_common.run (the same signature as
    gpt2_torch.train.train, plus `devices`: the devices of the mesh, default all)."""
    backend = JaxBackend(config, Path(run_dir), init_from=init_from, resume_from=resume_from, devices=devices,
                         allow_config_change=allow_config_change)
    return run.train(backend, config, Path(run_dir), stop_at=stop_at, sample_tokens=sample_tokens, log=log)


# --- helpers of the backend -----------------------------------------------------------------------------------------

def _quiet_orbax_background_errors(record: logging.LogRecord) -> bool:
    """Drops orbax's own error records (with their tracebacks) while a run is on: every failure of a save reaches
    the backend as an exception too, at the next save or at close, and the run reports it as one line."""
    return not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)


def _drop_partial_saves(checkpoint_dir: Path, main_process: bool) -> None:
    """Names, then deletes, the temporary folders of saves that a kill cut short (orbax never reads them)."""
    pattern = f"*{checkpoint.PARTIAL_SUFFIX}*"
    for partial in sorted([*checkpoint_dir.glob(pattern), *(checkpoint_dir / checkpoint.BEST_DIR).glob(pattern)]):
        if main_process and partial.is_dir():
            warn(f"skipping partial checkpoint {partial} (its save did not finish)")
            shutil.rmtree(partial, ignore_errors=True)


def _loaders(config: Config, trainer: Trainer):
    """Train and validation loaders for this process's rows of every micro-batch."""
    if config.data.format == "tokens" and jax.process_count() > 1:
        if jax.process_index() == 0:  # one process prepares an embedded corpus; the others wait, then read it
            data_paths(config)
        multihost_utils.sync_global_devices("gpt2_jax: data prepared")
    t = config.train
    index, count = sharding.process_rows(trainer.micro_batch_sharding, (t.micro_batch_size, config.model.block_size))
    return open_loaders(config, index, count, progress=jax.process_index() == 0)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


def _check_resumable(saved: Config, config: Config, directory) -> None:
    """A checkpoint restores only into a train state of the same structure; say which setting differs."""
    differences = []
    if uses_multisteps(saved.train) != uses_multisteps(config.train):
        differences.append(f"train.accumulation or the number of micro-batches ({saved.train.accumulation}, "
                           f"{saved.train.grad_accum_steps} vs now {config.train.accumulation}, "
                           f"{config.train.grad_accum_steps})")
    if (saved.train.precision == "fp16") != (config.train.precision == "fp16"):
        differences.append(f"train.precision ({saved.train.precision} vs now {config.train.precision})")
    if differences:
        raise UserError(f"{directory} holds checkpoints of another setup: {'; '.join(differences)}; run with the "
                        "config that wrote them, or pass another --run-dir")


def _hellaswag_scores(trainer: Trainer, params: Any, examples: list) -> dict[str, float]:
    """Every process scores every example (the parameters may span them all) and gets the same counts."""
    token_nll = model_token_nll(trainer.model, params, trainer.mesh)
    correct, correct_norm = hellaswag_correct(examples, trainer.config.model.block_size, token_nll)
    return {"hellaswag_acc": correct / len(examples), "hellaswag_acc_norm": correct_norm / len(examples)}


# --- command line ---------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = train_parser("Train GPT-2 with JAX (Flax, optax, orbax) on a mesh of devices; running the same "
                          "command again resumes from the run directory's newest checkpoint.")
    distributed.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    config, run_dir = resolve_run(args, "jax")
    train(config, run_dir, init_from=args.init_from, resume_from=args.resume_from, stop_at=args.stop_at,
          sample_tokens=args.sample_tokens, allow_config_change=args.allow_config_change)
