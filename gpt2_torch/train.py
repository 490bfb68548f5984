"""The PyTorch reference trainer: the loop of gpt2_jax/train.py with nn.Module, fused AdamW and DDP, around the
step of gpt2_torch/step.py.

  python scripts/train_torch.py --config shakespeare                                  # one process
  torchrun --standalone --nproc_per_node=8 scripts/train_torch.py --config small      # DDP on one machine

Under torchrun every rank builds the same model from the same seed, reads its own rows of each global micro-batch
(TokenLoader process_index=rank) and DDP averages the gradients, so a config trains the same on any process count.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from gpt2_common.cli import data_paths, resolve_run, train_parser, write_run_config
from gpt2_common.config import Config, ModelConfig, check_divides, dumps_toml, loads_toml, to_dict
from gpt2_common.errors import UserError
from gpt2_common.faults import (Diverged, StopSignals, check_framework, check_same_config, check_same_model,
                                divergence_message, nan_injection_step)
from gpt2_common.flops import mfu, num_params, peak_flops
from gpt2_common.loaders import open_loaders
from gpt2_common.metrics import RunLog, check_logging_packages
from gpt2_common.evaluation import hellaswag_correct, training_hellaswag
from gpt2_common.progress import Progress, eval_line, model_summary, step_line
from gpt2_torch.checkpoint import (BEST_NAME, capture_rng_state, checkpoint_path, link_or_save, load_checkpoint,
                                   newest_resumable, remove_partial_saves, restore_rng_state, save_checkpoint)
from gpt2_torch.evaluate import model_token_nll
from gpt2_torch.model import GPT
from gpt2_torch.optim import load_optimizer_state, make_optimizer, set_lr
from gpt2_torch.sample import sample_text
from gpt2_torch.step import apply_update, autocast, forward_backward


# --- processes and devices ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Distributed:
    """Joins the torchrun job when launched by torchrun (NCCL on GPUs, gloo on CPUs); else one process."""
    if "RANK" not in os.environ:
        return Distributed(0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return Distributed(rank, world_size, device)


def mean_over_ranks(value: torch.Tensor) -> float:
    """The mean of a scalar over all ranks (gloo has no AVG reduction, hence SUM / world size)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value.item()


