"""AdamW, schedule and clipping: step for step the optax chain of gpt2_jax/optim.py.

optax: clip_by_global_norm -> adamw(mask: ndim >= 2) with warmup_cosine_decay_schedule. Here: clip_grad_norm_ ->
torch.optim.AdamW with two parameter groups, the learning rate set before every update from the same lr_at. Both
apply decoupled weight decay as p -= lr * (adam_update + weight_decay * p), with eps added outside the square root.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from gpt2_common.config import TrainConfig
from gpt2_common.schedule import lr_at
from gpt2_common.startup import imports_without_gc


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay on matrices and embeddings (ndim >= 2), none on biases and LayerNorm parameters.

    named_parameters() lists a tied parameter once, so the shared wte/lm_head matrix is decayed once.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def make_optimizer(model: nn.Module, train: TrainConfig, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW, fused (one kernel for all parameters) where the device supports it.

    fused=None asks for it and falls back to the default (foreach) implementation where this torch or device has no
    fused kernel; True or False forces the choice (the tests compare the two).
    """
    groups = param_groups(model, train.weight_decay)
    kwargs = dict(lr=lr_at(0, train), betas=(train.beta1, train.beta2), eps=train.eps)
    with imports_without_gc():  # a process's first optimizer imports torch._dynamo (torch.optim's decorators do)
        if fused is not None:
            return torch.optim.AdamW(groups, fused=fused, **kwargs)
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except RuntimeError:  # "fused=True requires all the params to be ... of supported devices" (older torch)
            return torch.optim.AdamW(groups, **kwargs)


def set_lr(optimizer: torch.optim.Optimizer, update: int, train: TrainConfig) -> float:
    """Sets the learning rate of update `update` (0-based) on every group and returns it."""
    lr = lr_at(update, train)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def clip_gradients(params, grad_clip: float) -> torch.Tensor:
    """Clips the global gradient norm to grad_clip (0: no clipping) and returns the norm before clipping.

    clip_grad_norm_ scales by grad_clip / (norm + 1e-6), optax by grad_clip / norm: a relative difference of 1e-6/norm
    on clipped steps, far below the parity tests' tolerance.
    """
    params = [p for p in params if p.grad is not None]
    if grad_clip > 0:
        return nn.utils.clip_grad_norm_(params, grad_clip)
    return nn.utils.get_total_norm([p.grad for p in params])


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Restores the per-parameter state (moments, step counts) of a checkpoint but keeps the hyperparameters and the
    kernel choice of `optimizer`, which was built from the current config: load_state_dict alone would bring back the
    saved weight decay, betas and fused flag, silently overriding a changed config."""
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, kept in zip(optimizer.param_groups, settings):
        group.update(kept)
