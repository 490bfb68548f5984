"""The JAX trainer's loop and command line: runs the steps that gpt2_jax.step compiles over the mesh, with
checkpoints, evaluation, logging and resume."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from gpt2_common.cli import data_paths, resolve_run, train_parser, write_run_config
from gpt2_common.config import Config, DataConfig, LoggingConfig, loads_toml, to_dict
from gpt2_common.errors import UserError
from gpt2_common.faults import (Diverged, StopSignals, check_framework, check_same_config, check_same_model,
                                divergence_message, nan_injection_step, warn)
from gpt2_common.flops import mfu, num_params, peak_flops
from gpt2_common.loaders import open_loaders
from gpt2_common.metrics import RunLog, check_logging_packages
from gpt2_common.evaluation import hellaswag_correct, training_hellaswag
from gpt2_common.progress import Progress, eval_line, model_summary, step_line
from gpt2_common.schedule import lr_at  # equals the optimizer's schedule (tests/test_jax_optim.py checks it)
from gpt2_common.tokenizer import decode, get_tokenizer
from gpt2_jax import checkpoint, distributed, sharding
from gpt2_jax.evaluate import model_token_nll
from gpt2_jax.optim import uses_multisteps
from gpt2_jax.sample import generate
from gpt2_jax.step import Trainer, TrainState, build_trainer


_compiled_trainer = functools.lru_cache(maxsize=4)(build_trainer)


def _cached_trainer(config: Config, mesh: Mesh) -> Trainer:
    """Runs of one config in one process (a notebook, a sweep, a test that stops and resumes) compile their steps
    once; so do configs that differ only in what the steps never see (data, logging, how often to log, evaluate or
    save, the NaN policy)."""
    t = config.train
    key = dataclasses.replace(config, name="", data=DataConfig(), logging=LoggingConfig(), train=dataclasses.replace(
        t, eval_interval=0, save_interval=0, keep_checkpoints=1, log_interval=1, sample_interval=0, keep_best=True,
        save_every_epoch=False, nan_policy="stop"))
    trainer = _compiled_trainer(key, mesh)
    return dataclasses.replace(trainer, config=config)


# --- the loop -------------------------------------------------------------------------------------------------------

def train(config: Config, run_dir: Path, *, init_from: str | None = None, stop_at: int | None = None,
          sample_tokens: int = 200, devices: list | None = None, log: Callable[[str], None] = print,
          allow_config_change: bool = False, inject_nan_at: int | None = None) -> TrainState:
    """Trains `config` in `run_dir` to train.max_steps (or `stop_at`), resuming from its newest checkpoint that
    reads back. SIGTERM/SIGINT stop it after the current step with a checkpoint (in a multi-process job, at the next
    log step, where the processes agree on it). `inject_nan_at`: the NaN test hook, a step whose loss is NaN."""
    with StopSignals(second_aborts=jax.process_count() == 1) as signals:
        return _train(config, Path(run_dir), init_from=init_from, stop_at=stop_at, sample_tokens=sample_tokens,
                      devices=devices, log=log, allow_config_change=allow_config_change,
                      inject_nan_at=inject_nan_at, signals=signals)


def _train(config: Config, run_dir: Path, *, init_from, stop_at, sample_tokens, devices, log, allow_config_change,
           inject_nan_at, signals: StopSignals) -> TrainState:
    t, seq_len = config.train, config.model.block_size
    main_process = jax.process_index() == 0
    multi_process = jax.process_count() > 1
    say = log if main_process else (lambda _: None)
    checkpoint_dir = run_dir / "checkpoints"
    check_framework(checkpoint_dir, "jax")
    check_logging_packages(config.logging)
    mesh = sharding.make_mesh(config.mesh, devices)
    trainer = _cached_trainer(config, mesh)
    train_loader, val_loader = _loaders(config, trainer)
    _drop_partial_saves(checkpoint_dir, main_process)
    manager = checkpoint.checkpoint_manager(checkpoint_dir, t.keep_checkpoints)
    best_manager = None  # checkpoints/best: the lowest validation loss so far, made on first use
    try:
        state, position, meta = _restore_or_init(trainer, manager, init_from, say, run_dir, allow_config_change)
    except BaseException:
        manager.close()
        raise
    if main_process:
        write_run_config(config, run_dir)  # only now: a refused resume leaves the run's config.toml as it was
    step = first_step = int(jax.device_get(state.step))
    skipped, best_val = int(meta.get("skipped_steps", 0)), meta.get("best_val_loss")
    best_val = math.inf if best_val is None else float(best_val)
    last_saved = f"{checkpoint_dir / str(step)}" if step else None
    end = t.max_steps if stop_at is None else min(stop_at, t.max_steps)
    writer = RunLog(run_dir, config.logging, enabled=main_process, resume_step=step, config_dict=to_dict(config),
                    run_name=config.name)
    val_batches = [trainer.put(val_loader.batch(i)) for i in range(t.eval_steps)]
    hellaswag = training_hellaswag(config)
    peak = peak_flops(jax.devices()[0].device_kind, t.precision)
    peak = peak * jax.device_count() if peak else None
    fp16 = t.precision == "fp16"
    if step == 0:
        say(model_summary(_param_counts(trainer.abstract_state.params)))
    accumulation = f" ({t.accumulation})" if t.grad_accum_steps > 1 else ""
    say(f"{config.name}: {num_params(config.model) / 1e6:.1f}M parameters, {jax.device_count()} "
        f"{jax.devices()[0].device_kind} devices as {dict(mesh.shape)}, {t.precision}, "
        f"{t.grad_accum_steps} micro-batch(es) a step{accumulation}; steps {step} -> {end}")
    # A bar on a terminal; plain lines through `log` otherwise (a caller's own `log` gets them all).
    progress = Progress(t.max_steps, initial_step=step, enabled=main_process and log is print, stream=sys.stdout)
    show = progress.write if progress.enabled else say

    def save(target, state) -> None:
        checkpoint.save(target, state, config, position, {"skipped_steps": skipped, "best_val_loss":
                                                          None if math.isinf(best_val) else best_val})

    def check(pending) -> None:
        """The divergence check of a step, made one step late so that the host never stalls the device."""
        nonlocal skipped
        pending_step, metrics = pending
        loss, norm = (float(v) for v in jax.device_get((metrics["loss"], metrics["grad_norm"])))
        # fp16 gradients overflow now and then by design (the loss scale handles it); only the loss says divergence
        if math.isfinite(loss) and (fp16 or math.isfinite(norm)):
            return
        if t.nan_policy == "stop":  # the step skipped its update in the graph: the state holds no NaN
            raise Diverged(divergence_message(pending_step, loss, norm, last_saved))
        skipped += 1
        show(f"step {pending_step}: loss {loss}, grad norm {norm}: update skipped (train.nan_policy=skip; "
             f"{skipped} skipped so far)")

    stopped_by = None
    try:
        tick, timed_steps, pending = time.perf_counter(), 0, None
        while step < end:
            state, metrics = trainer.step(state, train_loader, position, poison=inject_nan_at == step + 1)
            step, position, timed_steps = step + 1, position + t.grad_accum_steps, timed_steps + 1
            if pending is not None:
                check(pending)
            pending = (step, metrics)
            log_now = step % t.log_interval == 0 or step == t.max_steps
            eval_now = (bool(val_batches) or hellaswag is not None) and (
                (t.eval_interval > 0 and step % t.eval_interval == 0) or step == t.max_steps)
            stop_now = signals.requested is not None
            if multi_process:  # the processes agree at log steps only, where they wait for the device anyway
                stop_now = log_now and bool(multihost_utils.process_allgather(np.int32(stop_now)).max())
            epoch_done = t.save_every_epoch and \
                train_loader.epoch_of(position) > train_loader.epoch_of(position - t.grad_accum_steps)
            save_now = (t.save_interval > 0 and step % t.save_interval == 0) or step == end or epoch_done or stop_now
            if log_now or eval_now or save_now:
                check(pending)  # nothing is logged, evaluated or saved before its step is known to be finite
                pending = None
            if log_now:
                metrics = jax.device_get(metrics)
                step_time = (time.perf_counter() - tick) / timed_steps
                tokens_per_s = t.batch_size * seq_len / step_time
                record = {"step": step, "loss": float(metrics["loss"]), "lr": lr_at(step - 1, t),
                          "grad_norm": float(metrics["grad_norm"]), "tokens_per_s": tokens_per_s,
                          "mfu": mfu(tokens_per_s, config.model, peak, seq_len), "step_time_s": step_time}
                if "loss_scale" in metrics:
                    record["loss_scale"] = float(metrics["loss_scale"])
                if t.nan_policy == "skip":
                    record["skipped_steps"] = skipped
                memory = _memory_in_use()
                if memory is not None:
                    record["memory_gib"] = memory / 2**30
                writer.write(record)
                line = step_line(record, t.max_steps)
                progress.update(step, record["loss"], tokens_per_s, line) if progress.enabled else say(line)
                tick, timed_steps = time.perf_counter(), 0
            elif step == first_step + 1:  # that call compiled the step function: keep it out of the step times
                jax.block_until_ready(state)
                show(f"step {step:>6} | compiled and ran in {time.perf_counter() - tick:.1f} s")
                tick, timed_steps = time.perf_counter(), 0
            new_best = False
            if eval_now:
                record = {"step": step}
                if val_batches:
                    losses = [trainer.eval_step(state.params, batch) for batch in val_batches]
                    record["val_loss"] = float(np.mean(jax.device_get(losses)))
                    new_best = t.keep_best and record["val_loss"] < best_val
                    best_val = min(best_val, record["val_loss"]) if t.keep_best else best_val
                if hellaswag is not None:
                    record.update(_hellaswag_scores(trainer, state.params, hellaswag))
                writer.write(record)
                show(eval_line(record, t.max_steps) + (" (best so far)" if new_best else ""))
                tick, timed_steps = time.perf_counter(), 0  # step times leave evaluation out
            if save_now:
                save(manager, state)
                last_saved = str(checkpoint_dir / str(step))
            if new_best:
                if best_manager is None:
                    best_manager = checkpoint.checkpoint_manager(checkpoint_dir / checkpoint.BEST_DIR, 1)
                save(best_manager, state)
            if stop_now:
                stopped_by = signals.requested or "a stop signal on another process"
                break
        if pending is not None:
            check(pending)
    finally:  # an interrupted run still finishes the checkpoint it was writing, and keeps its metrics
        for m in (manager, best_manager):
            if m is not None:
                m.wait_until_finished()
                m.close()
        writer.close()
        progress.close()
    if stopped_by is not None:
        say(f"{stopped_by}: stopped at step {step} with checkpoint {last_saved}; run the same command again to "
            "resume")
        return state
    if step >= t.max_steps and sample_tokens > 0:
        say("sample:\n" + _sample_text(trainer, state.params, sample_tokens, t.seed))
    return state


def _param_counts(params: Any) -> dict[str, int]:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): int(np.prod(leaf.shape)) for path, leaf in leaves}


def _memory_in_use() -> int | None:
    """Bytes in use on this process's first device, where the device reports it (GPUs and TPUs; not the CPU)."""
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # some backends raise rather than return None
        return None
    return stats.get("bytes_in_use") if stats else None


