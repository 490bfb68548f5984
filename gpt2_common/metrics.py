"""What a run records: metrics.jsonl in the run directory (one JSON object a line, flushed as written so that a
killed run keeps it), and the same records fanned out to TensorBoard and Weights & Biases when the config's
logging section asks for them. Both trainers write through one RunLog."""

from __future__ import annotations

import json
import math
import os
import sys
import uuid
from pathlib import Path
from typing import Any

from gpt2_common.errors import UserError
from gpt2_common.faults import warn


class MetricsWriter:
    """Appends one JSON line per record, opening the file for each: a metrics.jsonl deleted or rotated mid-run comes
    back with the next record instead of every later line going to a file no one can see."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a", encoding="utf-8") as f:  # a record is small: one write, flushed at close
            f.write(json.dumps(clean) + "\n")

    def close(self) -> None:
        pass


def _records(data: bytes) -> list[tuple[int, str | None, dict | None, str]]:
    """(line number, line, record, problem) for each non-blank line of a metrics.jsonl: the record None and the
    problem stated when the line is not a JSON object whose step (if any) is a number; line None if not UTF-8."""
    out = []
    for number, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            out.append((number, None, None, "bytes that are not UTF-8"))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            out.append((number, line, None, "not JSON"))
            continue
        step = record.get("step", 0) if isinstance(record, dict) else None
        if not isinstance(record, dict):
            out.append((number, line, None, "not a JSON object"))
        elif isinstance(step, bool) or not isinstance(step, (int, float)):
            out.append((number, line, None, f"its step is {json.dumps(step)[:40]}, not a number"))
        else:
            out.append((number, line, record, ""))
    return out


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl; a line that is not one (damaged, or written by hand) is skipped with a
    warning that names it."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for number, _, record, problem in _records(path.read_bytes()):
        if record is None:
            warn(f"skipping line {number} of {path}: {problem}")
        else:
            records.append(record)
    return records


def trim_metrics(run_dir: str | os.PathLike, last_step: int) -> int:
    """Drops the lines of steps after `last_step` (and a line torn by a kill), atomically; returns how many went.

    A run resumed from the checkpoint of step `last_step` replays the steps after it and writes their lines again,
    so the lines the killed run wrote for them would otherwise appear twice."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return 0
    kept, dropped = [], 0
    data = path.read_bytes()
    records = _records(data)
    torn = bool(data) and not data.endswith(b"\n")  # a kill mid-write: its last line is dropped without a word
    for i, (number, line, record, problem) in enumerate(records):
        if record is not None and record.get("step", 0) <= last_step:
            kept.append(line + "\n")
            continue
        dropped += 1
        if record is None and not (torn and i == len(records) - 1):
            warn(f"dropping line {number} of {path}: {problem}")
    if dropped or torn:  # (a line cut just before its newline would join the next one)
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("w", encoding="utf-8") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return dropped


# --- TensorBoard and Weights & Biases -----------------------------------------------------------------------------

def _tensorboard_writer_class():
    """tensorboardX's SummaryWriter: TensorBoard's event files from numpy and protobuf. As it loads, tensorboardX
    tries to load torch too, only to accept torch tensors (it is given floats here); where torch is not loaded
    already, that attempt is made to fail, so that a JAX run does not load torch (seconds, and its memory) to log."""
    hide_torch = "torch" not in sys.modules
    if hide_torch:
        sys.modules["torch"] = None  # the import system's own mark for a module that is not there
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise UserError("logging.tensorboard=true needs tensorboardX: pip install '.[tensorboard]' (or pip install "
                        "tensorboardX), or set logging.tensorboard=false") from None
    finally:
        if hide_torch:
            del sys.modules["torch"]
    return SummaryWriter


def _wandb_module():
    try:
        import wandb

        return wandb
    except ImportError:
        raise UserError("logging.wandb=true needs Weights & Biases: pip install wandb, or set logging.wandb=false") \
            from None


def check_logging_packages(logging) -> None:
    """Fails at once (a UserError naming the pip install) when config.logging asks for a package that is missing,
    so that a run does not compile or load anything first."""
    if logging.tensorboard:
        _tensorboard_writer_class()
    if logging.wandb:
        _wandb_module()


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    """A record's numbers under TensorBoard-style tags: train/loss, train/lr, ..., val/loss."""
    prefix = "val" if "val_loss" in record else "train"
    out = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        name = "loss" if key == "val_loss" else key
        out[f"{prefix}/{name}"] = float(value)
    return out


class RunLog:
    """metrics.jsonl plus the optional sinks of config.logging, written by the main process only.

    `resume_step`: the step the run starts from; lines of later steps (written before a kill) are dropped, and
    TensorBoard purges its events of those steps, so that a resumed run's records read like an uninterrupted run's.
    W&B runs offline unless WANDB_MODE says otherwise, and a resumed run continues the same W&B run.
    """

    def __init__(self, run_dir: str | os.PathLike, logging=None, *, enabled: bool = True, resume_step: int = 0,
                 config_dict: dict | None = None, run_name: str = "run"):
        run_dir = Path(run_dir)
        # Check the optional packages on every process, so that a missing one stops all ranks alike.
        tensorboard_class = _tensorboard_writer_class() if logging is not None and logging.tensorboard else None
        wandb = _wandb_module() if logging is not None and logging.wandb else None
        if enabled:
            trim_metrics(run_dir, resume_step)
        self.jsonl = MetricsWriter(run_dir, enabled=enabled)
        self.tensorboard = None
        self.wandb_run = None
        if not enabled:
            return
        if tensorboard_class is not None:
            self.tensorboard = tensorboard_class(log_dir=str(run_dir / "tensorboard"), purge_step=resume_step + 1)
        if wandb is not None:
            id_file = run_dir / "wandb_id.txt"
            if not id_file.exists():
                id_file.write_text(uuid.uuid4().hex[:12])
            self.wandb_run = wandb.init(project=logging.wandb_project, name=run_name, dir=str(run_dir),
                                        id=id_file.read_text().strip(), resume="allow", config=config_dict,
                                        mode=os.environ.get("WANDB_MODE", "offline"))

    def write(self, record: dict[str, Any]) -> None:
        self.jsonl.write(record)
        if self.tensorboard is None and self.wandb_run is None:
            return
        step, scalars = record.get("step", 0), _scalars(record)
        scalars = {k: v for k, v in scalars.items() if math.isfinite(v)}
        if self.tensorboard is not None:
            for tag, value in scalars.items():
                self.tensorboard.add_scalar(tag, value, step)
        if self.wandb_run is not None and scalars:
            self.wandb_run.log(scalars, step=step)

    def close(self) -> None:
        self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
