"""The optax optimizer of the contract, and the fp16 loss scale.

    record grad norm -> [skip if not finite: clip_by_global_norm -> adam -> decay on ndim >= 2] -> lr schedule

(optax.adamw's own chain, with its learning rate taken out of the skip so that the schedule follows the step
index, as the PyTorch trainer's does, even after an fp16 overflow or a skipped diverged step; Adam's moments and
bias correction count only the updates applied, as torch.optim.AdamW's do when GradScaler skips a step)

wrapped in optax.MultiSteps for train.accumulation == "multisteps". The "scan" accumulation of gpt2_jax.step
feeds the same inner optimizer the mean gradient itself, so the two modes take identical updates.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from gpt2_common.config import TrainConfig

LOSS_SCALE_INIT = 2.0**16  # torch.amp.GradScaler's defaults, so that both trainers behave alike in fp16
LOSS_SCALE_GROWTH_INTERVAL = 2000


def learning_rate_schedule(train: TrainConfig) -> optax.Schedule:
    """LR of update `count` (0-based) = gpt2_common.schedule.lr_at(count, train)."""
    if train.warmup_steps >= train.max_steps:  # no decay left: warm up, then hold (optax's cosine needs steps)
        schedule = optax.linear_schedule(0.0, train.lr, train.warmup_steps)
        return lambda count: schedule(count + 1)
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=train.lr,
        warmup_steps=train.warmup_steps,
        decay_steps=train.max_steps,
        end_value=train.min_lr,
    )
    # Evaluated one ahead, so that the first update already moves (optax's schedule is 0 at count 0).
    return lambda count: schedule(count + 1)


def decay_mask(params: Any) -> Any:
    """Weight decay on embeddings and matrices only, never on biases or LayerNorm parameters."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


class GradNormState(NamedTuple):
    grad_norm: jax.Array


def record_grad_norm() -> optax.GradientTransformation:
    """Keeps the global norm of the gradient it is given in its state, so that the pre-clip norm of the (mean)
    gradient is a metric in both accumulation modes: MultiSteps never shows the step function that mean."""

    def init(params):
        del params
        return GradNormState(grad_norm=jnp.zeros([], jnp.float32))

    def update(updates, state, params=None):
        del state, params
        return updates, GradNormState(grad_norm=optax.global_norm(updates).astype(jnp.float32))

    return optax.GradientTransformation(init, update)


def inner_optimizer(train: TrainConfig, skip_nonfinite: bool = False) -> optax.GradientTransformation:
    """The update that one optimizer step applies to the mean gradient of its micro-batches."""
    update = optax.chain(
        optax.clip_by_global_norm(train.grad_clip) if train.grad_clip > 0 else optax.identity(),
        optax.scale_by_adam(b1=train.beta1, b2=train.beta2, eps=train.eps),
        optax.add_decayed_weights(train.weight_decay, mask=decay_mask),
    )
    if skip_nonfinite:
        # A step whose gradient is not finite changes nothing (GradScaler skips optimizer.step() alike in fp16).
        update = skip_if_not_finite(update)
    # Outside the skip: its count is the step index, whether or not the step's update was applied.
    return optax.chain(record_grad_norm(), update, optax.scale_by_learning_rate(learning_rate_schedule(train)))


