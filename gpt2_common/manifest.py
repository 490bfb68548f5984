"""Checksums that prove a checkpoint reads back as it was written: a manifest of the SHA-256 of each of its files.

An atomic save (temp name, fsync, rename) guards against a save cut short, but not against damage that keeps a
file's size: a flipped bit on a disk, a copy that went wrong, a byte written over by another program. Both trainers
write a manifest as the last act of a save and check it before a checkpoint is read; a file that no longer matches
makes the checkpoint damaged (DamagedCheckpoint), and the trainers skip it for the one before.

A checkpoint is also what its name says: the manifest binds the step and the name. A PyTorch manifest must list the
very file it sits beside, and a checkpoint's own record of its step (in the files the manifest covers) must be the
step of its name, so that another step's checkpoint copied over this one (a restore from backup, a sync tool, a hand
mistake) is damaged too, and not resumed as if it were this step.

The manifest is in `sha256sum`'s own format ("<hex digest>  <path relative to the manifest>" a line), so that a user
can check a checkpoint by hand: `cd checkpoints/8 && sha256sum -c manifest.sha256` (JAX), or
`cd checkpoints && sha256sum -c step_00000008.pt.sha256` (PyTorch). SHA-256 runs at about 1-2 GB/s a core on CPUs
with SHA instructions: a second or two for a 124M model with its optimizer state.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Iterable

from gpt2_common.errors import UserError
from gpt2_common.files import fsync_dir

MANIFEST_SUFFIX = ".sha256"
_LINE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")


class DamagedCheckpoint(UserError):
    """A checkpoint whose files no longer match the checksums written with it, or that holds another step than its
    name says: skip it for the one before. `detail`: what is wrong with it, without the checkpoint's name."""

    def __init__(self, message: str, detail: str | None = None):
        super().__init__(message)
        self.detail = detail or message


class NoManifest(Exception):
    """A checkpoint without a manifest: written before checksums existed, or its save was killed between the
    checkpoint's commit and the manifest. Nothing can be verified; callers accept it with a warning."""


def file_digest(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def files_under(root: str | os.PathLike, leave_out: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """Every regular file under `root`, sorted, except those in `leave_out` (the manifest itself)."""
    root = Path(root)
    skip = {Path(p).resolve() for p in leave_out}
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and p.resolve() not in skip)


def write_manifest(manifest: str | os.PathLike, files: Iterable[str | os.PathLike],
                   known: dict[str, str] | None = None) -> dict[str, str]:
    """Hashes `files` (each under the manifest's folder) and writes their digests to `manifest` atomically; returns
    {relative path: digest}. `known`: digests already computed, by relative path (not read again)."""
    manifest = Path(manifest)
    base = manifest.parent
    digests = {}
    for path in files:
        name = Path(path).relative_to(base).as_posix()
        if "\n" in name or "\\" in name:
            raise ValueError(f"cannot list '{name}' in a checksum manifest (a newline or backslash in its name)")
        digests[name] = (known or {}).get(name) or file_digest(path)
    text = "".join(f"{digest}  {name}\n" for name, digest in digests.items())
    tmp = base / f".{manifest.name}.{os.getpid()}.tmp"  # open() gives it the umask's mode, as any file the user writes
    try:
        with open(tmp, "w", encoding="ascii") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, manifest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(base)
    return digests


def read_manifest(manifest: str | os.PathLike) -> dict[str, str]:
    """{relative path: digest}; NoManifest if there is none, DamagedCheckpoint if it does not parse."""
    manifest = Path(manifest)
    try:
        text = manifest.read_bytes().decode("ascii")
    except FileNotFoundError:
        raise NoManifest(str(manifest)) from None
    except UnicodeDecodeError:
        raise DamagedCheckpoint(f"checksum manifest {manifest.name} is damaged (bytes that are not text)") from None
    digests = {}
    for number, line in enumerate(text.splitlines(), 1):
        match = _LINE.match(line)
        if not match:
            raise DamagedCheckpoint(f"checksum manifest {manifest.name} is damaged (line {number} is not "
                                    "'<sha256>  <file>')")
        digests[match.group(2)] = match.group(1)
    if not digests:
        raise DamagedCheckpoint(f"checksum manifest {manifest.name} is empty")
    return digests


def verify_manifest(manifest: str | os.PathLike, only: str | None = None, names: Iterable[str] | None = None) -> None:
    """Checks every file that `manifest` lists (or those whose relative path starts with `only`) against its digest;
    DamagedCheckpoint names the first that is missing or differs, NoManifest if there is no manifest. `names`: the
    files it must list, no more and no fewer (a manifest copied beside another checkpoint names the wrong one, and
    would verify the wrong file)."""
    manifest = Path(manifest)
    listed = read_manifest(manifest)
    if names is not None and set(listed) != set(names):
        raise DamagedCheckpoint(f"its checksum file {manifest.name} lists {', '.join(sorted(listed))}, not "
                                f"{', '.join(sorted(names))} (a copy of another checkpoint's?)")
    for name, digest in listed.items():
        if only is not None and not name.startswith(only):
            continue
        path = manifest.parent / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            raise DamagedCheckpoint(f"checksum manifest {manifest.name} names a file outside it ('{name}')")
        try:
            actual = file_digest(path)
        except FileNotFoundError:
            raise DamagedCheckpoint(f"file '{name}' is missing (listed in {manifest.name})") from None
        if actual != digest:
            raise DamagedCheckpoint(f"file '{name}' does not match its SHA-256 in {manifest.name} (it changed "
                                    "after the save)")
