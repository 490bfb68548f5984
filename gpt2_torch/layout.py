"""What a gpt2_torch checkpoint looks like on disk, and how to recognise one, without importing PyTorch (so that
gpt2_formats can ask every form whether a path is its own and load a framework only for the form it finds).

run_dir/checkpoints/step_XXXXXXXX.pt, one file per saved step, and best.pt; each file a torch.save dict whose
"format" is FORMAT. gpt2_torch.checkpoint writes and reads them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

FORMAT = "gpt2_torch/1"
CHECKPOINTS_DIR = "checkpoints"
STEP_FILE = re.compile(r"^step_(\d{8,})\.pt$")
BEST_NAME = "best.pt"


def checkpoint_path(checkpoint_dir: str | os.PathLike, step: int) -> Path:
    return Path(checkpoint_dir) / f"step_{step:08d}.pt"


def step_of(path: str | os.PathLike) -> int | None:
    """The step that a step file's name says (step_00000040.pt: 40); None for other names (best.pt, weights.pt)."""
    match = STEP_FILE.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """The step_XXXXXXXX.pt files of a directory, oldest first."""
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := STEP_FILE.match(p.name))]
    return [p for _, p in sorted(found)]


def holds_checkpoints(path: str | os.PathLike) -> bool:
    """Whether a directory (a checkpoints folder, or the run directory above one) holds step checkpoints. A single
    .pt file is told apart from other PyTorch files by its contents (gpt2_torch.nanogpt.kind)."""
    path = Path(path)
    return bool(list_checkpoints(path) or list_checkpoints(path / CHECKPOINTS_DIR))
