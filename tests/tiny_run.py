"""The run config that the fault and hostile-world tests train: a 2-layer, 32-wide model over 100 token ids with
dropout (so that a resumed run's restored RNG and loader position matter), and random shards for it, written once
under the test's folder; and what those tests read of a run that a process of theirs is training."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np

from gpt2_common.data import write_shard
from gpt2_common.metrics import read_metrics


def write_run_config(root: Path, name: str, train: dict, *, model: dict | None = None, train_tokens: int = 12_000,
                     file_name: str | None = None) -> Path:
    """A config TOML under root ([train] holds `train`; [model] the tiny model plus `model`), the shards
    root/data/train.bin and val.bin beside it; named after `train` unless file_name is given."""
    if not (root / "data" / "train.bin").exists():
        rng = np.random.default_rng(0)
        write_shard(root / "data" / "train.bin", rng.integers(0, 100, train_tokens))
        write_shard(root / "data" / "val.bin", rng.integers(0, 100, 1_000))
    model = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, "vocab_size": 100, "dropout": 0.1,
             **(model or {})}
    text = [f'name = "{name}"', "[model]", *(f"{k} = {json.dumps(v)}" for k, v in model.items()), "[train]"]
    text += [f"{k} = {json.dumps(v)}" for k, v in train.items()]
    text += ["[data]", f'train = "{root / "data" / "train.bin"}"', f'val = "{root / "data" / "val.bin"}"']
    path = root / (file_name or f"config_{abs(hash(json.dumps(train, sort_keys=True))) % 10**8}.toml")
    path.write_text("\n".join(text) + "\n")
    return path


def train_steps(run_dir: Path) -> int:
    """The training steps logged so far (0 before the log exists)."""
    return sum(1 for r in read_metrics(run_dir) if "loss" in r) if (run_dir / "metrics.jsonl").exists() else 0


def records(run_dir: Path) -> list[dict]:
    """What must match an uninterrupted run: every loss, grad norm, lr and validation loss, in order."""
    keep = ("step", "loss", "grad_norm", "lr", "val_loss")
    return [{k: r[k] for k in keep if k in r} for r in read_metrics(run_dir)]


def killed_after(argv: list[str], env: dict[str, str], run_dir: Path, steps: int) -> subprocess.CompletedProcess:
    """Runs the trainer command `argv` ([python, script, ...]) until a thread of its own SIGKILLs it, a random moment
    after `steps` logged steps and a finished checkpoint (tests/kill_after.py); fails if the run ended first."""
    proc = subprocess.run([argv[0], str(Path(__file__).with_name("kill_after.py")), str(run_dir), str(steps), *argv[1:]],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, f"the run ended before its kill: {proc.stderr[-3000:]}"
    return proc


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 600) -> None:
    """Until predicate() holds, failing if `proc` ends first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended first: {proc.communicate()}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