def _drop_partial_saves(checkpoint_dir: Path, main_process: bool) -> None:
    """Names, then deletes, the temporary folders of saves that a kill cut short (orbax never reads them)."""
    pattern = f"*{checkpoint.PARTIAL_SUFFIX}*"
    for partial in sorted([*checkpoint_dir.glob(pattern), *(checkpoint_dir / checkpoint.BEST_DIR).glob(pattern)]):
        if main_process and partial.is_dir():
            warn(f"skipping partial checkpoint {partial} (its save did not finish)")
            shutil.rmtree(partial, ignore_errors=True)


def _loaders(config: Config, trainer: Trainer):
    """Train and validation loaders for this process's rows of every micro-batch."""
    if config.data.format == "tokens" and jax.process_count() > 1:
        if jax.process_index() == 0:  # one process prepares an embedded corpus; the others wait, then read it
            data_paths(config)
        multihost_utils.sync_global_devices("gpt2_jax: data prepared")
    t = config.train
    index, count = sharding.process_rows(trainer.micro_batch_sharding, (t.micro_batch_size, config.model.block_size))
    return open_loaders(config, index, count, progress=jax.process_index() == 0)


def _restore_or_init(trainer: Trainer, manager, init_from: str | None, say, run_dir: Path,
                     allow_config_change: bool) -> tuple[TrainState, int, dict]:
    """(state, loader position, meta): the newest checkpoint that reads back (each damaged one after it is skipped
    with a warning), else a new state (from --init-from's weights when given)."""
    config = trainer.config
    steps = sorted(manager.all_steps())
    if not steps:
        params = checkpoint.init_params_from(init_from, config) if init_from else None
        return trainer.init(jax.random.PRNGKey(config.train.seed), params), 0, {}
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            trainer.abstract_state, trainer.state_shardings)
    for step in reversed(steps):
        step_dir = Path(manager.directory) / str(step)
        try:
            saved = loads_toml(checkpoint.read_meta(step_dir)["config_toml"])
        except Exception as err:
            warn(f"skipping checkpoint {step_dir}: its meta does not read ({_first_line(err)}); trying the one before")
            continue
        check_same_model(saved, config, run_dir)
        _check_resumable(saved, config, manager.directory)
        check_same_config(saved, config, run_dir, allow_config_change)
        try:
            state, meta = checkpoint.restore(manager, abstract, step)
        except Exception as err:
            warn(f"skipping checkpoint {step_dir}: it does not restore ({_first_line(err)}); trying the one before")
            continue
        say(f"resumed from step {meta['step']} in {manager.directory}" + (" (--init-from ignored)" if init_from else ""))
        return state, int(meta["loader_position"]), meta
    raise UserError(f"none of the {len(steps)} checkpoints in '{manager.directory}' restores; move them away to "
                    "start afresh, or give another --run-dir")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


