"""Checkpoints with orbax: the whole train state plus a small JSON record (resolved config text, data position).

A run directory's checkpoints/ holds one folder per optimizer step, `<step>/state` (the TrainState pytree:
step, params, opt_state, rng, loss scale) and `<step>/meta` (JSON: the config as TOML text, the loader position,
skipped steps, best validation loss), and best/<step> for the lowest validation loss. Saves are asynchronous:
training continues while the arrays are written into `<step>.orbax-checkpoint-tmp*`, renamed to `<step>` only when
complete, so a killed save never looks like a checkpoint.

Each step folder carries `manifest.sha256`: the SHA-256 of every file of its items (state/ and meta/; orbax's own
step metadata at the top, which it rewrites at commit, is left out). It is written in orbax's commit thread after
every file is in place and before the folder is renamed to `<step>`, so a step folder never exists without it, and
orbax deletes the checkpoints beyond `keep` only after that commit: an older checkpoint is never rotated out before
the newest is sealed. `restore` checks it first: a damaged checkpoint raises DamagedCheckpoint, which the resume
loop (gpt2_jax/resume.py) skips for the one before. A step folder without a manifest (written before checksums)
restores unverified, with a warning.

A step folder is what its name says: its meta (which the manifest covers) and its state record the step, and
`read_meta` and `restore` refuse a folder whose step is not its name's (another step's folder copied over it) as
damaged. A save never passes over a folder silently: orbax skips a step at or below the newest it finds, and `save`
raises instead.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import struct

from gpt2_common.config import Config, dumps_toml, loads_toml
from gpt2_common.errors import UserError
from gpt2_common.faults import warn
from gpt2_common.files import partial, share_like_open
from gpt2_common.manifest import DamagedCheckpoint, NoManifest, files_under, verify_manifest, write_manifest
from gpt2_common.train_state import WeightsOnly
from gpt2_common.weights import Weights
from gpt2_jax.layout import BEST_DIR, MANIFEST_NAME, PARTIAL_SUFFIX  # noqa: F401 (the layout: what a checkpoint looks like)
from gpt2_jax.layout import step_dir as _step_dir
from gpt2_jax.weights import from_canonical, to_canonical


ITEMS = ("state", "meta")  # the folders of a step that the manifest covers
_sealing: dict[Path, dict] = {}  # a manager's directory -> {"async": bool, "step": the step being committed}


def checkpoint_manager(directory: str | Path, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    directory = Path(directory).absolute()
    _sealing[directory] = {"async": async_save, "step": None}
    # orbax runs this on process 0 once every process's files are written, before the rename that commits the step
    seal = ocp.AsyncOptions(post_finalization_callback=lambda: _seal(directory)) if async_save else None
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                                           async_options=seal)
    return ocp.CheckpointManager(directory, options=options)


def _seal(directory: Path) -> None:
    """Writes the manifest into the folder of the step being committed (still under its temporary name)."""
    step = _sealing[directory]["step"]
    folder = directory / f"{step}{PARTIAL_SUFFIX}"
    if step is not None and folder.is_dir():
        write_manifest(folder / MANIFEST_NAME, _item_files(folder))


def _item_files(step_dir: Path) -> list[Path]:
    return [p for item in ITEMS for p in files_under(step_dir / item)]


def save(manager: ocp.CheckpointManager, state: Any, config: Config, loader_position: int,
         extra: dict | None = None) -> None:
    """Starts an async save of `state` at its step (every process calls it; orbax writes each shard once).
    `extra`: more JSON values for the meta record (the run's skipped-step count and best validation loss)."""
    step = int(jax.device_get(state.step))
    meta = {**(extra or {}), "config_toml": dumps_toml(config), "loader_position": int(loader_position),
            "step": step}
    sealing = _sealing.get(Path(manager.directory))
    if sealing is not None:
        manager.wait_until_finished()  # the previous commit seals its own step (orbax would wait here anyway)
        sealing["step"] = step
    if not manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta))):
        raise FileExistsError(errno.EEXIST, f"step {manager.latest_step()} is there already, at or after step {step} "
                              "(orbax would skip this save)", str(manager.directory))
    if sealing is not None and not sealing["async"] and jax.process_index() == 0:
        # a synchronous save has committed (renamed) its folder already: seal it now. Such managers write one-step
        # conversions into a temporary folder that their caller renames into place, so nothing is rotated first.
        step_dir = Path(manager.directory) / str(step)
        write_manifest(step_dir / MANIFEST_NAME, _item_files(step_dir))


