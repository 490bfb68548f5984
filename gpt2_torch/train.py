"""The PyTorch reference trainer: the loop of gpt2_jax/train.py with nn.Module, fused AdamW and DDP.

  python scripts/train_torch.py --config shakespeare                                  # one process
  torchrun --standalone --nproc_per_node=8 scripts/train_torch.py --config small      # DDP on one machine

Under torchrun every rank builds the same model from the same seed, reads its own rows of each global micro-batch
(TokenLoader process_index=rank) and DDP averages the gradients, so a config trains the same on any process count.
"""

from __future__ import annotations

import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from gpt2_common.cli import data_paths, resolve_run, train_parser, write_run_config
from gpt2_common.config import Config, ModelConfig, check_divides, dumps_toml, loads_toml
from gpt2_common.data import TokenLoader
from gpt2_common.errors import UserError
from gpt2_common.flops import flops_per_token, mfu, num_params, peak_flops
from gpt2_common.metrics import MetricsWriter
from gpt2_torch.checkpoint import (capture_rng_state, checkpoint_path, latest_checkpoint, load_checkpoint,
                                   restore_rng_state, save_checkpoint)
from gpt2_torch.model import GPT
from gpt2_torch.optim import clip_gradients, load_optimizer_state, make_optimizer, set_lr
from gpt2_torch.sample import sample_text


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


def autocast(device: torch.device, precision: str):
    """bf16/fp16 matmuls with fp32 master weights; LayerNorm and the loss stay fp32 (autocast's own lists)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def to_device(batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader batch (int32 numpy) as int64 tensors on the device; pinned host memory lets the copy run async."""
    out = []
    for array in batch:
        tensor = torch.from_numpy(array)
        if device.type == "cuda":
            tensor = tensor.pin_memory().to(device, non_blocking=True)
        out.append(tensor.long())
    return out[0], out[1]


# --- one optimizer step -------------------------------------------------------------------------------------------

def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               micro_batches, update: int, config: Config) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One optimizer update over a list of (inputs, targets) micro-batches; returns (loss, pre-clip grad norm, lr).

    The loss and the gradients are the means over the micro-batches. Under DDP the gradients are all-reduced only
    on the last micro-batch (no_sync before it), which is what makes accumulation cheap across processes.
    """
    train, device = config.train, next(model.parameters()).device
    lr = set_lr(optimizer, update, train)
    total_loss = torch.zeros((), device=device)
    for k, (inputs, targets) in enumerate(micro_batches):
        last = k == len(micro_batches) - 1
        with model.no_sync() if isinstance(model, DDP) and not last else nullcontext():
            with autocast(device, train.precision):
                loss = model(inputs, targets)
            scaler.scale(loss / len(micro_batches)).backward()
        total_loss += loss.detach()
    scaler.unscale_(optimizer)  # clip and report the true gradients, not the fp16 loss-scaled ones
    grad_norm = clip_gradients(model.parameters(), train.grad_clip)
    scaler.step(optimizer)  # skipped by the scaler when fp16 gradients are not finite
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total_loss / len(micro_batches), grad_norm, lr


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: TokenLoader, config: Config, device: torch.device) -> float:
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

def _architecture(model: ModelConfig) -> ModelConfig:
    """The fields that decide the parameters' shapes (dropout and the attention kernel do not)."""
    return replace(model, dropout=0.0, attention="auto")


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


def _newest_checkpoint(checkpoint_dir: Path, env: Distributed) -> Path | None:
    """Rank 0 picks the checkpoint and tells the others, so that all ranks resume from the same step (the run
    directory must be on a filesystem every node sees)."""
    choice = [latest_checkpoint(checkpoint_dir) if env.is_main else None]
    if env.world_size > 1:
        dist.broadcast_object_list(choice, src=0)
    return choice[0]


def _gather(obj) -> list:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


# --- the loop -------------------------------------------------------------------------------------------------------

