"""The JAX trainer's step: TrainState and the pure step functions, compiled once over the mesh (gpt2_jax.train runs
the loop around them).

One optimizer step takes train.batch_size sequences as batch_size/micro_batch_size micro-batches, either one
jitted call per micro-batch under optax.MultiSteps ("multisteps") or one jitted call that lax.scan's over them
("scan", and any step of a single micro-batch). Both apply the same inner optimizer to the mean gradient.
Micro-batch k of step s is loader position s*accum + k, and its dropout key is fold_in(rng, s*accum + k) (in the
scanned step over several data-parallel replicas, each replica folds in its index too), so a resumed run replays
exactly.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding

from gpt2_common.config import Config, TrainConfig, check_divides
from gpt2_common.data import IGNORE_INDEX
from gpt2_common.errors import UserError
from gpt2_jax import sharding
from gpt2_jax.model import GPT, build_model
from gpt2_jax.optim import LossScale, build_optimizer, grad_norm, last_update_finite, learning_rate, uses_multisteps


class TrainState(struct.PyTreeNode):
    step: jax.Array  # optimizer steps done
    params: Any
    opt_state: Any
    rng: jax.Array  # the dropout base key; each micro-batch folds its position into it
    loss_scale: LossScale | None = None  # fp16 only


def init_state(rng: jax.Array, *, model: GPT, optimizer: optax.GradientTransformation, fp16: bool,
               params: Any = None) -> TrainState:
    init_key, dropout_key = jax.random.split(rng)
    if params is None:
        dummy = jnp.zeros((1, model.config.block_size), jnp.int32)
        params = nn.unbox(model.init(init_key, dummy))["params"]
    return TrainState(step=jnp.zeros([], jnp.int32), params=params, opt_state=optimizer.init(params),
                      rng=dropout_key, loss_scale=LossScale.create() if fp16 else None)


def loss_and_grads(state: TrainState, inputs: jax.Array, targets: jax.Array, position: jax.Array, model: GPT,
                   replica: jax.Array | None = None, weight: jax.Array | float = 1.0) -> tuple[jax.Array, Any]:
    """The micro-batch's loss and its (unscaled) gradient, both times `weight`; under fp16 the loss is scaled for
    the backward pass. `replica`: whose rows these are when they are one data-parallel replica's share of the
    micro-batch (each replica draws its own dropout masks)."""
    scale = state.loss_scale.scale if state.loss_scale is not None else None
    dropout_key = jax.random.fold_in(state.rng, position)
    if replica is not None:
        dropout_key = jax.random.fold_in(dropout_key, replica)

    def loss_fn(params):
        loss = weight * model.apply({"params": params}, inputs, targets=targets,
                                    deterministic=model.config.dropout == 0, rngs={"dropout": dropout_key})
        return (loss * scale if scale is not None else loss), loss

    (_, loss), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    if scale is not None:
        grads = jax.tree.map(lambda g: g / scale, grads)
    return loss, grads


def _apply(state: TrainState, grads: Any, optimizer: optax.GradientTransformation) -> tuple[Any, Any]:
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return optax.apply_updates(state.params, updates), opt_state


def _step_metrics(loss: jax.Array, state: TrainState, train: TrainConfig) -> dict[str, jax.Array]:
    metrics = {"loss": loss, "grad_norm": grad_norm(state.opt_state), "lr": learning_rate(state.opt_state, train)}
    if state.loss_scale is not None:
        metrics["loss_scale"] = state.loss_scale.scale
    return metrics


def train_step_scan(state: TrainState, batch: tuple[jax.Array, jax.Array], *, model: GPT,
                    optimizer: optax.GradientTransformation, mesh: Mesh, grad_shardings: Any,
                    train: TrainConfig) -> tuple[TrainState, dict]:
    """One optimizer step over batch = (inputs, targets), each [accum, micro_batch, T].

    Gradients cross the data axis once a step, as DDP's no_sync has them: each data-parallel replica sums its own
    rows' gradients over the micro-batches (jax.vmap over the replicas, an axis that XLA splits over data) into a
    [replicas, *param] carry sharded by grad_shardings, and the replicas' sums are added after the last
    micro-batch. In one carry of the parameters' sharding, XLA would all-reduce every micro-batch's gradient
    inside the loop. Within a replica nothing changes: its rows still split over fsdp.
    """
    with sharding.activation_sharding(mesh):
        inputs, targets = batch
        accum, rows, _ = inputs.shape
        replicas = mesh.shape["data"]
        # A micro-batch's loss is the mean over all of its positions, so each replica's mean over its own rows is
        # weighted by their share of those positions: the replicas' shares add up to the micro-batch's mean.
        counts = jnp.sum(targets != IGNORE_INDEX, axis=(1, 2))

        def replica_loss_and_grads(x, y, replica, k, count):
            weight = jnp.sum(y != IGNORE_INDEX) / jnp.maximum(count, 1)
            with sharding.replica_rules():
                return loss_and_grads(state, x, y, state.step * accum + k, model,
                                      replica=replica if replicas > 1 else None, weight=weight)

        per_replica = jax.vmap(replica_loss_and_grads, in_axes=(0, 0, 0, None, None), spmd_axis_name="data")

        def add_micro_batch(grad_sums, micro):
            k, x, y, count = micro
            losses, grads = per_replica(x, y, jnp.arange(replicas), k, count)
            return jax.tree.map(jnp.add, grad_sums, grads), losses

        def split_rows(a):  # [accum, rows, T] -> [accum, replicas, rows / replicas, T]
            return a.reshape(accum, replicas, rows // replicas, -1)

        zeros = jax.lax.with_sharding_constraint(
            jax.tree.map(lambda p: jnp.zeros((replicas, *p.shape), p.dtype), state.params), grad_shardings)
        grad_sums, losses = jax.lax.scan(add_micro_batch, zeros,
                                         (jnp.arange(accum), split_rows(inputs), split_rows(targets), counts))
        grads = jax.tree.map(lambda g: jnp.sum(g, axis=0) / accum, grad_sums)  # the once-a-step all-reduce
        params, opt_state = _apply(state, grads, optimizer)
        loss_scale = None if state.loss_scale is None else state.loss_scale.adjust(last_update_finite(opt_state))
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, loss_scale=loss_scale)
        return new_state, _step_metrics(jnp.sum(losses) / accum, new_state, train)


def train_step_multisteps(state: TrainState, batch: tuple[jax.Array, jax.Array], *, model: GPT,
                          optimizer: optax.GradientTransformation, mesh: Mesh, accum: int,
                          train: TrainConfig) -> tuple[TrainState, dict]:
    """One micro-batch (inputs, targets), each [micro_batch, T]; every accum-th call updates the parameters."""
    with sharding.activation_sharding(mesh):
        inputs, targets = batch
        loss, grads = loss_and_grads(state, inputs, targets, state.step * accum + state.opt_state.mini_step, model)
        params, opt_state = _apply(state, grads, optimizer)
        updated = opt_state.mini_step == 0
        # MultiSteps clears its accumulator by multiplying it by zero, which keeps a non-finite gradient's inf/NaN
        # (an fp16 overflow, or a diverged step skipped by train.nan_policy) into every later step.
        opt_state = opt_state._replace(acc_grads=jax.tree.map(
            lambda a: jnp.where(updated, jnp.zeros_like(a), a), opt_state.acc_grads))
        loss_scale = state.loss_scale
        if loss_scale is not None:
            adjusted = loss_scale.adjust(last_update_finite(opt_state))
            loss_scale = jax.tree.map(functools.partial(jnp.where, updated), adjusted, loss_scale)
        new_state = state.replace(step=state.step + updated.astype(jnp.int32), params=params, opt_state=opt_state,
                                  loss_scale=loss_scale)
        return new_state, _step_metrics(loss, new_state, train)


def eval_step(params: Any, batch: tuple[jax.Array, jax.Array], *, model: GPT, mesh: Mesh) -> jax.Array:
    with sharding.activation_sharding(mesh):
        inputs, targets = batch
        return model.apply({"params": params}, inputs, targets=targets)


@dataclasses.dataclass(frozen=True)
class Trainer:
    """What a config on a mesh compiles to: the model, the optimizer, every sharding and the jitted steps."""

    config: Config
    mesh: Mesh
    model: GPT
    optimizer: optax.GradientTransformation
    abstract_state: TrainState  # shapes and dtypes, for restoring a checkpoint
    state_shardings: TrainState  # a NamedSharding at each leaf
    micro_batch_sharding: NamedSharding
    init: Callable  # (rng, params or None) -> TrainState, placed on the mesh
    train_step: Callable  # (state, batch) -> (state, metrics); state is donated
    eval_step: Callable  # (params, batch) -> loss

    def put(self, batch: tuple[np.ndarray, np.ndarray], leading_dims: int = 0) -> tuple[jax.Array, jax.Array]:
        """This process's rows of a batch -> global arrays on the mesh."""
        rows = self.config.train.micro_batch_size
        dest = sharding.batch_sharding(self.mesh, leading_dims)
        return tuple(sharding.put_batch(a, dest, a.shape[:leading_dims] + (rows,) + a.shape[leading_dims + 1:])
                     for a in batch)

    def step(self, state: TrainState, loader, position: int) -> tuple[TrainState, dict]:
        """One optimizer step on the micro-batches at loader positions position, position+1, ... (host side:
        fetch, place, call; the positions are counted on the host so as not to wait for the device)."""
        accum = self.config.train.grad_accum_steps
        train_step = self.train_step
        batches = self.step_batches([loader.batch(position + k) for k in range(accum)])
        if len(batches) == 1:
            return train_step(state, batches[0])
        losses = []
        for batch in batches:
            state, metrics = train_step(state, batch)
            losses.append(metrics["loss"])
        return state, {**metrics, "loss": sum(losses) / accum}

    def step_batches(self, micro_batches: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[jax.Array, jax.Array]]:
        """An optimizer step's micro-batches as the train_step calls take them, placed on the mesh: stacked into
        one call (scan, or a single micro-batch) or one call each (MultiSteps)."""
        if not uses_multisteps(self.config.train):
            return [self.put(tuple(np.stack(parts) for parts in zip(*micro_batches)), leading_dims=1)]
        return [self.put(micro_batch) for micro_batch in micro_batches]


