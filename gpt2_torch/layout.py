"""What a gpt2_torch checkpoint looks like on disk, and how to recognise one, without importing PyTorch (so that
gpt2_formats can ask every form whether a path is its own and load a framework only for the form it finds).

run_dir/checkpoints/step_XXXXXXXX.pt, one file per saved step, and best.pt; each file a torch.save dict whose
"format" is FORMAT. gpt2_torch.checkpoint writes and reads them; `peek` reads the plain values beside the tensors
(the config, the step) without PyTorch, so that a trainer can check them before it loads its framework.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
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


def resume_step(chosen: str | os.PathLike, checkpoint_dir: str | os.PathLike) -> int:
    """--resume-from's step: it must name a step file of this run's checkpoints/ (one line otherwise)."""
    from gpt2_common.errors import UserError

    chosen, files = Path(chosen), list_checkpoints(checkpoint_dir)
    if chosen not in files:
        raise UserError(f"--resume-from '{chosen}' is not a checkpoint of this run; give one of its step files "
                        f"({', '.join(str(f) for f in files) or 'it has none'})")
    return step_of(chosen)


class _Opaque:
    """What `peek` puts where torch would rebuild a tensor or a storage: their bytes are not read."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Opaque()

    def __setstate__(self, state):
        pass


class _PlainValues(pickle.Unpickler):
    """Unpickles a torch.save file's record with every torch object left opaque; any other class is refused (as
    torch.load(weights_only=True) refuses it), so a hostile file runs no code."""

    _ALLOWED = {("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice")}

    def find_class(self, module: str, name: str):
        if module == "torch" or module.startswith("torch."):
            return _Opaque
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a plain value")

    def persistent_load(self, pid):
        return _Opaque()


def peek(path: str | os.PathLike) -> dict | None:
    """The plain values of a torch.save file (zip format) whose record is a dict: strings, numbers, lists and dicts
    as they are, tensors as opaque stand-ins. Reads only the record (data.pkl, checked by the zip's CRC), never the
    tensors' bytes. None where it cannot tell (not a zip, another layout, a record that does not unpickle)."""
    try:
        with zipfile.ZipFile(path) as archive:
            record = next((n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")), None)
            if record is None:
                return None
            with archive.open(record) as f:
                value = _PlainValues(f).load()
    except (OSError, zipfile.BadZipFile, pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError,
            IndexError, KeyError):
        return None
    return value if isinstance(value, dict) else None