def train(config: Config, run_dir: str | os.PathLike, init_path: str | None = None) -> None:
    env = setup_distributed()
    try:
        _train(config, Path(run_dir), init_path, env)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _train(config: Config, run_dir: Path, init_path: str | None, env: Distributed) -> None:
    m, t = config.model, config.train
    device = env.device
    say = print if env.is_main else (lambda *a, **k: None)
    check_divides(t.micro_batch_size, env.world_size, "processes (torchrun's nproc_per_node x nodes)")
    accum = t.grad_accum_steps

    if env.is_main:
        data_paths(config)  # prepares an embedded corpus once, before the other ranks look for its shards
    if env.world_size > 1:
        dist.barrier()
    train_paths, val_paths = data_paths(config, progress=False)
    shard = dict(process_index=env.rank, process_count=env.world_size, vocab_size=m.vocab_size)
    train_loader = TokenLoader(train_paths, t.micro_batch_size, m.block_size, seed=t.seed, shuffle=True, **shard)
    val_loader = TokenLoader(val_paths, t.micro_batch_size, m.block_size, shuffle=False, **shard)

    torch.manual_seed(t.seed)  # the same initial weights on every rank
    raw_model = GPT(m).to(device)
    optimizer = make_optimizer(raw_model, t)
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")

    checkpoint_dir = run_dir / "checkpoints"
    step, position = 0, 0  # optimizer updates done; the next micro-batch of the train loader
    resume_path = _newest_checkpoint(checkpoint_dir, env)
    if resume_path is not None:
        checkpoint = load_checkpoint(resume_path)
        saved = loads_toml(checkpoint["config"])
        if _architecture(saved.model) != _architecture(m):
            raise UserError(f"run directory '{run_dir}' holds checkpoints of another model ({saved.model}); "
                            "give a new --run-dir or the config it was trained with")
        raw_model.load_state_dict(checkpoint["model"])
        load_optimizer_state(optimizer, checkpoint["optimizer"])
        if checkpoint["scaler"]:  # empty when the run was not fp16 until now
            scaler.load_state_dict(checkpoint["scaler"])
        step, position = checkpoint["step"], checkpoint["loader_position"]
        if len(checkpoint["rng"]) == env.world_size:
            restore_rng_state(checkpoint["rng"][env.rank])
        else:  # another process count: the dropout streams cannot continue, so start new ones
            torch.manual_seed(t.seed + 1 + env.rank + 1000 * step)
        say(f"resuming from {resume_path} at step {step}")
    else:
        if init_path is not None:
            raw_model.load_state_dict(init_from(init_path, m))
            say(f"initialised from {init_path}")
        torch.manual_seed(t.seed + 1 + env.rank)  # each rank its own dropout masks
    if env.is_main:
        write_run_config(config, run_dir)

    model = torch.compile(raw_model) if t.compile else raw_model
    ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if env.world_size > 1 else model
    metrics = MetricsWriter(run_dir, enabled=env.is_main)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_flops(device_name, t.precision)
    tokens_per_step = t.batch_size * m.block_size
    say(f"gpt2_torch: {num_params(m) / 1e6:.1f}M parameters | {env.world_size} x {device_name} | "
        f"{t.batch_size} x {m.block_size} tokens a step in {accum} micro-steps of {t.micro_batch_size} | "
        f"{t.precision}{' | compiled' if t.compile else ''} | run dir {run_dir}")

    def save() -> None:
        rng = _gather(capture_rng_state())  # every rank's, so that each continues its own dropout stream
        if env.is_main:
            save_checkpoint({"step": step, "loader_position": position, "model": raw_model.state_dict(),
                             "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "rng": rng,
                             "config": dumps_toml(config)}, checkpoint_path(checkpoint_dir, step), t.keep_checkpoints)

    def sample() -> None:
        if env.is_main:
            with autocast(device, t.precision):
                text = sample_text(raw_model, "\n", max_new_tokens=200, seed=t.seed)
            say(f"--- sample at step {step} ---\n{text}\n---")

    if step >= t.max_steps:
        say(f"the run in {run_dir} has already done train.max_steps={t.max_steps} steps; raise it to train on")
        sample()
        return

    timer, timed_steps = time.perf_counter(), 0
    while step < t.max_steps:
        micro_batches = [to_device(train_loader.batch(position + k), device) for k in range(accum)]
        loss, grad_norm, lr = train_step(ddp_model, optimizer, scaler, micro_batches, step, config)
        step, position, timed_steps = step + 1, position + accum, timed_steps + 1
        last = step == t.max_steps

        if step % t.log_interval == 0 or last:
            loss_value = mean_over_ranks(loss)  # waits for the device, so the time below is the real one
            step_time = (time.perf_counter() - timer) / timed_steps
            tokens_per_s = tokens_per_step / step_time
            utilisation = mfu(tokens_per_s, m, peak * env.world_size if peak else None)
            metrics.write({"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm.item(),
                           "tokens_per_s": tokens_per_s, "mfu": utilisation, "step_time_s": step_time})
            say(f"step {step:6d}/{t.max_steps} | loss {loss_value:.4f} | lr {lr:.3e} | norm {grad_norm.item():.3f} | "
                f"{step_time * 1000:.0f} ms | {tokens_per_s:,.0f} tok/s"
                + (f" | mfu {100 * utilisation:.1f}%" if utilisation is not None else ""))
            timer, timed_steps = time.perf_counter(), 0

        paused = False  # evaluation, checkpoints and samples stay out of the step time
        if t.eval_steps > 0 and ((t.eval_interval > 0 and step % t.eval_interval == 0) or last):
            val_loss = evaluate(model, val_loader, config, device)
            metrics.write({"step": step, "val_loss": val_loss})
            say(f"step {step:6d}/{t.max_steps} | val loss {val_loss:.4f}")
            paused = True
        if (t.save_interval > 0 and step % t.save_interval == 0) or last:
            save()
            paused = True
        if t.sample_interval > 0 and step % t.sample_interval == 0 and not last:
            sample()
            paused = True
        if paused:
            timer, timed_steps = time.perf_counter(), 0
    metrics.close()
    sample()


def main(argv: list[str] | None = None) -> None:
    parser = train_parser("Train GPT-2 with the PyTorch reference trainer; under torchrun for DDP.")
    args = parser.parse_args(argv)
    config, run_dir = resolve_run(args)
    train(config, run_dir, init_path=args.init_from)
