"""What a gpt2_jax checkpoint looks like on disk, and how to recognise one, without importing JAX or orbax (so that
gpt2_formats can ask every form whether a path is its own and load a framework only for the form it finds).

checkpoints/<step>/{state,meta}: one numbered folder per saved step, each with orbax's state/ (the TrainState) and
meta/ (JSON); checkpoints/best/<step> for the best validation loss. gpt2_jax.checkpoint writes and reads them.
"""

from __future__ import annotations

from pathlib import Path

from gpt2_common.errors import UserError

CHECKPOINTS_DIR = "checkpoints"  # a run directory's folder of step folders
BEST_DIR = "best"  # checkpoints/best/<step>: the lowest validation loss so far (train.keep_best)
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
