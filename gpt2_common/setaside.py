"""What a run steps over is moved, never deleted: into `<run dir>/set_aside/<why>_<time>/`, each checkpoint at the
path it had under `checkpoints/` (so that moving it back is one `mv`), in both frameworks.

  damaged_step_N_<time>/   a checkpoint of step N that did not read back (damaged, or another step's copy): the run
                           resumed from the one before it and writes step N again
  after_step_N_<time>/     checkpoints newer than step N, which the run resumed from (--resume-from, or the step before
                           a damaged one): the run replays those steps and writes them again

Only process 0 of a job moves anything; the backends make the others wait for it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

SET_ASIDE_DIR = "set_aside"
CHECKPOINTS_DIR = "checkpoints"


def set_aside(paths: list[Path], run_dir: Path, why: str) -> Path | None:
    """Moves `paths` (under `<run dir>/checkpoints/`) into a new `<run dir>/set_aside/<why>_<time>/`; returns that
    folder (None if there was nothing to move). `why`: "damaged_step_N" or "after_step_N"."""
    paths = [Path(p) for p in paths if os.path.lexists(p)]
    if not paths:
        return None
    run_dir = Path(run_dir)
    target = _new_folder(run_dir / SET_ASIDE_DIR, f"{why}_{time.strftime('%Y%m%d-%H%M%S')}")
    for path in paths:
        relative = path.relative_to(run_dir / CHECKPOINTS_DIR)
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target / relative)
    return target


def _new_folder(parent: Path, name: str) -> Path:
    """parent/name, or name-2, name-3... where a set-aside of the same second took the name already."""
    parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        target = parent / (name if n == 1 else f"{name}-{n}")
        try:
            target.mkdir()
            return target
        except FileExistsError:
            continue
    raise FileExistsError(f"'{parent / name}' and 999 more of its name exist; clear out '{parent}'")