def to_device(batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader batch (int32 numpy) as int64 tensors on the device; pinned host memory lets the copy run async."""
    out = []
    for array in batch:
        tensor = torch.from_numpy(array)
        if device.type == "cuda":
            tensor = tensor.pin_memory().to(device, non_blocking=True)
        out.append(tensor.long())
    return out[0], out[1]


def hellaswag_scores(model: GPT, examples: list, config: Config, device: torch.device, rank: int,
                     world_size: int) -> dict[str, float]:
    """HellaSwag accuracy over `examples`, each rank scoring every world_size-th of them (build-nanogpt's split)."""
    with autocast(device, config.train.precision):
        counts = hellaswag_correct(examples[rank::world_size], config.model.block_size, model_token_nll(model))
    model.train()  # model_token_nll put it in eval mode
    total = torch.tensor(counts, dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    correct, correct_norm = total.tolist()
    return {"hellaswag_acc": correct / len(examples), "hellaswag_acc_norm": correct_norm / len(examples)}


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, config: Config, device: torch.device) -> float:
    """Mean loss over the fixed validation batches 0..eval_steps-1, averaged over all ranks."""
    model.eval()
    total = torch.zeros((), device=device)
    for position in range(config.train.eval_steps):
        inputs, targets = to_device(loader.batch(position), device)
        with autocast(device, config.train.precision):
            total += model(inputs, targets)
    model.train()
    return mean_over_ranks(total / config.train.eval_steps)


# --- starting points ------------------------------------------------------------------------------------------------

def init_from(path: str, model_config: ModelConfig) -> dict[str, torch.Tensor]:
    """The weights that --init-from names (a PyTorch or JAX checkpoint, or a Hugging Face GPT-2 directory), as a
    state dict for GPT(model_config). A fresh run starts from them; a run that resumes ignores them."""
    try:
        from gpt2_torch.weights import init_state_dict
    except ModuleNotFoundError as err:
        if err.name != "gpt2_torch.weights":
            raise
        raise UserError("--init-from needs the weight conversion of gpt2_torch/weights.py, which this checkout "
                        "lacks; start without --init-from") from None
    return init_state_dict(path, model_config)


def _resume_point(checkpoint_dir: Path, env: Distributed) -> tuple[Path | None, dict | None]:
    """Rank 0 picks the newest checkpoint that reads back whole (skipping damaged ones) and tells the others, so
    that all ranks resume from the same step (the run directory must be on a filesystem every node sees)."""
    found = None
    if env.is_main:
        remove_partial_saves(checkpoint_dir)
        found = newest_resumable(checkpoint_dir)
    choice = [found[0] if found else None]
    if env.world_size > 1:
        dist.broadcast_object_list(choice, src=0)
    if choice[0] is None:
        return None, None
    return choice[0], found[1] if env.is_main else load_checkpoint(choice[0])


def _gather(obj) -> list:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def _poison_loss(module, inputs, output):
    """A forward hook for the NaN test hook (GPT2_INJECT_NAN_AT_STEP): the step's loss becomes NaN."""
    return output * float("nan")


# --- the loop -------------------------------------------------------------------------------------------------------

def train(config: Config, run_dir: str | os.PathLike, init_path: str | None = None, *,
          allow_config_change: bool = False, inject_nan_at: int | None = None) -> None:
    env = setup_distributed()
    try:
        with StopSignals(second_aborts=env.world_size == 1) as signals:
            _train(config, Path(run_dir), init_path, env, allow_config_change=allow_config_change,
                   inject_nan_at=inject_nan_at, signals=signals)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _train(config: Config, run_dir: Path, init_path: str | None, env: Distributed, *,
           allow_config_change: bool = False, inject_nan_at: int | None = None,
           signals: StopSignals | None = None) -> None:
    m, t = config.model, config.train
    device = env.device
    say = print if env.is_main else (lambda *a, **k: None)
    check_divides(t.micro_batch_size, env.world_size, "processes (torchrun's nproc_per_node x nodes)")
    accum = t.grad_accum_steps
    checkpoint_dir = run_dir / "checkpoints"
    check_framework(checkpoint_dir, "torch")
    check_logging_packages(config.logging)

    if env.is_main and config.data.format == "tokens":
        data_paths(config)  # prepares an embedded corpus once, before the other ranks look for its shards
    if env.world_size > 1:
        dist.barrier()
    train_loader, val_loader = open_loaders(config, env.rank, env.world_size, progress=False)
    hellaswag = training_hellaswag(config)

    torch.manual_seed(t.seed)  # the same initial weights on every rank
    raw_model = GPT(m).to(device)
    optimizer = make_optimizer(raw_model, t)
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")

    step, position = 0, 0  # optimizer updates done; the next micro-batch of the train loader
    skipped, best_val = 0, math.inf  # updates skipped for a non-finite loss; the lowest validation loss so far
    last_saved: Path | None = None
    resume_path, checkpoint = _resume_point(checkpoint_dir, env)
    if resume_path is not None:
        saved = loads_toml(checkpoint["config"])
        check_same_model(saved, config, run_dir)
        check_same_config(saved, config, run_dir, allow_config_change)
        raw_model.load_state_dict(checkpoint["model"])
        load_optimizer_state(optimizer, checkpoint["optimizer"])
        if checkpoint["scaler"]:  # empty when the run was not fp16 until now
            scaler.load_state_dict(checkpoint["scaler"])
        step, position = checkpoint["step"], checkpoint["loader_position"]
        skipped, best_val = checkpoint.get("skipped_steps", 0), checkpoint.get("best_val_loss", math.inf)
        if len(checkpoint["rng"]) == env.world_size:
            restore_rng_state(checkpoint["rng"][env.rank])
        else:  # another process count: the dropout streams cannot continue, so start new ones
            torch.manual_seed(t.seed + 1 + env.rank + 1000 * step)
        last_saved = resume_path
        say(f"resuming from {resume_path} at step {step}" + (" (--init-from ignored)" if init_path else ""))
    else:
        if init_path is not None:
            raw_model.load_state_dict(init_from(init_path, m))
            say(f"initialised from {init_path}")
        torch.manual_seed(t.seed + 1 + env.rank)  # each rank its own dropout masks
    del checkpoint
    if env.is_main:
        write_run_config(config, run_dir)

    model = torch.compile(raw_model) if t.compile else raw_model
    ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if env.world_size > 1 else model
    log = RunLog(run_dir, config.logging, enabled=env.is_main, resume_step=step, config_dict=to_dict(config),
                 run_name=config.name)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_flops(device_name, t.precision)
    tokens_per_step = t.batch_size * m.block_size
    if env.is_main and step == 0:
        say(model_summary({name: p.numel() for name, p in raw_model.named_parameters()}))
    say(f"gpt2_torch: {num_params(m) / 1e6:.1f}M parameters | {env.world_size} x {device_name} | "
        f"{t.batch_size} x {m.block_size} tokens a step in {accum} micro-steps of {t.micro_batch_size} | "
        f"{t.precision}{' | compiled' if t.compile else ''} | run dir {run_dir}")
    progress = Progress(t.max_steps, initial_step=step, enabled=env.is_main, stream=sys.stdout)

    def save(best: bool = False, same_as: Path | None = None) -> Path:
        """Every rank calls it (their RNG states are gathered); rank 0 writes step_XXXXXXXX.pt, or best.pt (as a
        link to `same_as` when that is this step's checkpoint)."""
        rng = _gather(capture_rng_state())  # every rank's, so that each continues its own dropout stream
        path = checkpoint_dir / BEST_NAME if best else checkpoint_path(checkpoint_dir, step)
        if env.is_main:
            state = {"step": step, "loader_position": position, "model": raw_model.state_dict(),
                     "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "rng": rng,
                     "config": dumps_toml(config), "skipped_steps": skipped, "best_val_loss": best_val}
            if best:
                link_or_save(state, path, same_as)
            else:
                save_checkpoint(state, path, t.keep_checkpoints)
        return path

    def sample() -> None:
        if env.is_main:
            with autocast(device, t.precision):
                text = sample_text(raw_model, "\n", max_new_tokens=200, seed=t.seed)
            progress.write(f"--- sample at step {step} ---\n{text}\n---")

    if step >= t.max_steps:
        say(f"the run in {run_dir} has already done train.max_steps={t.max_steps} steps; raise it to train on")
        log.close()
        progress.close()
        sample()
        return

    timer, timed_steps = time.perf_counter(), 0
    try:
        while step < t.max_steps:
            micro_batches = [to_device(train_loader.batch(position + k), device) for k in range(accum)]
            lr = set_lr(optimizer, step, t)
            poison = raw_model.register_forward_hook(_poison_loss) if inject_nan_at == step + 1 else None
            loss, grad_norm = forward_backward(ddp_model, optimizer, scaler, micro_batches, config)
            if poison is not None:
                poison.remove()
            # One small all-reduce and one host sync a step: the mean loss over ranks, the grad norm (the same on
            # every rank) and whether any rank got a stop signal, so that all ranks decide alike.
            stop_flag = float(signals is not None and signals.requested is not None)
            probe = torch.stack([loss.float(), grad_norm.float(), torch.tensor(stop_flag, device=device)])
            if env.world_size > 1:
                dist.all_reduce(probe, op=dist.ReduceOp.SUM)
                probe /= env.world_size
            loss_value, norm_value, stop_requested = probe.tolist()
            # fp16 gradients overflow now and then by design: the scaler skips those; only the loss says divergence
            finite = math.isfinite(loss_value) and (t.precision == "fp16" or math.isfinite(norm_value))
            if not finite and t.nan_policy == "stop":
                optimizer.zero_grad(set_to_none=True)
                raise Diverged(divergence_message(step + 1, loss_value, norm_value,
                                                  str(last_saved) if last_saved else None))
            apply_update(optimizer, scaler, skip=not finite)
            step, position, timed_steps = step + 1, position + accum, timed_steps + 1
            last = step == t.max_steps
            if not finite:
                skipped += 1
                progress.write(f"step {step}: loss {loss_value}, grad norm {norm_value}: update skipped "
                               f"(train.nan_policy=skip; {skipped} skipped so far)")

            if step % t.log_interval == 0 or last:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                step_time = (time.perf_counter() - timer) / timed_steps
                tokens_per_s = tokens_per_step / step_time
                utilisation = mfu(tokens_per_s, m, peak * env.world_size if peak else None)
                record = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": norm_value,
                          "tokens_per_s": tokens_per_s, "mfu": utilisation, "step_time_s": step_time}
                if t.nan_policy == "skip":
                    record["skipped_steps"] = skipped
                if device.type == "cuda":
                    record["memory_gib"] = torch.cuda.memory_allocated(device) / 2**30
                log.write(record)
                progress.update(step, loss_value, tokens_per_s, step_line(record, t.max_steps))
                timer, timed_steps = time.perf_counter(), 0

            paused, saved_now, new_best = False, False, False  # evaluation, checkpoints, samples: not step time
            if (t.eval_steps > 0 or hellaswag is not None) and \
                    ((t.eval_interval > 0 and step % t.eval_interval == 0) or last):
                record = {"step": step}
                if t.eval_steps > 0:
                    record["val_loss"] = evaluate(model, val_loader, config, device)
                    new_best = t.keep_best and record["val_loss"] < best_val
                    best_val = min(best_val, record["val_loss"]) if t.keep_best else best_val
                if hellaswag is not None:
                    record.update(hellaswag_scores(raw_model, hellaswag, config, device, env.rank, env.world_size))
                log.write(record)
                progress.write(eval_line(record, t.max_steps) + (" (best so far)" if new_best else ""))
                paused = True
            epoch_done = t.save_every_epoch and \
                train_loader.epoch_of(position) > train_loader.epoch_of(position - accum)
            if (t.save_interval > 0 and step % t.save_interval == 0) or last or epoch_done or stop_requested:
                last_saved, saved_now, paused = save(), True, True
            if new_best:
                save(best=True, same_as=last_saved if saved_now else None)
                paused = True
            if stop_requested:
                name = signals.requested if signals and signals.requested else "a stop signal"
                progress.write(f"{name} on a rank: stopped at step {step} with checkpoint {last_saved}; run the "
                               "same command again to resume")
                return
            if t.sample_interval > 0 and step % t.sample_interval == 0 and not last:
                sample()
                paused = True
            if paused:
                timer, timed_steps = time.perf_counter(), 0
    finally:
        log.close()
        progress.close()
    sample()


def main(argv: list[str] | None = None) -> None:
    parser = train_parser("Train GPT-2 with the PyTorch reference trainer; under torchrun for DDP. SIGTERM or "
                          "Ctrl-C stops after the current step with a checkpoint; the same command resumes.")
    args = parser.parse_args(argv)
    config, run_dir = resolve_run(args)
    train(config, run_dir, init_path=args.init_from, allow_config_change=args.allow_config_change,
          inject_nan_at=nan_injection_step())