def skip_if_not_finite(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """optax.apply_if_finite(inner, max_consecutive_errors=<never give up>), with its state (ApplyIfFiniteState, so
    checkpoints and the run conversions read it as before), decided as the PyTorch trainer decides: on the finiteness
    of the gradient's global norm (which a NaN or an Inf anywhere makes non-finite), and applied with selects.

    Why not apply_if_finite itself: its lax.cond keeps the inner update in a branch of its own, where XLA can neither
    fuse it with the step nor share the clip's norm with the recorded one, and its check reduces every leaf once more.
    The train step now compiles 0.4-0.6 s faster on the 2-core CPU (docs/benchmarks.md, "Compiling the JAX step").
    The values are the same: a finite step's update and state are the inner ones, a skipped step's update is zero and
    its inner state the old one."""

    def init(params):
        return optax.ApplyIfFiniteState(notfinite_count=jnp.zeros([], jnp.int32), last_finite=jnp.array(True),
                                        total_notfinite=jnp.zeros([], jnp.int32), inner_state=inner.init(params))

    def update(updates, state, params=None):
        finite = jnp.isfinite(optax.global_norm(updates))
        applied, inner_state = inner.update(updates, state.inner_state, params)
        return jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), applied), optax.ApplyIfFiniteState(
            notfinite_count=jnp.where(finite, 0, optax.safe_increment(state.notfinite_count)),
            last_finite=finite,
            total_notfinite=jnp.where(finite, state.total_notfinite, optax.safe_increment(state.total_notfinite)),
            inner_state=jax.tree.map(lambda new, old: jnp.where(finite, new, old), inner_state, state.inner_state))

    return optax.GradientTransformation(init, update)


def uses_multisteps(train: TrainConfig) -> bool:
    """Whether steps accumulate one call per micro-batch under MultiSteps. Not for a single micro-batch: there
    MultiSteps would only add a parameter-sized accumulator, and both modes are one plain update."""
    return train.accumulation == "multisteps" and train.grad_accum_steps > 1


def build_optimizer(train: TrainConfig) -> optax.GradientTransformation:
    """The optimizer a train state holds: the inner one, under MultiSteps when micro-batches are accumulated
    one call at a time."""
    # Every precision skips a non-finite update inside the step: an fp16 overflow, or a diverged step, which the
    # training loop then counts (train.nan_policy=skip) or stops at (stop) with the parameters still the last good.
    inner = inner_optimizer(train, skip_nonfinite=True)
    if uses_multisteps(train):
        return optax.MultiSteps(inner, every_k_schedule=train.grad_accum_steps).gradient_transformation()
    return inner


def grad_norm(opt_state: Any) -> jax.Array:
    """The pre-clip global gradient norm of the last update applied."""
    return optax.tree_utils.tree_get(opt_state, "grad_norm")


def learning_rate(opt_state: Any, train: TrainConfig) -> jax.Array:
    """The learning rate of the last update, from the optimizer's own schedule count (the step index after it),
    so that what the run logs is what the optimizer applied."""
    count = optax.tree_utils.tree_get(opt_state, "count", filtering=lambda path, value: any(
        getattr(key, "tuple_name", None) == "ScaleByScheduleState" for key in path))
    return learning_rate_schedule(train)(count - 1)


def last_update_finite(opt_state: Any) -> jax.Array:
    """Whether the last update's gradient was finite (True for an optimizer that does not check)."""
    return optax.tree_utils.tree_get(opt_state, "last_finite", default=jnp.array(True))


class LossScale(struct.PyTreeNode):
    """Dynamic loss scaling for fp16, adjusted once per optimizer step as torch.amp.GradScaler does it.

    (flax.training.dynamic_scale adjusts after every gradient evaluation, i.e. per micro-batch under
    accumulation; this keeps both trainers' scales in step.)
    """

    scale: jax.Array
    good_steps: jax.Array
    growth_interval: int = struct.field(pytree_node=False, default=LOSS_SCALE_GROWTH_INTERVAL)

    @classmethod
    def create(cls, growth_interval: int = LOSS_SCALE_GROWTH_INTERVAL) -> "LossScale":
        return cls(jnp.array(LOSS_SCALE_INIT, jnp.float32), jnp.array(0, jnp.int32), growth_interval)

    def adjust(self, finite: jax.Array) -> "LossScale":
        """Halve after an overflow; double after `growth_interval` finite steps in a row."""
        grow = finite & (self.good_steps + 1 >= self.growth_interval)
        scale = jnp.where(finite, jnp.where(grow, self.scale * 2, self.scale), self.scale / 2)
        good_steps = jnp.where(finite & ~grow, self.good_steps + 1, 0)
        return self.replace(scale=scale, good_steps=good_steps)
