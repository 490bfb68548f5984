"""The PyTorch reference trainer: its backend for the run policy of gpt2_common/run.py (nn.Module, fused AdamW and
DDP around the step of gpt2_torch/step.py, .pt checkpoints), and its command line.

  python scripts/train_torch.py --config shakespeare                                  # one process
  torchrun --standalone --nproc_per_node=8 scripts/train_torch.py --config small      # DDP on one machine

Under torchrun every rank builds the same model from the same seed, reads its own rows of each global micro-batch
(TokenLoader process_index=rank) and DDP averages the gradients, so a config trains the same on any process count.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from gpt2_common import run
from gpt2_common.config import Config, check_divides, dumps_toml, loads_toml
from gpt2_common.evaluation import hellaswag_correct, training_hellaswag
from gpt2_common.faults import check_same_config, check_same_model, warn
from gpt2_common.flops import peak_flops
from gpt2_common.loaders import data_paths, open_loaders
from gpt2_common.named_inputs import fetch_named_inputs
from gpt2_common.metrics import check_logging_packages
from gpt2_formats import check_framework, init_weights
from gpt2_torch.checkpoint import (BEST_NAME, capture_rng_state, checkpoint_path, link_or_save,
                                   load_checkpoint, newest_resumable, remove_partial_saves, restore_rng_state,
                                   save_checkpoint, set_aside_after, verified)
from gpt2_torch.layout import resume_step
from gpt2_torch.distributed import Distributed, gather_objects, mean_over_ranks, setup_distributed, to_device
from gpt2_torch.evaluate import model_token_nll
from gpt2_torch.model import GPT
from gpt2_torch.optim import load_optimizer_state, make_optimizer, set_lr
from gpt2_torch.sample import sample_text
from gpt2_torch.step import apply_update, autocast, forward_backward
from gpt2_torch.weights import from_canonical


# --- the backend ----------------------------------------------------------------------------------------------------

class TorchBackend:
    """The run policy's backend for one process of a (torchrun) job: the model, optimizer and scaler live here."""

    framework = "torch"

    def __init__(self, config: Config, run_dir: Path, env: Distributed, *, init_from: str | None = None,
                 resume_from: str | None = None, allow_config_change: bool = False):
        m, t = config.model, config.train
        self.config, self.run_dir, self.env, self.init_from = config, Path(run_dir), env, init_from
        self.resume_from = resume_from
        self.allow_config_change = allow_config_change
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.device, self.is_main, self.multi_process = env.device, env.is_main, env.world_size > 1
        check_divides(t.micro_batch_size, env.world_size, "processes (torchrun's nproc_per_node x nodes)")
        check_framework(self.checkpoint_dir, "torch")
        check_logging_packages(config.logging)
        if env.is_main:  # before the other ranks look: named inputs fetched, an embedded corpus prepared, once
            fetch_named_inputs(config, init_from)
            if config.data.format == "tokens":
                data_paths(config)
        if env.world_size > 1:
            dist.barrier()
        self.train_loader, self.val_loader = open_loaders(config, env.rank, env.world_size, progress=False)
        self.hellaswag = training_hellaswag(config)
        torch.manual_seed(t.seed)  # the same initial weights on every rank
        self.raw_model = GPT(m).to(self.device)
        self.optimizer = make_optimizer(self.raw_model, t)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=t.precision == "fp16")
        self.device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        peak = peak_flops(self.device_name, t.precision)
        self.peak_flops = peak * env.world_size if peak else None
        self.step_index = 0  # optimizer updates done, for the learning rate of the next

    def describe(self) -> str:
        return f"{self.env.world_size} x {self.device_name} process(es)"

    def param_counts(self) -> dict[str, int]:
        return {name: p.numel() for name, p in self.raw_model.named_parameters()}

    def start(self) -> run.Start:
        """Rank 0 picks the newest checkpoint that reads back whole (skipping damaged ones) and tells the others, so
        that all ranks resume from the same step (the run directory must be on a filesystem every node sees)."""
        env, t = self.env, self.config.train
        found, set_aside_in = None, None
        if env.is_main:
            remove_partial_saves(self.checkpoint_dir)
            if self.resume_from:
                where = set_aside_after(self.checkpoint_dir, resume_step(self.resume_from, self.checkpoint_dir))
                set_aside_in = str(where) if where else None
            found = newest_resumable(self.checkpoint_dir, strict=bool(self.resume_from))
        choice = [found[0] if found else None]
        if env.world_size > 1:
            dist.broadcast_object_list(choice, src=0)
        start = run.Start()
        if choice[0] is not None:
            state = found[1] if env.is_main else load_checkpoint(choice[0])
            start = dataclasses.replace(self._restore(choice[0], state), set_aside=set_aside_in)
        else:
            if self.init_from is not None:
                model = self.config.model
                self.raw_model.load_state_dict(from_canonical(init_weights(self.init_from, model), model))
                start = run.Start(initialised_from=self.init_from)
            torch.manual_seed(t.seed + 1 + env.rank)  # each rank its own dropout masks
        self.compiled = torch.compile(self.raw_model) if t.compile else self.raw_model  # what evaluation runs
        self.model = DDP(self.compiled, device_ids=[self.device.index] if self.device.type == "cuda" else None) \
            if env.world_size > 1 else self.compiled
        # The first batches are read once here: a shard of another tokenizer ends the run before it writes anything.
        self.train_loader.batch(start.position)
        for position in range(t.eval_steps):
            self.val_loader.batch(position)
        return start

    def _restore(self, path: Path, state: dict) -> run.Start:
        saved = loads_toml(state["config"])
        check_same_model(saved, self.config, self.run_dir)
        check_same_config(saved, self.config, self.run_dir, self.allow_config_change)
        self.raw_model.load_state_dict(state["model"])
        load_optimizer_state(self.optimizer, state["optimizer"])
        if state["scaler"]:  # empty when the run was not fp16 until now
            self.scaler.load_state_dict(state["scaler"])
        step = self.step_index = state["step"]
        if len(state["rng"]) == self.env.world_size:
            restore_rng_state(state["rng"][self.env.rank])
        else:  # another process count: the dropout streams cannot continue, so start new ones
            torch.manual_seed(self.config.train.seed + 1 + self.env.rank + 1000 * step)
        if self.init_from:
            warn(f"--init-from {self.init_from} ignored: the run resumes from its own checkpoint")
        best, best_file = state.get("best_val_loss"), self.checkpoint_dir / BEST_NAME  # a newer one is set aside
        return run.Start(step=step, position=state["loader_position"], skipped_steps=state.get("skipped_steps", 0),
                         best_val_loss=math.inf if best is None else float(best), resumed_from=str(path),
                         best_checkpoint=str(best_file) if best_file.is_file() else None)

    def step(self, position: int) -> Callable[[], run.StepMetrics]:
        """One update. The loss (averaged over ranks) and the gradient norm come to the host here, every step: a
        non-finite one must skip the update on every rank alike before optimizer.step() (the JAX step decides
        that on the device)."""
        t = self.config.train
        micro_batches = [to_device(self.train_loader.batch(position + k), self.device)
                         for k in range(t.grad_accum_steps)]
        lr = set_lr(self.optimizer, self.step_index, t)
        loss, grad_norm = forward_backward(self.model, self.optimizer, self.scaler, micro_batches, self.config)
        loss_value, norm_value = mean_over_ranks(torch.stack([loss.float(), grad_norm.float()])).tolist()
        # fp16 gradients overflow now and then by design: the scaler skips those; only the loss says divergence
        finite = math.isfinite(loss_value) and (t.precision == "fp16" or math.isfinite(norm_value))
        apply_update(self.optimizer, self.scaler, skip=not finite)
        self.step_index += 1
        extras = {"loss_scale": self.scaler.get_scale()} if self.scaler.is_enabled() else {}
        metrics = run.StepMetrics(loss_value, norm_value, lr, extras)
        return lambda: metrics

    def epoch_of(self, position: int) -> int:
        return self.train_loader.epoch_of(position)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over the fixed validation batches 0..eval_steps-1, averaged over all ranks; HellaSwag with
        each rank scoring every world_size-th example (build-nanogpt's split)."""
        t, record = self.config.train, {}
        self.compiled.eval()
        if t.eval_steps > 0:
            total = torch.zeros((), device=self.device)
            for position in range(t.eval_steps):
                inputs, targets = to_device(self.val_loader.batch(position), self.device)
                with autocast(self.device, t.precision):
                    total += self.compiled(inputs, targets)
            record["val_loss"] = mean_over_ranks(total / t.eval_steps).item()
        if self.hellaswag is not None:
            record.update(self._hellaswag_scores())
        self.compiled.train()
        return record

    def _hellaswag_scores(self) -> dict[str, float]:
        env, examples = self.env, self.hellaswag
        with autocast(self.device, self.config.train.precision):
            counts = hellaswag_correct(examples[env.rank::env.world_size], self.config.model.block_size,
                                       model_token_nll(self.raw_model))
        self.raw_model.train()  # model_token_nll put it in eval mode
        total = torch.tensor(counts, dtype=torch.float64, device=self.device)
        if env.world_size > 1:
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        correct, correct_norm = total.tolist()
        return {"hellaswag_acc": correct / len(examples), "hellaswag_acc_norm": correct_norm / len(examples)}

    def save(self, step: int, position: int, meta: dict, *, best: bool = False, same_as_last: bool = False) -> str:
        """Every rank calls it (their RNG states are gathered); rank 0 writes step_XXXXXXXX.pt, or best.pt (as a
        link to this step's checkpoint when that was just written)."""
        rng = gather_objects(capture_rng_state())  # every rank's, so that each continues its own dropout stream
        path = checkpoint_path(self.checkpoint_dir, step)
        if self.env.is_main:
            state = {"step": step, "loader_position": position, "model": self.raw_model.state_dict(),
                     "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(), "rng": rng,
                     "config": dumps_toml(self.config), **meta}
            target = self.checkpoint_dir / BEST_NAME if best else path
            try:
                if best:
                    link_or_save(state, target, path if same_as_last else None)
                else:
                    save_checkpoint(state, path, self.config.train.keep_checkpoints)
            except Exception as err:
                raise run.SaveFailed(str(target), err) from err
        return str(self.checkpoint_dir / BEST_NAME if best else path)

    def verified(self, path: str) -> bool:
        return verified(path)

    def sample(self, max_new_tokens: int, seed: int) -> str:
        if not self.env.is_main:
            return ""
        with autocast(self.device, self.config.train.precision):
            return sample_text(self.raw_model, "\n", max_new_tokens=max_new_tokens, seed=seed)

    def agree(self, flag: bool) -> bool:
        return bool(mean_over_ranks(torch.tensor(float(flag), device=self.device)).item() > 0)

    def wait(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def memory_in_use(self) -> int | None:
        return torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else None

    def close(self) -> None:
        pass  # saves are synchronous


def train(config: Config, run_dir: str | os.PathLike, *, init_from: str | None = None, resume_from: str | None = None,
          stop_at: int | None = None, sample_tokens: int = 200, allow_config_change: bool = False,
          log: Callable[[str], None] = print) -> run.RunEnd:
    """Trains `config` in `run_dir` with the run policy of gpt2_common.run (the signature of gpt2_jax.train.train)."""
    env = setup_distributed()
    try:
        backend = TorchBackend(config, Path(run_dir), env, init_from=init_from, resume_from=resume_from,
                               allow_config_change=allow_config_change)
        end = run.train(backend, config, Path(run_dir), stop_at=stop_at, sample_tokens=sample_tokens, log=log)
        if dist.is_initialized():
            # The ranks take the group down together, once the main rank's closing sample is done: a rank that tore
            # gloo down while rank 0 still sampled died of SIGABRT ("terminate called without an active exception")
            # after a finished run, once in the suite on a busy two-core machine.
            dist.barrier()
        return end
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    """scripts/train_torch.py: its flags and config are checked without PyTorch first (gpt2_formats.launch)."""
    from gpt2_formats.launch import train_main

    train_main("torch", argv)
