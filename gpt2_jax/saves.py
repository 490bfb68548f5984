"""The JAX trainer's save half: asynchronous orbax saves of the train state into `checkpoints/<step>` and
`checkpoints/best/<step>`, whose first failure ends the run as one true line (gpt2_common.run turns SaveFailed into
it).

orbax writes in the background, so a save that fails (a full disk, a read-only or vanished directory) is known only
when its writer thread ends: `raise_failed` asks at every step, without waiting, so that the run stops at the first
failure instead of training on to the next save. While saves run, orbax's own logged tracebacks, and the "Event loop
is closed" errors that tensorstore's callbacks raise once a failed save's event loop is gone, are kept off the
terminal: every failure reaches the run as SaveFailed, and the run says it once.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import jax

from gpt2_common import run
from gpt2_common.config import Config
from gpt2_common.manifest import DamagedCheckpoint
from gpt2_jax import checkpoint
from gpt2_jax.layout import BEST_DIR, is_step_dir


class AsyncSaves:
    """The step checkpoints' orbax manager and the best checkpoint's, each made on first use, and what each is
    writing."""

    def __init__(self, checkpoint_dir: Path, keep: int):
        self.checkpoint_dir, self.keep = Path(checkpoint_dir), keep
        self.managers: dict[bool, Any] = {}  # best? -> its CheckpointManager
        self.writing: dict[bool, str] = {}  # best? -> the checkpoint its manager is writing, until it is known done
        self.failed = False
        # One process sees its own failure only; a multi-process job learns of it at the next save or at close,
        # which every process reaches together.
        self.ask_every_step = jax.process_count() == 1
        _keep_quiet(True)

    def manager(self, best: bool = False, create: bool = True):
        """checkpoints/'s manager (or best/'s); None if its folder does not exist and `create` is False."""
        if best not in self.managers:
            directory = self.checkpoint_dir / BEST_DIR if best else self.checkpoint_dir
            if not create and not directory.is_dir():
                return None
            self.managers[best] = checkpoint.checkpoint_manager(directory, 1 if best else self.keep)
        return self.managers[best]

    def save(self, step: int, state: Any, config: Config, position: int, meta: dict, best: bool = False) -> str:
        """Starts an async save (every process calls it; orbax writes each shard once); returns its path."""
        manager = self.manager(best)
        self._wait(best)  # orbax waits for the manager's previous save first: its failure names its own checkpoint
        path = str(Path(manager.directory) / str(step))
        try:
            checkpoint.save(manager, state, config, position, meta)
        except Exception as err:
            self.failed = True
            raise run.SaveFailed(path, os_error_of(err)) from err
        self.writing[best] = path
        return path

    def raise_failed(self) -> None:
        """SaveFailed for a background save that has ended in failure; returns at once otherwise."""
        if self.ask_every_step:
            for best, manager in list(self.managers.items()):
                if best in self.writing and not manager.is_saving_in_progress():
                    self._wait(best)

    def _wait(self, best: bool) -> None:
        manager = self.managers.get(best)
        if manager is None:
            return
        try:
            manager.wait_until_finished()
        except Exception as err:
            self.failed = True
            raise run.SaveFailed(self.writing.get(best, str(manager.directory)), os_error_of(err)) from err
        self.writing.pop(best, None)

    def close(self) -> None:
        """Waits for the saves in flight; the first that failed is raised, after every manager is closed."""
        failure = None
        for best, manager in list(self.managers.items()):
            try:
                self._wait(best)
            except run.SaveFailed as err:
                failure = failure or err
            finally:
                try:
                    manager.close()
                except Exception:  # it raised its failure above already
                    pass
        self.managers.clear()
        if not self.failed:  # after a failure, late errors of its threads stay quiet until the process ends
            _keep_quiet(False)
        if failure is not None:
            raise failure


def verified(path: str) -> bool:
    """Whether `path` is a whole step folder whose files match its manifest (what a failed run may name as kept)."""
    if not is_step_dir(Path(path)):
        return False
    try:
        checkpoint.verify(path)
    except (DamagedCheckpoint, OSError):
        return False
    return True


_OS_ERROR_CODE = re.compile(r"os_error_code='(\d+)'")
_FAILED_FILE = re.compile(r'Failed (?:writing|to open|to create)[^"]*"([^"]+)"')


def os_error_of(err: BaseException) -> BaseException:
    """The OSError beneath a failed save, where there is one: orbax's own, or the one tensorstore names in its
    message (`... Failed writing: "<file>": ... No space left on device [os_error_code='28']`), so that the run's line
    reads like the PyTorch trainer's (No space left on device: '<file>')."""
    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen
        code = _OS_ERROR_CODE.search(str(seen))
        if code:
            file = _FAILED_FILE.search(str(seen))
            return OSError(int(code.group(1)), os.strerror(int(code.group(1))), file.group(1) if file else None)
        seen = seen.__cause__ or seen.__context__
    return err


# --- keeping the background's noise off the terminal ---------------------------------------------------------------

def _orbax_error_record(record: logging.LogRecord) -> bool:
    """Drops orbax's own error records (with their tracebacks): each failure reaches the run as SaveFailed."""
    return not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)


def _closed_loop(unraisable) -> bool:
    return isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"


class _QuietUnraisable:
    """sys.unraisablehook that drops what a failed save's abandoned callbacks raise, and passes the rest on."""

    def __init__(self, previous):
        self.previous = previous

    def __call__(self, unraisable) -> None:
        if not _closed_loop(unraisable):
            self.previous(unraisable)


def _keep_quiet(on: bool) -> None:
    absl = logging.getLogger("absl")
    if on:
        absl.addFilter(_orbax_error_record)
        if not isinstance(sys.unraisablehook, _QuietUnraisable):
            sys.unraisablehook = _QuietUnraisable(sys.unraisablehook)
    else:
        absl.removeFilter(_orbax_error_record)
        if isinstance(sys.unraisablehook, _QuietUnraisable):
            sys.unraisablehook = sys.unraisablehook.previous
