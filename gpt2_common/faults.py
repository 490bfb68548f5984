"""What both trainers share to survive faults and bad input: stop signals that end a run cleanly, the divergence
error, and the checks that keep a run directory to one framework and one config."""

from __future__ import annotations

import signal
import sys
import threading

from gpt2_common.config import Config, config_changes
from gpt2_common.errors import UserError


class Diverged(UserError):
    """The loss or the gradient norm of a step was not finite and train.nan_policy is "stop"."""


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


class StopSignals:
    """While active, SIGTERM and SIGINT do not kill the process but ask the training loop to stop: it finishes the
    step, writes a checkpoint and returns (exit status 0). `requested` names the signal once one came.

    With `second_aborts`, a second SIGINT (Ctrl-C again) stops at once. Under a launcher that forwards the signal it
    already got (torchrun does), a process sees the same Ctrl-C twice, so launched ranks leave that off.
    Outside the main thread (where Python allows no handlers) it does nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, second_aborts: bool = True):
        self.second_aborts = second_aborts
        self.requested: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.requested is not None and self.second_aborts and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.requested is None:  # only a flag: printing here could re-enter a print the loop was in
            self.requested = signal.Signals(signum).name

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def divergence_message(step: int, loss: float, norm: float, last_checkpoint: str | None) -> str:
    kept = f"the last good checkpoint ({last_checkpoint}) is kept" if last_checkpoint else "no checkpoint was saved"
    return (f"training diverged at step {step}: loss {loss}, gradient norm {norm}; stopped without saving, "
            f"{kept}; lower train.lr (--allow-config-change to resume with it) or set train.nan_policy=skip")


# --- run directories ------------------------------------------------------------------------------------------------

SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "pad_vocab_multiple")


def check_same_model(saved: Config, config: Config, run_dir) -> None:
    """Checkpoints restore only into a model of the same shapes, whatever --allow-config-change says."""
    changes = [f"model.{key}: {getattr(saved.model, key)} -> {getattr(config.model, key)}" for key in SHAPE_KEYS
               if getattr(saved.model, key) != getattr(config.model, key)]
    if changes:
        raise UserError(f"run directory '{run_dir}' holds checkpoints of another model ({'; '.join(changes)}); "
                        "give another --run-dir, or the config they were trained with")


def check_same_config(saved: Config, config: Config, run_dir, allow_change: bool) -> None:
    """Refuses to resume checkpoints of another config (beyond run-control keys) unless told to."""
    changes = config_changes(saved, config)
    if not changes:
        return
    listed = "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4 else "")
    if not allow_change:
        raise UserError(f"run directory '{run_dir}' holds checkpoints of another config ({listed}); pass "
                        "--allow-config-change to resume them with this config, or give another --run-dir")
    warn(f"resuming {run_dir} with a changed config ({listed})")
