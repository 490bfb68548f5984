"""Files that a user can share: what the project writes through a temporary name (tempfile.mkstemp and mkdtemp
make it private, 0600 and 0700) gets the mode that open() and mkdir() would have given it under the user's umask
before it is renamed into place. The temporary names themselves (`partial`) are found again after a kill, and a
destination that cannot be made is refused before anything is read (`check_destination`)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from gpt2_common.errors import UserError

PARTIAL_SUFFIX = ".partial"


def current_umask() -> int:
    """The process's umask, read without changing it (/proc on Linux); elsewhere set and restored at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_like_open(path: str | os.PathLike) -> None:
    """Gives a file or directory made by tempfile (and, for a directory, everything in it: some writers, such as
    safetensors, create private files too) the mode that open() (0666) or os.mkdir() (0777) gives under the umask,
    so that shards, checkpoints and exported weights are as readable as any other file the user writes."""
    mask = current_umask()
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~mask)
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)


def fsync_dir(directory: str | os.PathLike) -> None:
    """Makes a rename in `directory` survive a power cut (where the filesystem allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- temporary names that a later writer finds -------------------------------------------------------------------

@contextlib.contextmanager
def partial(path: str | os.PathLike, directory: bool = False) -> Iterator[Path]:
    """A new temporary sibling of `path`, `.<name>.<8 random>.partial` (an empty directory, or an empty file), for
    the caller to fill and rename onto `path`; removed if the body raises. Its writer holds an flock on it while it
    exists, so that the partials of the same destination that a killed writer left behind (no lock held: the kernel
    let go of it) are removed, with a warning, when the next writer of that destination starts, and never one that
    another process is still writing."""
    path = Path(path)
    remove_stale_partials(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX, dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    lock = os.open(tmp, os.O_RDONLY)  # a descriptor of its own: the lock outlives the caller's writes and closes
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    finally:
        os.close(lock)


def remove_stale_partials(path: str | os.PathLike) -> None:
    """Removes the partials of `path` (see `partial`) whose writer is gone."""
    path = Path(path)
    name = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}{re.escape(PARTIAL_SUFFIX)}")
    if not path.parent.is_dir():
        return
    for entry in sorted(p for p in path.parent.iterdir() if name.fullmatch(p.name)):
        try:
            fd = os.open(entry, os.O_RDONLY)
        except OSError:  # gone already, or not ours to open
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # its writer is at work
            continue
        else:
            print(f"warning: removing {entry}, left by a write of {path} that did not finish", file=sys.stderr)
            _remove(entry)
        finally:
            os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def check_destination(path: str | os.PathLike) -> None:
    """Refuses, in one line and before anything is read or written, a destination that cannot be made: one under a
    file, or in a folder that takes no new files (read-only, not writable by this user, or not a place for files at
    all, such as /proc). Missing folders above it are fine: the writers make them."""
    path = Path(path)
    existing = next(p for p in path.parents if os.path.lexists(p))
    if not existing.is_dir():
        raise UserError(f"cannot write '{path}': '{existing}' is a file, not a folder; choose another destination")
    try:  # root passes every permission check, so ask the filesystem itself
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError:
        raise UserError(f"cannot write '{path}': '{existing}' does not take new files; choose another "
                        "destination") from None
