"""One trainer per run directory: an exclusive OS lock (flock) on `<run dir>/.lock`, held for the run's lifetime
and released by the kernel if the process dies, so that a second trainer (or a conversion writing into the run)
gets one line instead of writing every metrics line twice or crashing inside orbax."""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from gpt2_common.errors import UserError

LOCK_NAME = ".lock"


def check_run_dir(run_dir: Path) -> None:
    """The refusals a run directory itself can earn, before anything is written."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--run-dir '{run_dir}' is a file; give a directory (it is made if it does not exist)")
    checkpoints = run_dir / "checkpoints"
    if checkpoints.exists() and not checkpoints.is_dir():
        raise UserError(f"'{checkpoints}' is a file, where the run keeps its checkpoints; move it away or give "
                        "another --run-dir")
    existing = next((p for p in [run_dir, *run_dir.parents] if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write the run directory '{run_dir}': '{existing}' is not writable; give another "
                        "--run-dir")


class RunLock:
    """`with RunLock(run_dir):` holds the run directory, or raises a UserError naming the process that does. A run
    directory that the lock itself had to create is removed again if the run is refused (the body raises before
    writing anything else into it), so that a refused run leaves no trace."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self._file, self._created = None, False

    def __enter__(self) -> "RunLock":
        if not self.enabled:
            return self
        check_run_dir(self.run_dir)
        lock = self.run_dir / LOCK_NAME
        self._created, self._created_lock = not self.run_dir.exists(), not lock.exists()
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(lock, "a", encoding="ascii")  # never written: the file's mtime says nothing
        except OSError as err:
            raise UserError(f"cannot write the run directory '{self.run_dir}': {err.strerror}") from None
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock_holder(lock)
            self._file.close()
            self._file = None
            raise _in_use(self.run_dir, holder) from None
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._file is None:
            return
        if exc_type is not None and self._created and {p.name for p in self.run_dir.iterdir()} <= {LOCK_NAME}:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        elif exc_type is not None and self._created_lock:
            (self.run_dir / LOCK_NAME).unlink(missing_ok=True)
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()
        self._file = None


def _in_use(run_dir: Path, holder: str) -> UserError:
    return UserError(f"run directory '{run_dir}' is in use by {holder}; wait for it to finish, stop it, or give "
                     "another --run-dir")


def check_free(run_dir: str | os.PathLike) -> None:
    """RunLock's refusal, asked before a trainer loads its framework: the run directory is held by another run.
    Takes and lets go of the lock at once (RunLock takes it for the run's life later)."""
    lock = Path(run_dir) / LOCK_NAME
    if not lock.is_file():
        return
    try:
        f = open(lock, "a", encoding="ascii")
    except OSError:  # the run's own lock will say what is wrong
        return
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(Path(run_dir), lock_holder(lock)) from None
        fcntl.flock(f, fcntl.LOCK_UN)


def check_not_in_use(path: str | os.PathLike) -> None:
    """Refuses to write `path` inside a run directory that a trainer holds (convert.py's destination)."""
    for directory in Path(path).absolute().parents:
        lock = directory / LOCK_NAME
        if not lock.is_file():
            continue
        with open(lock, "a", encoding="ascii") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UserError(f"run directory '{directory}' is in use by {lock_holder(lock)}; write somewhere else, "
                                "or wait for the run to finish") from None
            fcntl.flock(f, fcntl.LOCK_UN)


def lock_holder(lock: Path) -> str:
    """'process P' that holds the flock on `lock`, from the kernel's table (Linux); else 'another process'."""
    inode = os.stat(lock).st_ino
    try:
        with open("/proc/locks", encoding="ascii") as locks:
            for line in locks:  # "1: FLOCK  ADVISORY  WRITE 4242 08:02:131090 0 EOF"
                fields = line.split()
                if len(fields) > 5 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == str(inode):
                    return f"process {fields[4]}"
    except OSError:
        pass
    return "another process"
