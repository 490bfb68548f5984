"""Runs a trainer script and SIGKILLs it from a thread of its own a random moment (0-20 ms) after its metrics log
first holds STEPS training steps and a finished checkpoint: the kill lands inside a step however loaded the machine.
Polled from the test's process instead, a tiny run could finish while the test waited for a core (seen with the
suite on two pytest-xdist workers).

usage: python tests/kill_after.py RUN_DIR STEPS SCRIPT ARG...
"""

import os
import random
import runpy
import signal
import sys
import threading
import time
from pathlib import Path



def train_steps(run_dir: Path) -> int:
    """The training steps in the metrics log's whole lines (tiny_run.train_steps would warn of a line half-written)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_bytes().split(b"\n")[:-1]
    except FileNotFoundError:
        return 0
    return sum(b'"loss"' in line for line in lines)


def saved(run_dir: Path) -> bool:
    """A finished checkpoint of either trainer: orbax's step folder (digits only) or a step_N.pt."""
    folder = run_dir / "checkpoints"
    return folder.is_dir() and any(p.name.isdigit() or (p.name.startswith("step_") and p.name.endswith(".pt"))
                                   for p in folder.iterdir())


def kill_after(run_dir: Path, steps: int) -> None:
    while not (train_steps(run_dir) >= steps and saved(run_dir)):
        time.sleep(0.002)
    time.sleep(random.uniform(0, 0.02))
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    run_dir, steps, script = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    threading.Thread(target=kill_after, args=(run_dir, steps), daemon=True).start()
    sys.argv = sys.argv[3:]
    runpy.run_path(script, run_name="__main__")