def _check_resumable(saved: Config, config: Config, directory) -> None:
    """A checkpoint restores only into a train state of the same structure; say which setting differs."""
    differences = []
    if not checkpoint.same_architecture(saved, config):
        differences.append(f"model ({saved.model} vs now {config.model})")
    if uses_multisteps(saved.train) != uses_multisteps(config.train):
        differences.append(f"train.accumulation or the number of micro-batches ({saved.train.accumulation}, "
                           f"{saved.train.grad_accum_steps} vs now {config.train.accumulation}, "
                           f"{config.train.grad_accum_steps})")
    if (saved.train.precision == "fp16") != (config.train.precision == "fp16"):
        differences.append(f"train.precision ({saved.train.precision} vs now {config.train.precision})")
    if differences:
        raise UserError(f"{directory} holds checkpoints of another setup: {'; '.join(differences)}; run with the "
                        "config that wrote them, or pass another --run-dir")


def _hellaswag_scores(trainer: Trainer, params: Any, examples: list) -> dict[str, float]:
    """Every process scores every example (the parameters may span them all) and gets the same counts."""
    token_nll = model_token_nll(trainer.model, params, trainer.mesh)
    correct, correct_norm = hellaswag_correct(examples, trainer.config.model.block_size, token_nll)
    return {"hellaswag_acc": correct / len(examples), "hellaswag_acc_norm": correct_norm / len(examples)}