def build_trainer(config: Config, mesh: Mesh) -> Trainer:
    t = config.train
    check_divides(t.micro_batch_size, sharding.batch_shards(mesh))
    if config.model.n_head % mesh.shape["tensor"]:
        raise UserError(f"model.n_head={config.model.n_head} does not divide over mesh.tensor={mesh.shape['tensor']} "
                        "devices; make mesh.tensor a divisor of n_head")
    model = build_model(config.model, t.precision, backend=mesh.devices.flat[0].platform)
    optimizer = build_optimizer(t)
    fp16 = t.precision == "fp16"
    make_state = functools.partial(init_state, model=model, optimizer=optimizer, fp16=fp16)

    dummy = jnp.zeros((1, config.model.block_size), jnp.int32)
    boxed_params = jax.eval_shape(model.init, jax.random.PRNGKey(0), dummy)["params"]
    param_shardings = sharding.tree_shardings(boxed_params, mesh)
    abstract_state = jax.eval_shape(make_state, jax.random.PRNGKey(0))
    rep = sharding.replicated(mesh)
    state_shardings = TrainState(
        step=rep,
        params=param_shardings,
        opt_state=sharding.opt_state_shardings(optimizer, abstract_state.opt_state, param_shardings, mesh),
        rng=rep,
        loss_scale=jax.tree.map(lambda _: rep, abstract_state.loss_scale),
    )

    rows = sharding.batch_sharding(mesh, leading_dims=0 if uses_multisteps(t) else 1)

    if not uses_multisteps(t):
        step_fn = functools.partial(train_step_scan, model=model, optimizer=optimizer, mesh=mesh,
                                    grad_shardings=sharding.replica_shardings(param_shardings), train=t)
    else:
        step_fn = functools.partial(train_step_multisteps, model=model, optimizer=optimizer, mesh=mesh,
                                    accum=t.grad_accum_steps, train=t)
    train_step = jax.jit(step_fn, in_shardings=(state_shardings, (rows, rows)), out_shardings=(state_shardings, rep),
                         donate_argnums=0)
    micro = sharding.batch_sharding(mesh)
    eval_fn = jax.jit(functools.partial(eval_step, model=model, mesh=mesh),
                      in_shardings=(param_shardings, (micro, micro)), out_shardings=rep)
    init_random = jax.jit(make_state, out_shardings=state_shardings)
    init_given = jax.jit(lambda rng, params: make_state(rng, params=params), out_shardings=state_shardings)

    def init(rng: jax.Array, params: Any = None) -> TrainState:
        if params is None:
            return init_random(rng)
        return init_given(rng, jax.device_put(params, param_shardings))

    return Trainer(config, mesh, model, optimizer, abstract_state, state_shardings, micro, init, train_step, eval_fn)


def compile_on_zeros(trainer: Trainer) -> jax.stages.Compiled:
    """The trainer's train_step compiled (not run) for its abstract state and a step's first batch of zeros: what
    the compiler makes of the step depends on shapes and shardings, not on values. Read by the memory plan (buffer
    sizes), the collectives and the profile (HLO text) and the benchmark (a variant's own bytes).

    The state's shapes carry their shardings, as a live state does: then a step already compiled by a call is
    reused here, and this compilation by the calls that follow (without them, tiny's step compiled twice)."""
    t = trainer.config.train
    zeros = np.zeros((t.micro_batch_size, trainer.config.model.block_size), np.int32)
    batch = trainer.step_batches([(zeros, zeros)] * t.grad_accum_steps)[0]
    state = jax.tree.map(lambda a, placed: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=placed),
                         trainer.abstract_state, trainer.state_shardings)
    return trainer.train_step.lower(state, batch).compile()
