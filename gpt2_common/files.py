"""Files that a user can share: what the project writes through a temporary name (tempfile.mkstemp and mkdtemp
make it private, 0600 and 0700) gets the mode that open() and mkdir() would have given it under the user's umask
before it is renamed into place."""

from __future__ import annotations

import os


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
