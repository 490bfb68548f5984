"""The one run policy of both trainers: given the step, it decides when to log, evaluate, keep the best checkpoint,
save, end an epoch, sample and stop, and it builds the records and the lines a person reads.

It drives a `Backend`, the narrow interface each framework implements (gpt2_jax/train.py, gpt2_torch/train.py):
`start` (resume or initialise), `step`, `evaluate`, `save`, `sample` and `agree` (a decision all processes make
alike). A backend holds its framework's state; this module holds none of it and imports no framework, so the
policy is written and tested once for both (tests/test_run_policy.py drives it with a stand-in backend).
"""

from __future__ import annotations

import contextlib
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from gpt2_common.cli import write_run_config
from gpt2_common.config import Config, to_dict
from gpt2_common.errors import UserError, as_typed
from gpt2_common.faults import Diverged, StopSignals, divergence_message
from gpt2_common.flops import mfu, num_params
from gpt2_common.metrics import RunLog
from gpt2_common.progress import Progress, eval_line, model_summary, step_line
from gpt2_common.runlock import RunLock


@dataclass(frozen=True)
class Start:
    """Where a run starts: a checkpoint it resumed (`resumed_from`), or step 0 of new (or --init-from) weights."""

    step: int = 0  # optimizer steps done
    position: int = 0  # the next micro-batch of the train loader
    skipped_steps: int = 0  # updates skipped for a non-finite loss (train.nan_policy = "skip")
    best_val_loss: float = math.inf
    resumed_from: str | None = None
    best_checkpoint: str | None = None  # the run's best checkpoint that a resume found (of its step or before)
    initialised_from: str | None = None  # --init-from's weights, for a run that did not resume
    set_aside: str | None = None  # where --resume-from moved the checkpoints newer than the one it resumed


@dataclass(frozen=True)
class StepMetrics:
    """A step's numbers on the host; `extras` are optional record fields (loss_scale under fp16)."""

    loss: float
    grad_norm: float
    lr: float
    extras: dict = field(default_factory=dict)


class Backend(Protocol):
    """What a framework gives the run policy. Every process of a job calls every method in the same order."""

    framework: str  # "jax" | "torch": names its checkpoints and its scripts
    is_main: bool  # the process that writes the run directory's files and prints
    multi_process: bool
    peak_flops: float | None  # of all devices together, for MFU; None where unknown (CPUs)

    def describe(self) -> str: ...  # devices, mesh or processes: the header's middle

    def param_counts(self) -> dict[str, int]: ...

    def start(self) -> Start: ...  # resume the newest checkpoint that verifies, else initialise

    def step(self, position: int) -> Callable[[], StepMetrics]:
        """Dispatches one optimizer step on the micro-batches from loader `position` on. A step whose loss or
        gradient is not finite leaves the parameters as they were. Returns a call that waits for its metrics, so
        that a backend whose device runs ahead of the host is not made to wait for each step."""

    def epoch_of(self, position: int) -> int: ...

    def evaluate(self) -> dict[str, float]: ...  # val_loss and/or hellaswag_acc, hellaswag_acc_norm

    def save(self, step: int, position: int, meta: dict, *, best: bool = False, same_as_last: bool = False) -> str:
        """Saves the state (in the background where the framework can); returns the checkpoint's path. A save in the
        background that failed raises SaveFailed at the next save, at the next step or at close."""

    def verified(self, path: str) -> bool: ...  # a checkpoint it saved is whole and matches its manifest

    def sample(self, max_new_tokens: int, seed: int) -> str: ...

    def agree(self, flag: bool) -> bool: ...  # True on every process if it is True on any

    def wait(self) -> None: ...  # until the dispatched work is done (for honest timings)

    def memory_in_use(self) -> int | None: ...  # device bytes, where the device says

    def close(self) -> None: ...  # finishes saves in flight


class SaveFailed(Exception):
    """A backend's save that did not complete; `path`: the checkpoint it was writing (for an asynchronous save, the
    failure may surface at the next save or at close, and it names its own checkpoint, not the current step's)."""

    def __init__(self, path: str, cause: BaseException):
        super().__init__(f"{path}: {cause}")
        self.path, self.cause = path, cause


class SaveError(UserError):
    """A run ended by a save that failed. The process exits at once after the line: a failed asynchronous save can
    leave a library's threads waiting forever for the rest of it."""

    exit_at_once = True


@dataclass(frozen=True)
class RunEnd:
    step: int
    last_checkpoint: str | None
    stopped_by: str | None = None  # the signal that stopped the run early


