"""Checkpoints of the PyTorch trainer: one `.pt` file per saved step, run_dir/checkpoints/step_XXXXXXXX.pt, and
run_dir/checkpoints/best.pt (the lowest validation loss so far, with train.keep_best).

A checkpoint holds everything a resumed run needs to continue exactly: the model and optimizer state dicts, the
GradScaler's state, the step, the loader position, every rank's RNG states, and the resolved config as TOML text (so
that tools rebuild the model from the file alone). Files are written to a temporary name and renamed into place, so
a run killed mid-save leaves the previous checkpoint intact, and they are read with weights_only=True (plain tensors
and Python values only; no code runs when a checkpoint is loaded). A file damaged all the same (a disk that lost
its tail, a copy cut short) is skipped on resume for the one before it (newest_resumable).

Damage that keeps a file's size (a flipped bit, a byte written over) is caught by a checksum: each save ends by
writing `step_XXXXXXXX.pt.sha256` beside the file (sha256sum's format: `sha256sum -c` checks it by hand), and only
then are older checkpoints rotated out. load_checkpoint checks it first, and that the checksum file names this very
file and the file holds the step its name says (another step's checkpoint copied over it, with or without its
.sha256, is not this step); a file that fails is a DamagedCheckpoint, skipped on resume and, once an older one
reads, set aside under `<run dir>/set_aside/damaged_step_N_<time>/` (gpt2_common.setaside). A file without its
.sha256 (written before checksums, or a kill between the two renames) is read unverified.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt2_common.config import Config, dumps_toml, loads_toml
from gpt2_common.errors import UserError
from gpt2_common.files import PARTIAL_SUFFIX, fsync_dir, partial, share_like_open
from gpt2_common.faults import warn
from gpt2_common.manifest import (MANIFEST_SUFFIX, DamagedCheckpoint, NoManifest, file_digest, read_manifest,
                                  verify_manifest, write_manifest)
from gpt2_common.setaside import set_aside
from gpt2_common.weights import Weights
from gpt2_torch.layout import BEST_NAME, FORMAT, checkpoint_path, list_checkpoints, step_of  # noqa: F401 (the layout)
from gpt2_torch.weights import from_canonical, to_canonical

RESUME_KEYS = ("step", "loader_position", "model", "optimizer", "scaler", "rng", "config")


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(checkpoint_dir)
    return found[-1] if found else None


def manifest_path(path: str | os.PathLike) -> Path:
    """The checksum file of a checkpoint: step_XXXXXXXX.pt.sha256 beside step_XXXXXXXX.pt."""
    return Path(f"{path}{MANIFEST_SUFFIX}")


def save_checkpoint(checkpoint: dict[str, Any], path: str | os.PathLike, keep: int) -> None:
    """Writes atomically (temp file, fsync, os.replace), its checksum file first, and only then deletes all but
    the newest `keep` checkpoints. The checksum goes in before the file it names: a kill between the two leaves a
    checksum of a file that is not there (ignored), never a new step file without one (which would be read
    unverified, as a checkpoint from before checksums)."""
    path = Path(path)
    with partial(path) as tmp:  # a kill leaves it for the next save here (or the trainer's start) to remove
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **checkpoint}, f)
            f.flush()
            os.fsync(f.fileno())
        share_like_open(tmp)
        digest = file_digest(tmp)
        write_manifest(manifest_path(path), [path], known={path.name: digest})
        os.replace(tmp, path)
    fsync_dir(path.parent)  # the rename itself survives a power cut
    for old in list_checkpoints(path.parent)[:-keep]:
        old.unlink()
        manifest_path(old).unlink(missing_ok=True)


def verified(path: str | os.PathLike) -> bool:
    """Whether `path` is a checkpoint file that matches its checksum file (what a failed run may name as kept)."""
    path = Path(path)
    try:
        verify_manifest(manifest_path(path), names=[path.name])
    except NoManifest:
        pass
    except (DamagedCheckpoint, OSError):
        return False
    return path.is_file()


def link_or_save(checkpoint: dict[str, Any], path: str | os.PathLike, same_as: Path | None) -> None:
    """Writes `checkpoint` to `path` (e.g. best.pt), as a hard link to `same_as` when that file holds the same
    state already (no second write of a large file), atomically either way."""
    path = Path(path)
    if same_as is not None and same_as.is_file():
        tmp = path.with_name(f".{path.name}.link.tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(same_as, tmp)
            manifest_path(path).unlink(missing_ok=True)
            os.replace(tmp, path)
            try:
                known = {path.name: read_manifest(manifest_path(same_as))[same_as.name]}
            except (NoManifest, DamagedCheckpoint, KeyError):
                known = None
            write_manifest(manifest_path(path), [path], known=known)
            return
        except OSError:  # a filesystem without hard links: write it
            tmp.unlink(missing_ok=True)
    save_checkpoint(checkpoint, path, keep=1 << 30)


def remove_partial_saves(checkpoint_dir: str | os.PathLike) -> None:
    """Names, then deletes, the temporary files of saves that a kill cut short (they are never read): the run holds
    its directory, so no other process is writing them."""
    directory = Path(checkpoint_dir)
    if directory.is_dir():
        for tmp in sorted([*directory.glob(f".*{PARTIAL_SUFFIX}"), *directory.glob(".*.tmp")]):
            warn(f"skipping partial checkpoint {tmp} (its save did not finish)")
            tmp.unlink(missing_ok=True)


def newest_resumable(checkpoint_dir: str | os.PathLike, strict: bool = False) -> tuple[Path, dict[str, Any]] | None:
    """(path, checkpoint) of the newest step checkpoint that reads back whole; each damaged one after it is skipped
    with a warning that names it. None if there are no checkpoints; a UserError if none of them reads, or with
    `strict` (the checkpoint --resume-from chose) if the newest does not."""
    found = list_checkpoints(checkpoint_dir)
    if strict and found:
        found = found[-1:]
    for newer, path in enumerate(reversed(found)):
        try:
            if not manifest_path(path).exists():
                warn(f"checkpoint {path} has no checksum file {manifest_path(path).name} (written before checksums, "
                     "or by a save killed just before it): reading it unverified")
            checkpoint = load_checkpoint(path)
            missing = [key for key in RESUME_KEYS if key not in checkpoint]
            if missing:
                raise UserError(f"'{path}' lacks {', '.join(missing)}")
            _set_aside_damaged(found[len(found) - newer:])
            where = set_aside_after(checkpoint_dir, checkpoint["step"])  # a newer best.pt: a kill, or damage above
            if where:
                warn(f"set {Path(checkpoint_dir) / BEST_NAME} aside in {where} (newer than step {checkpoint['step']}, "
                     "which the run resumes from and replays)")
            return path, checkpoint
        except UserError as err:
            why = f"it is damaged: {err.detail}" if isinstance(err, DamagedCheckpoint) else str(err).split('; ')[0]
            warn(f"skipping checkpoint {path}: {why}; trying the one before it")
    if found:
        raise UserError(f"none of the {len(found)} checkpoints in '{checkpoint_dir}' reads back; move them away to "
                        "start afresh, or give another --run-dir")
    return None


def _set_aside_damaged(skipped: list[Path]) -> None:
    """Moves the newer checkpoints that a resume skipped (with their checksum files) under the run directory's
    set_aside/, kept for a look: left in place, they would count among the `keep` newest and rotate out the good
    ones that the resumed run saves."""
    for path in skipped:
        where = set_aside([path, manifest_path(path)], path.parent.parent, f"damaged_step_{step_of(path)}")
        warn(f"set checkpoint {path} aside in {where} (it did not read back); delete it when you have looked")


def set_aside_after(checkpoint_dir: str | os.PathLike, step: int) -> Path | None:
    """Moves the step files newer than `step` (and a newer best.pt), with their checksum files, under
    `<run dir>/set_aside/after_step_<step>_<time>/`, for a run that resumes from `step` and writes those steps again;
    returns that folder (None if nothing was newer)."""
    directory = Path(checkpoint_dir)
    newer = [f for f in list_checkpoints(directory) if step_of(f) > step]
    best = directory / BEST_NAME
    try:
        if best.is_file() and load_checkpoint(best, mmap=True)["step"] > step:
            newer.append(best)
    except (UserError, KeyError):  # unreadable, or weights alone: the next best replaces it
        pass
    return set_aside([p for f in newer for p in (f, manifest_path(f))], directory.parent, f"after_step_{step}")


def load_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """Reads a checkpoint onto the CPU; mmap=True maps the tensors lazily instead of reading the whole file. Checks
    it against its checksum file first (DamagedCheckpoint if it differs; unverified if there is none)."""
    path = Path(path)
    try:
        verify_manifest(manifest_path(path), names=[path.name])
    except NoManifest:
        pass
    except DamagedCheckpoint as err:
        raise _damaged(path, err.detail) from None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise UserError(f"checkpoint '{path}' does not exist") from None
    except Exception as err:
        raise UserError(
            f"cannot read checkpoint '{path}' ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            "it is not a gpt2_torch checkpoint or is damaged: delete it to resume from the one before"
        ) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise UserError(f"'{path}' is not a gpt2_torch checkpoint (format {FORMAT}); convert it with scripts/convert.py")
    named, held = step_of(path), checkpoint.get("step")
    if named is not None and held is not None and held != named:
        raise _damaged(path, f"it holds step {held}, not {named} (a copy of another step's checkpoint?)")
    return checkpoint


def _damaged(path: Path, detail: str) -> DamagedCheckpoint:
    return DamagedCheckpoint(f"checkpoint '{path}' is damaged: {detail}; delete it to use the one before", detail)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A .pt file as given; for a run directory or a checkpoints directory, its newest checkpoint."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise UserError(f"checkpoint '{path}' does not exist; give a .pt file, a run directory or its checkpoints/")
    directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    newest = latest_checkpoint(directory)
    if newest is None:
        raise UserError(f"no step_XXXXXXXX.pt checkpoints in '{directory}'; train first or give a .pt file")
    return newest


def load_checkpoint_model(path: str | os.PathLike) -> tuple[Config, dict[str, torch.Tensor]]:
    """(config, model state_dict) from a run directory, a checkpoints directory (newest) or a .pt file.

    The state dict is gpt2_torch.model.GPT's, on the CPU: padded vocabulary, nn.Linear [out, in] weights, and both
    transformer.wte.weight and the tied lm_head.weight. Build the model with GPT(config.model).
    """
    file = resolve_checkpoint(path)
    checkpoint = load_checkpoint(file, mmap=True)
    return loads_toml(checkpoint["config"]), checkpoint["model"]


# --- weights-only checkpoints (gpt2_formats' "torch" form) ------------------------------------------------------------

def read_weights(path: str | os.PathLike) -> tuple[Config, Weights]:
    """The config and canonical weights of a checkpoint (a .pt file, or a run or checkpoints directory: its newest)."""
    config, state = load_checkpoint_model(path)
    return config, to_canonical(state, config.model)


def write_weights(weights: Weights, config: Config, path: str | os.PathLike) -> None:
    """A weights-only checkpoint (model and config, no optimizer state): what --init-from, sampling and evaluation
    read. Written atomically by the trainer's own save; nothing is written if the weights do not fit."""
    path = Path(path)
    if path.suffix != ".pt":
        raise UserError(f"a PyTorch checkpoint is a .pt file; name the destination like '{path.name}.pt'")
    if path.exists():
        raise UserError(f"'{path}' already exists; remove it or choose another destination")
    state = from_canonical(weights, config.model)
    keep_all = len(list_checkpoints(path.parent)) + 1  # save_checkpoint prunes old step files; a conversion must not
    save_checkpoint({"model": state, "config": dumps_toml(config)}, path, keep=keep_all)


# --- random number generators ----------------------------------------------------------------------------------------

def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states, as values that torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)), "pos": np_state["state"]["pos"],
                  "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]},
        "python": random.getstate(),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
                         "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]})
    random.setstate(state["python"])
