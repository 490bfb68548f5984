"""The JAX trainer's restore half: where a run starts from its own checkpoints.

The newest step folder that verifies and restores is resumed; each newer one that does not (damaged, half-read, or
another step's folder copied over it) is skipped with a warning, then set aside under
`<run dir>/set_aside/damaged_step_N_<time>/`; best checkpoints newer than the step resumed go under
`after_step_S_<time>/`, since the run replays those steps and saves them again (orbax would skip a save at or below
the newest step it finds). `--resume-from` sets aside the checkpoints after the one it names the same way first.
The temporary folders of saves that a kill cut short are deleted with a warning (orbax never reads them).
Only process 0 touches the files; the others wait for it.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import jax
from jax.experimental import multihost_utils

from gpt2_common import run
from gpt2_common.config import Config, loads_toml
from gpt2_common.errors import UserError
from gpt2_common.faults import check_same_config, check_same_model, warn
from gpt2_common.manifest import DamagedCheckpoint
from gpt2_common.setaside import set_aside
from gpt2_jax import checkpoint
from gpt2_jax.layout import BEST_DIR, PARTIAL_SUFFIX, is_step_dir, step_dirs
from gpt2_jax.optim import uses_multisteps
from gpt2_jax.step import Trainer


def sweep_partial_saves(checkpoint_dir: Path) -> None:
    """Names, then deletes, the temporary folders of saves that a kill cut short."""
    pattern = f"*{PARTIAL_SUFFIX}*"
    for partial in sorted([*checkpoint_dir.glob(pattern), *(checkpoint_dir / BEST_DIR).glob(pattern)]):
        if jax.process_index() == 0 and partial.is_dir():
            warn(f"skipping partial checkpoint {partial} (its save did not finish)")
            shutil.rmtree(partial, ignore_errors=True)


def set_aside_after(checkpoint_dir: Path, step: int) -> Path | None:
    """Moves the step folders newer than `step`, and the newer best ones, under set_aside/after_step_<step>_<time>/;
    returns that folder (None if nothing was newer)."""
    newer = [d for d in (*step_dirs(checkpoint_dir), *step_dirs(checkpoint_dir / BEST_DIR)) if int(d.name) > step]
    where = set_aside(newer, checkpoint_dir.parent, f"after_step_{step}") if jax.process_index() == 0 else None
    _all_wait("newer checkpoints set aside")
    return where


def resume(manager, trainer: Trainer, config: Config, *, newest_only: bool = False, allow_config_change: bool = False,
           init_from: str | None = None) -> tuple[Any, run.Start]:
    """(train state, run.Start) of the newest checkpoint of `manager` that restores (only the newest, for
    --resume-from), placed as the trainer's state is; one UserError line if none does."""
    directory = Path(manager.directory)
    run_dir, steps = directory.parent, sorted(manager.all_steps())
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            trainer.abstract_state, trainer.state_shardings)
    for step in reversed(steps[-1:] if newest_only else steps):
        step_dir = directory / str(step)
        try:
            saved = loads_toml(checkpoint.read_meta(step_dir)["config_toml"])
        except Exception as err:
            warn(f"skipping checkpoint {step_dir}: {_why(err, 'its meta does not read')}; trying the one before")
            continue
        check_same_model(saved, config, run_dir)
        _check_resumable(saved, config, directory)
        check_same_config(saved, config, run_dir, allow_config_change)
        try:
            state, meta = checkpoint.restore(manager, abstract, step)
        except Exception as err:
            warn(f"skipping checkpoint {step_dir}: {_why(err, 'it does not restore')}; trying the one before")
            continue
        _set_aside_skipped(directory, [s for s in steps if s > step], step)
        manager.reload()
        if init_from:
            warn(f"--init-from {init_from} ignored: the run resumes from its own checkpoint")
        best = meta.get("best_val_loss")
        best_dirs = [d for d in step_dirs(directory / BEST_DIR) if int(d.name) <= step and is_step_dir(d)]
        return state, run.Start(step=int(meta["step"]), position=int(meta["loader_position"]),
                                skipped_steps=int(meta.get("skipped_steps", 0)),
                                best_val_loss=math.inf if best is None else float(best), resumed_from=str(step_dir),
                                best_checkpoint=str(best_dirs[-1]) if best_dirs else None)
    if newest_only:
        raise UserError(f"--resume-from '{directory / str(steps[-1])}' does not restore (see the warning above); give "
                        "another of the run's checkpoints")
    raise UserError(f"none of the {len(steps)} checkpoints in '{directory}' restores; move them away to start "
                    "afresh, or give another --run-dir")


def _set_aside_skipped(directory: Path, skipped: list[int], resumed: int) -> None:
    """The newer steps that did not restore go aside one by one; then a best newer than the step resumed. Left in
    place, orbax would neither save those steps again nor rotate out anything but the good older ones."""
    if jax.process_index() == 0:
        for step in skipped:
            where = set_aside([directory / str(step)], directory.parent, f"damaged_step_{step}")
            warn(f"set checkpoint {directory / str(step)} aside in {where} (it did not read back); delete it when "
                 "you have looked")
        newer_best = [d for d in step_dirs(directory / BEST_DIR) if int(d.name) > resumed]
        where = set_aside(newer_best, directory.parent, f"after_step_{resumed}")
        if where:
            warn(f"set {', '.join(str(d) for d in newer_best)} aside in {where} (newer than step {resumed}, which "
                 "the run resumes from and replays)")
    _all_wait("skipped checkpoints set aside")


def _why(err: BaseException, otherwise: str) -> str:
    if isinstance(err, DamagedCheckpoint):
        return f"it is damaged: {err.detail}"
    text = str(err).strip().splitlines()
    return f"{otherwise} ({type(err).__name__}{': ' + text[0][:200] if text else ''})"


def _all_wait(what: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"gpt2_jax: {what}")


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