def train(backend: Backend, config: Config, run_dir: Path, *, stop_at: int | None = None, sample_tokens: int = 200,
          log: Callable[[str], None] = print) -> RunEnd:
    """Trains to train.max_steps (or `stop_at`), resuming from the run's newest checkpoint, holding the run
    directory's lock (process 0) throughout. SIGTERM and SIGINT stop it after the current step with a checkpoint
    (in a multi-process job, at the next log step, where the processes agree on it)."""
    with RunLock(run_dir, enabled=backend.is_main), StopSignals(second_aborts=not backend.multi_process) as signals:
        return _Run(backend, config, Path(run_dir), signals, log).go(stop_at, sample_tokens)


class _Run:
    def __init__(self, backend: Backend, config: Config, run_dir: Path, signals: StopSignals, log):
        self.backend, self.config, self.run_dir, self.signals = backend, config, run_dir, signals
        self.say = log if backend.is_main else (lambda _: None)
        self.print_to_terminal = log is print
        self.skipped, self.best_val, self.last_saved, self.best_saved = 0, math.inf, None, None
        self.saved: list[str] = []  # the step checkpoints of this run's life, oldest first
        self.closed = False  # the backend, once: after a failed save, before its line is written

    def go(self, stop_at: int | None, sample_tokens: int) -> RunEnd:
        backend, config, t = self.backend, self.config, self.config.train
        start = backend.start()
        step, position = start.step, start.position
        self.skipped, self.best_val, self.last_saved = start.skipped_steps, start.best_val_loss, start.resumed_from
        self.best_saved = start.best_checkpoint
        self.saved = [start.resumed_from] if start.resumed_from else []
        if start.set_aside:
            self.say(f"--resume-from: the newer checkpoints were set aside in {as_typed(start.set_aside)}")
        if start.resumed_from:
            self.say(f"resumed from step {step} ({as_typed(start.resumed_from)})")
        elif start.initialised_from:
            self.say(f"initialised from {as_typed(start.initialised_from)}")
        if backend.is_main:
            write_run_config(config, self.run_dir)
        if step >= t.max_steps:
            self.say(f"the run in {as_typed(str(self.run_dir))} is done: it has trained train.max_steps="
                     f"{t.max_steps} steps (to train on, raise it: --set train.max_steps=N)")
            self.say(self.next_steps())
            backend.close()
            return RunEnd(step, self.last_saved)
        end = t.max_steps if stop_at is None else min(stop_at, t.max_steps)
        if end <= step:
            kept = f"its checkpoint {as_typed(str(self.last_saved))} is kept" if self.last_saved else \
                "it has no checkpoint yet"
            self.say(f"--stop-at {stop_at}: the run is at step {step} already, so nothing was trained and {kept}; "
                     "run the command again with a later --stop-at, or without it, to train")
            backend.close()
            return RunEnd(step, self.last_saved)
        if step == 0:
            self.say(model_summary(backend.param_counts()))
        accumulation = f" ({t.accumulation})" if t.grad_accum_steps > 1 and backend.framework == "jax" else ""
        self.say(f"{config.name}: {num_params(config.model) / 1e6:.1f}M parameters, {backend.describe()}, "
                 f"{t.precision}{', compiled' if t.compile and backend.framework == 'torch' else ''}, "
                 f"{t.batch_size} x {config.model.block_size} tokens a step in {t.grad_accum_steps} micro-batch(es)"
                 f"{accumulation}; steps {step} -> {end}; run dir {as_typed(str(self.run_dir))}")
        self.runlog = RunLog(self.run_dir, config.logging, enabled=backend.is_main, resume_step=step,
                             config_dict=to_dict(config), run_name=config.name)
        # A bar on a terminal; plain lines through `log` otherwise (a caller's own `log` gets them all).
        self.progress = Progress(t.max_steps, initial_step=step, enabled=backend.is_main and self.print_to_terminal,
                                 stream=sys.stdout)
        self.show = self.progress.write if self.progress.enabled else self.say
        step = None
        try:
            step, stopped_by = self.loop(start.step, position, end)
        finally:  # an interrupted run still finishes the checkpoint it was writing, and keeps its metrics
            try:
                if not self.closed:
                    with self.failed_saves_end_the_run(step if step is not None else "in flight"):
                        self.closed = True
                        backend.close()  # an asynchronous save's failure surfaces here
            finally:
                self.runlog.close()
                self.progress.close()
        if stopped_by is not None:
            self.say(f"{stopped_by}: stopped at step {step} with checkpoint {as_typed(str(self.last_saved))}; run "
                     "the same command again to resume")
        elif step < t.max_steps:
            self.say(f"stopped at step {step} of {t.max_steps} (--stop-at) with checkpoint "
                     f"{as_typed(str(self.last_saved))}; run the command again without --stop-at to go on")
        else:
            if sample_tokens > 0 and backend.is_main:
                self.say("sample:\n" + backend.sample(sample_tokens, t.seed))
            elif sample_tokens > 0:
                backend.sample(sample_tokens, t.seed)  # every process joins a generation that spans them
            self.say(self.next_steps())
        return RunEnd(step, self.last_saved, stopped_by)

    def loop(self, step: int, position: int, end: int) -> tuple[int, str | None]:
        backend, t = self.backend, self.config.train
        accum, first_step = t.grad_accum_steps, step
        evaluates = t.eval_steps > 0 or bool(self.config.data.hellaswag)
        tick, timed_steps, pending = time.perf_counter(), 0, None
        while step < end:
            with self.failed_saves_end_the_run(step, only_saves=True):  # a background save's failure ends the run
                metrics_of_step = backend.step(position)
            step, position, timed_steps = step + 1, position + accum, timed_steps + 1
            if pending is not None:  # the previous step's metrics: checked a step late, so the device never idles
                self.check(*pending)
            pending = (step, metrics_of_step)
            last = step == t.max_steps
            log_now = step % t.log_interval == 0 or last
            eval_now = evaluates and ((t.eval_interval > 0 and step % t.eval_interval == 0) or last)
            stop_now = self.signals.requested is not None
            if backend.multi_process:  # the processes agree at log steps only, where they wait for the device anyway
                stop_now = log_now and backend.agree(stop_now)
            epoch_done = t.save_every_epoch and backend.epoch_of(position) > backend.epoch_of(position - accum)
            save_now = (t.save_interval > 0 and step % t.save_interval == 0) or step == end or epoch_done or stop_now
            sample_now = t.sample_interval > 0 and step % t.sample_interval == 0 and not last and not stop_now
            metrics = None
            if log_now or eval_now or save_now or sample_now:
                metrics = self.check(*pending)  # nothing is logged, evaluated or saved before its step is known finite
                pending = None
            paused = False  # evaluation, checkpoints and samples are not step time
            if log_now:
                self.log_step(step, metrics, (time.perf_counter() - tick) / timed_steps)
                paused = True
            elif step == first_step + 1:  # that call compiled the step function: keep it out of the step times
                backend.wait()
                self.show(f"step {step:>6} | first step (compilation included) took {time.perf_counter() - tick:.1f} s")
                paused = True
            new_best = False
            if eval_now:
                record = {"step": step, **backend.evaluate()}
                new_best = t.keep_best and record.get("val_loss", math.inf) < self.best_val
                if new_best:
                    self.best_val = record["val_loss"]
                self.runlog.write(record)
                self.show(eval_line(record, t.max_steps) + (" (best so far)" if new_best else ""))
                paused = True
            if save_now:
                self.last_saved = self.save(step, position)
                paused = True
            if new_best:
                self.best_saved = self.save(step, position, best=True, same_as_last=save_now)
                paused = True
            if stop_now:
                return step, self.signals.requested or "a stop signal on another process"
            if sample_now:
                text = backend.sample(200, t.seed)
                self.show(f"--- sample at step {step} ---\n{text}\n---")
                paused = True
            if paused:
                tick, timed_steps = time.perf_counter(), 0
        if pending is not None:
            self.check(*pending)
        return step, None

    def check(self, step: int, metrics_of_step: Callable[[], StepMetrics]) -> StepMetrics:
        """A step's metrics; a non-finite loss (or gradient, but for fp16, whose overflows the loss scale handles)
        stops the run (train.nan_policy = "stop": the step left the state as it was, and nothing is saved) or is
        counted as a skipped update ("skip")."""
        metrics = metrics_of_step()
        fp16 = self.config.train.precision == "fp16"
        if math.isfinite(metrics.loss) and (fp16 or math.isfinite(metrics.grad_norm)):
            return metrics
        if self.config.train.nan_policy == "stop":
            last = as_typed(str(self.last_saved)) if self.last_saved else None
            raise Diverged(divergence_message(step, metrics.loss, metrics.grad_norm, last))
        self.skipped += 1
        self.show(f"step {step}: loss {metrics.loss}, grad norm {metrics.grad_norm}: update skipped "
                  f"(train.nan_policy=skip; {self.skipped} skipped so far)")
        return metrics

    def log_step(self, step: int, metrics: StepMetrics, step_time: float) -> None:
        t, model = self.config.train, self.config.model
        tokens_per_s = t.batch_size * model.block_size / step_time
        record = {"step": step, "loss": metrics.loss, "lr": metrics.lr, "grad_norm": metrics.grad_norm,
                  "tokens_per_s": tokens_per_s, "mfu": mfu(tokens_per_s, model, self.backend.peak_flops,
                                                           model.block_size),
                  "step_time_s": step_time, **metrics.extras}
        if t.nan_policy == "skip":
            record["skipped_steps"] = self.skipped
        memory = self.backend.memory_in_use()
        if memory is not None:
            record["memory_gib"] = memory / 2**30
        self.runlog.write(record)
        line = step_line(record, t.max_steps)
        if self.progress.enabled:
            self.progress.update(step, record["loss"], tokens_per_s, line)
        else:
            self.say(line)

    def save(self, step: int, position: int, **kind) -> str:
        """backend.save, whose failure (a full disk, a read-only or vanished directory) ends the run with one line
        that names the cause; the last good checkpoint stays where it is."""
        with self.failed_saves_end_the_run(step):
            path = self.backend.save(step, position, self.meta(), **kind)
        if not kind.get("best"):
            self.saved.append(path)
        return path

    @contextlib.contextmanager
    def failed_saves_end_the_run(self, step, only_saves: bool = False):
        """The first save that fails ends the run with one line naming it, its cause and the newest checkpoint that
        verifies (after the saves still in flight have ended, quietly: a full disk fails them too)."""
        try:
            yield
        except UserError:
            raise
        except Exception as err:
            if only_saves and not isinstance(err, SaveFailed):
                raise
            if not self.closed:
                self.closed = True
                with contextlib.suppress(Exception):
                    self.backend.close()
            failed = err.path if isinstance(err, SaveFailed) else None
            good = next((path for path in reversed(self.saved) if path != failed and self.backend.verified(path)), None)
            kept = f"the last good checkpoint ({as_typed(good)}) is kept" if good else \
                "no checkpoint of this run was saved" if not self.saved else "no checkpoint of this run reads back"
            what = f"checkpoint {as_typed(failed)}" if failed else \
                f"the checkpoint of step {step} in {as_typed(str(self.run_dir / 'checkpoints'))}"
            raise SaveError(f"could not write {what}: {_cause(err)}; {kept}") from err

    def meta(self) -> dict:
        return {"skipped_steps": self.skipped, "best_val_loss": None if math.isinf(self.best_val) else self.best_val}

    def next_steps(self) -> str:
        """Where the checkpoints are, and the commands that use them, with this run's own paths."""
        run, framework = _shown(self.run_dir), self.backend.framework
        lines = [f"checkpoints: {as_typed(str(self.last_saved))} (last)"]
        best = self.best_saved  # named only where it is: a user may have deleted it, and a run converted from the
        # other trainer's (convert.py --to jax-run|torch-run) has none when the source's best came after its step
        if best and not math.isinf(self.best_val) and Path(best).exists():
            lines[0] += f", {as_typed(best)} (best, val loss {self.best_val:.4f})"
        lines.append("next:")
        sample = f"  python scripts/sample.py --checkpoint {run} --framework {framework}"
        if self.config.data.format == "alpaca":  # the model answers instructions in the template it learned them in
            lines.append(f"{sample} --instruction 'Give three tips for staying healthy.'")
        else:
            lines.append(f"{sample} --prompt 'ROMEO:'")
        if self.config.data.format == "tokens" and self.config.data.val:
            lines.append(f"  python scripts/evaluate.py --checkpoint {run} --framework {framework} --shards "
                         f"{_shown(self.config.data.val)}")
        lines.append(f"  python scripts/convert.py {run} {_shown(str(self.run_dir) + '_hf')} --to hf")
        lines.append(f"  python scripts/serve.py --checkpoint {run} --framework {framework}")
        return "\n".join(lines)


def _cause(err: BaseException) -> str:
    """What went wrong, in one line: an OSError's own words and file (No space left on device: '/x/y'), or the first
    line of whatever a checkpoint library raised around it."""
    if isinstance(err, SaveFailed):
        err = err.cause
    while not isinstance(err, OSError) and (err.__cause__ or err.__context__) is not None:
        err = err.__cause__ or err.__context__
    if isinstance(err, OSError) and err.strerror:
        return err.strerror + (f": '{as_typed(str(err.filename))}'" if err.filename else "")
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:300]}" if lines else type(err).__name__


def _shown(path) -> str:
    """A path as the user would type it in a shell: relative to the working directory where under it, quoted."""
    return shlex.quote(as_typed(str(path)))

