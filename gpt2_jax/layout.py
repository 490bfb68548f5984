"""What a gpt2_jax checkpoint looks like on disk, and how to recognise one, without importing JAX or orbax (so that
gpt2_formats can ask every form whether a path is its own and load a framework only for the form it finds).

checkpoints/<step>/{state,meta}: one numbered folder per saved step, each with orbax's state/ (the TrainState) and
meta/ (JSON); checkpoints/best/<step> for the best validation loss. gpt2_jax.checkpoint writes and reads them.
"""

from __future__ import annotations

import json
from pathlib import Path

from gpt2_common.errors import UserError

CHECKPOINTS_DIR = "checkpoints"  # a run directory's folder of step folders
BEST_DIR = "best"  # checkpoints/best/<step>: the lowest validation loss so far (train.keep_best)
MANIFEST_NAME = "manifest.sha256"  # a step folder's checksums of its files (gpt2_common.manifest), written last
PARTIAL_SUFFIX = ".orbax-checkpoint-tmp"  # a step folder's name while orbax writes it; renamed when finalized


def is_step_dir(path: Path) -> bool:
    return (path / "state").is_dir() and (path / "meta").is_dir()


def step_dirs(directory: str | Path) -> list[Path]:
    """The numbered step folders of a checkpoints folder, oldest first (empty if there is none)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return [p for _, p in sorted((int(p.name), p) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())]


def holds_checkpoints(path: str | Path) -> bool:
    """Whether `path` is a step folder, or a checkpoints folder or run directory holding one: what this reads."""
    path = Path(path)
    return is_step_dir(path) or any(is_step_dir(d) for d in (*step_dirs(path), *step_dirs(path / CHECKPOINTS_DIR)))


def step_dir(path: str | Path) -> Path:
    """A step folder from a run directory, its checkpoints/ folder, or the step folder itself (newest step)."""
    path = Path(path)
    if is_step_dir(path):
        return path
    directory = path / CHECKPOINTS_DIR if (path / CHECKPOINTS_DIR).is_dir() else path
    steps = [d for d in step_dirs(directory) if (d / "state").is_dir()]
    if not steps:
        raise UserError(f"no JAX checkpoint in '{path}'; give a run directory, its checkpoints/ folder or one "
                        "step folder of it")
    return steps[-1]


def resume_step(chosen: str | Path, checkpoint_dir: str | Path) -> int:
    """--resume-from's step: it must name a step folder of this run's checkpoints/ (one line otherwise)."""
    chosen, steps = Path(chosen), step_dirs(checkpoint_dir)
    if chosen.parent != Path(checkpoint_dir) or chosen not in steps:
        raise UserError(f"--resume-from '{chosen}' is not a checkpoint of this run; give one of its step folders "
                        f"({', '.join(str(s) for s in steps) or 'it has none'})")
    return int(chosen.name)


def saved_config_toml(step_folder: str | Path) -> str | None:
    """The config a step folder was saved with (its meta record, orbax's JSON), read without JAX or orbax; None
    where it does not read (a damaged or half-written folder: the restore says why)."""
    try:
        meta = json.loads((Path(step_folder) / "meta" / "metadata").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    config = meta.get("config_toml") if isinstance(meta, dict) else None
    return config if isinstance(config, str) else None