def restore(manager: ocp.CheckpointManager, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """(state, meta) of `step` (default: the newest), each array placed by the sharding in `abstract_state`.

    Checks the step's manifest first, and after restoring that the state and meta hold this step: DamagedCheckpoint
    if a file differs or the folder holds another step."""
    step = manager.latest_step() if step is None else step
    step_dir = Path(manager.directory) / str(step)
    try:
        verify_manifest(step_dir / MANIFEST_NAME)
    except NoManifest:
        warn(f"checkpoint {step_dir} has no checksum manifest (written before checksums): restoring it unverified")
    except DamagedCheckpoint as err:
        raise _damaged(step_dir, err.detail) from None
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    _check_step(step_dir, restored.meta.get("step"))
    _check_step(step_dir, int(jax.device_get(restored.state.step)))
    return restored.state, restored.meta


def _check_step(step_dir: Path, held: int | None) -> None:
    """A numbered step folder must hold its own step: not another step's folder copied over it."""
    if held is not None and step_dir.name.isdigit() and int(held) != int(step_dir.name):
        raise _damaged(step_dir, f"it holds step {held}, not {step_dir.name} (a copy of another step's checkpoint?)")


def _damaged(step_dir: Path, detail: str) -> DamagedCheckpoint:
    return DamagedCheckpoint(f"checkpoint '{step_dir}' is damaged: {detail}", detail)


def verify(step_dir: str | Path, only: str | None = None) -> None:
    """Checks a step folder's files (or those under `only`, e.g. "meta/") against its manifest; a DamagedCheckpoint
    that names the checkpoint if one differs. A folder without a manifest (written before checksums) passes."""
    try:
        verify_manifest(Path(step_dir) / MANIFEST_NAME, only=only)
    except NoManifest:
        pass
    except DamagedCheckpoint as err:
        raise _damaged(Path(step_dir), err.detail) from None


def read_meta(path: str | Path) -> dict:
    """The meta record of a step folder (or of the newest in a run or checkpoints folder), verified, and checked to
    be of the step the folder's name says."""
    step_dir = _step_dir(path)
    verify(step_dir, only="meta/")
    meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(step_dir / "meta")
    _check_step(step_dir, meta.get("step"))
    return meta


def read_train_state(step_dir: str | Path, abstract_state: Any) -> tuple[Any, dict]:
    """(state, meta) of one step folder as numpy arrays in the structure of `abstract_state`, read without a
    manager: nothing in its run directory changes (restore() sets newer steps aside; this is for readers that must
    leave a run as it is, such as a conversion). Checks the manifest first (DamagedCheckpoint)."""
    step_dir = Path(step_dir)
    verify(step_dir)
    meta = read_meta(step_dir)
    if "opt_state" not in ocp.PyTreeCheckpointHandler().metadata(step_dir / "state").tree:
        raise WeightsOnly(f"'{step_dir}' holds weights only (written by convert.py --to jax), no optimizer state")
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract_state)
    state = ocp.PyTreeCheckpointer().restore(step_dir / "state", args=ocp.args.PyTreeRestore(
        item=abstract_state, restore_args=restore_args))
    return state, meta


def load_checkpoint_params(path: str | Path, shardings: Any = None) -> tuple[Config, Any]:
    """(config, params) of a checkpoint, without the optimizer state.

    `path`: a run directory, its checkpoints/ folder or a step folder. The params are the plain pytree that
    GPT.apply takes ({"params": params}), as numpy arrays, or placed by `shardings` (one sharding for all, or
    a tree of them like the params).
    """
    from gpt2_jax.model import build_model  # here, so that tools reading only the config do not build a model

    step_dir = _step_dir(path)
    verify(step_dir)
    config = loads_toml(read_meta(step_dir)["config_toml"])
    model = build_model(config.model, "fp32", backend="cpu")
    dummy = np.zeros((1, config.model.block_size), np.int32)
    shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), dummy))["params"])
    if shardings is None:
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), shapes)
    else:
        if not isinstance(shardings, dict):
            shardings = jax.tree.map(lambda _: shardings, shapes)
        restore_args = jax.tree.map(lambda s, sh: ocp.ArrayRestoreArgs(sharding=sh, global_shape=s.shape,
                                                                      dtype=s.dtype), shapes, shardings)
    restored = ocp.PyTreeCheckpointer().restore(step_dir / "state", args=ocp.args.PyTreeRestore(
        item={"params": shapes}, restore_args={"params": restore_args}, partial_restore=True))
    return config, restored["params"]


# --- weights-only checkpoints (gpt2_formats' "jax" form) --------------------------------------------------------------

def read_weights(path: str | Path) -> tuple[Config, Weights]:
    """The config and canonical weights of a checkpoint (a run directory, its checkpoints/ or a step folder)."""
    config, params = load_checkpoint_params(path)
    return config, to_canonical(params, config.model)


class WeightsOnlyState(struct.PyTreeNode):
    """The part of a TrainState that a weights-only checkpoint holds: load_checkpoint_params reads `params` alone,
    so a converted checkpoint carries no optimizer state (it would be a fresh one anyway)."""

    step: Any
    params: Any


def write_weights(weights: Weights, config: Config, path: str | Path) -> None:
    """A weights-only checkpoint at `path` (a checkpoints folder holding step 0), which --init-from,
    load_checkpoint_params, sampling and evaluation read. Written by the trainer's own save into a temporary folder
    that is renamed into place, so that a failed conversion leaves nothing behind (and a killed one leaves what the
    next conversion to `path` removes: gpt2_common.files.partial)."""
    path = Path(path)
    if path.exists():
        raise UserError(f"'{path}' already exists; remove it or choose another destination")
    state = WeightsOnlyState(step=np.zeros([], np.int32), params=from_canonical(weights, config.model))
    with partial(path, directory=True) as tmp:  # a kill leaves it for the next conversion here to remove
        manager = checkpoint_manager(tmp, keep=1, async_save=False)
        save(manager, state, config, loader_position=0)
        manager.close()
        share_like_open(tmp)  # mkdtemp makes it private; the result is an ordinary directory
        os.replace(tmp, path)