def _sample_text(trainer: Trainer, params: Any, max_new_tokens: int, seed: int) -> str:
    newline = get_tokenizer().encode_ordinary("\n")
    prompt = newline if max(newline) < trainer.config.model.vocab_size else [0]
    tokens = generate(trainer.model, params, prompt, max_new_tokens, temperature=0.8, top_k=200, seed=seed,
                      sharding=sharding.replicated(trainer.mesh))
    return decode(list(prompt) + tokens[0].tolist())


def build_parser() -> argparse.ArgumentParser:
    parser = train_parser("Train GPT-2 with JAX (Flax, optax, orbax) on a mesh of devices; running the same "
                          "command again resumes from the run directory's newest checkpoint.")
    parser.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                        help="stop with a checkpoint once STEP optimizer steps are done (e.g. to fit a job's time "
                        "limit); the schedule still runs to train.max_steps, and running again resumes")
    parser.add_argument("--sample-tokens", type=int, default=200,
                        help="tokens of text to sample at the end of training (0: no sample)")
    distributed.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    config, run_dir = resolve_run(args)
    train(config, run_dir, init_from=args.init_from, stop_at=args.stop_at, sample_tokens=args.sample_tokens,
          allow_config_change=args.allow_config_change, inject_nan_at=nan_injection_step())
