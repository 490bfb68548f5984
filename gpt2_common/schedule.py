"""The learning-rate schedule in plain Python, for the PyTorch trainer and for checking optax's against it.

Update i (0-based) uses lr_at(i): a linear warmup that reaches the peak at update warmup_steps-1 (the first update
already moves, unlike a warmup that starts at 0), then a cosine decay that reaches min_lr at the last update,
max_steps-1. This is optax.warmup_cosine_decay_schedule(0, lr, warmup_steps, max_steps, min_lr) evaluated at i+1,
which is how gpt2_jax.optim builds it.
"""

from __future__ import annotations

import math

from gpt2_common.config import TrainConfig


def lr_at(update: int, train: TrainConfig) -> float:
    count = update + 1
    if count < train.warmup_steps:
        return train.lr * count / train.warmup_steps
    decay_steps = train.max_steps - train.warmup_steps
    if decay_steps <= 0:
        return train.lr
    progress = min(count - train.warmup_steps, decay_steps) / decay_steps
    return train.min_lr + (train.lr - train.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
