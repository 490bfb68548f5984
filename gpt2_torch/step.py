"""The PyTorch reference trainer's step: the forward/backward passes over an optimizer step's micro-batches and
the update, as gpt2_jax/step.py's steps do it; gpt2_torch/train.py runs the loop around them.

Under DDP the gradients are all-reduced once a step, on the last micro-batch; under fp16 the GradScaler scales the
loss and skips the updates whose gradients overflow.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from gpt2_common.config import Config
from gpt2_torch.optim import clip_gradients, set_lr


def autocast(device: torch.device, precision: str):
    """bf16/fp16 matmuls with fp32 master weights; LayerNorm and the loss stay fp32 (autocast's own lists)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def forward_backward(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                     micro_batches, config: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of one optimizer step, unscaled and clipped, left in the parameters' .grad; returns (mean
    micro-batch loss, pre-clip grad norm) as device tensors (no host sync).

    The loss and the gradients are the means over the micro-batches. Under DDP the gradients are all-reduced only
    on the last micro-batch (no_sync before it), which is what makes accumulation cheap across processes.
    """
    train, device = config.train, next(model.parameters()).device
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
    return total_loss / len(micro_batches), grad_norm


def apply_update(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, skip: bool = False) -> None:
    """The optimizer update from the gradients in .grad (skipped by the scaler when fp16 gradients are not
    finite, and entirely when `skip`), then clears them."""
    if not skip:
        scaler.step(optimizer)
    scaler.update()  # after a skip too: unscale_ recorded the overflow, so the fp16 scale halves
    optimizer.zero_grad(set_to_none=True)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               micro_batches, update: int, config: Config) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One optimizer update over a list of (inputs, targets) micro-batches; returns (loss, pre-clip grad norm, lr).
    No host sync: the training loop checks for divergence itself (this is what benchmarks time)."""
    lr = set_lr(optimizer, update, config.train)
    loss, grad_norm = forward_backward(model, optimizer, scaler, micro_batches, config)
    apply_update(optimizer, scaler)
    return loss, grad_norm, lr
