"""The JAX trainer's whole state <-> the canonical train state of gpt2_common.train_state, and a JAX run's checkpoint
read or written as one (convert.py --to torch-run reads a JAX run; --to jax-run writes one).

Where gpt2_jax/optim.py's chain keeps each number (with train.accumulation=multisteps all of it sits in
MultiStepsState.inner_opt_state, beside the micro-batch counter and the gradient accumulator):

  GradNormState.grad_norm                      last_update.grad_norm
  ApplyIfFiniteState: notfinite_count,         last_update.nonfinite_in_a_row, .finite;
    last_finite, total_notfinite               total_notfinite = step - adam_count (the updates it skipped)
  clip_by_global_norm, the decay mask          no state
  ScaleByAdamState: count, mu, nu              adam_count, exp_avg, exp_avg_sq
  ScaleByScheduleState.count                   step (counted outside the skip, as the learning rate's index)
  MultiStepsState: mini_step, gradient_step,   0, step, zeros: a checkpoint is saved at a step boundary, where the
    acc_grads                                  accumulator has just been cleared

The dropout key is the one init_state splits from train.seed, which a run never changes.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from optax.tree_utils import tree_get, tree_set

from gpt2_common import train_state as canonical
from gpt2_common.config import Config, loads_toml
from gpt2_jax import checkpoint, layout
from gpt2_jax.model import build_model
from gpt2_jax.optim import LossScale, build_optimizer
from gpt2_jax.step import TrainState, init_state
from gpt2_jax.weights import from_canonical, to_canonical


def abstract_state(config: Config) -> TrainState:
    """The shapes and dtypes of the TrainState that the JAX trainer builds for `config` (nothing is allocated)."""
    model = build_model(config.model, "fp32", backend="cpu")
    make = functools.partial(init_state, model=model, optimizer=build_optimizer(config.train),
                             fp16=config.train.precision == "fp16")
    return jax.eval_shape(make, jax.random.PRNGKey(0))


def _in(state_name: str):
    """tree_get/tree_set's filter for a field of the optax state named `state_name` (two of them have a count)."""
    return lambda path, _: any(getattr(key, "tuple_name", None) == state_name for key in path)


def to_canonical_state(state: TrainState, meta: dict, config: Config, source: str) -> canonical.TrainState:
    """The canonical state of a TrainState (numpy or device arrays) and its checkpoint's meta record."""
    state = jax.device_get(state)
    m, opt = config.model, state.opt_state
    step = int(state.step)
    schedule_count = int(tree_get(opt, "count", filtering=_in("ScaleByScheduleState")))
    if schedule_count != step:
        raise canonical.CannotContinue(f"{source}: its learning-rate schedule is at update {schedule_count} but its "
                                       f"state at step {step}; it was not written by this project's JAX trainer")
    if isinstance(opt, optax.MultiStepsState) and (int(opt.mini_step) != 0 or any(
            np.any(np.asarray(a) != 0) for a in jax.tree.leaves(opt.acc_grads))):
        raise canonical.CannotContinue(f"{source} was saved between the micro-batches of a step (train.accumulation="
                                       f"multisteps, micro-batch {int(opt.mini_step)}): only a step boundary "
                                       "converts; choose another --step")
    mu, nu = tree_get(opt, "mu"), tree_get(opt, "nu")

    def padding(tree: Any) -> np.ndarray:  # the padded embedding's rows past the vocabulary
        return canonical.padding_rows(np.asarray(tree["wte"]["embedding"]), m)

    loss_scale = None if state.loss_scale is None else canonical.LossScale(
        scale=float(state.loss_scale.scale), growth_tracker=int(state.loss_scale.good_steps))
    best = meta.get("best_val_loss")
    result = canonical.TrainState(
        config=config, step=step, adam_count=int(tree_get(opt, "count", filtering=_in("ScaleByAdamState"))),
        weights=to_canonical(state.params, m), exp_avg=to_canonical(mu, m), exp_avg_sq=to_canonical(nu, m),
        padding={"weights": padding(state.params), "exp_avg": padding(mu), "exp_avg_sq": padding(nu)},
        loader_position=int(meta["loader_position"]), skipped_steps=int(meta.get("skipped_steps", 0)),
        best_val_loss=None if best is None else float(best), loss_scale=loss_scale,
        last_update=canonical.LastUpdate(grad_norm=float(tree_get(opt, "grad_norm")),
                                         finite=bool(tree_get(opt, "last_finite")),
                                         nonfinite_in_a_row=int(tree_get(opt, "notfinite_count"))))
    canonical.check_state(result, source)
    return result


def from_canonical_state(state: canonical.TrainState) -> tuple[TrainState, dict]:
    """(the TrainState that the JAX trainer would hold, as numpy arrays; the meta values its checkpoint records
    beside the config and the loader position)."""
    config = state.config
    m, t = config.model, config.train

    def padded(weights: canonical.Weights, key: str) -> dict:
        tree = from_canonical(weights, m)
        tree["wte"]["embedding"] = canonical.with_padding(tree["wte"]["embedding"], state.padding[key])
        return tree

    abstract = abstract_state(config)
    params = padded(state.weights, "weights")
    opt = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract.opt_state)
    values = {"mu": padded(state.exp_avg, "exp_avg"), "nu": padded(state.exp_avg_sq, "exp_avg_sq"),
              "grad_norm": state.last_update.grad_norm, "last_finite": state.last_update.finite,
              "notfinite_count": state.last_update.nonfinite_in_a_row,
              "total_notfinite": state.step - state.adam_count}
    for key, value in values.items():  # one at a time: tree_set misses a key nested inside a node it matched
        opt = tree_set(opt, **{key: value})
    opt = tree_set(opt, _in("ScaleByAdamState"), count=state.adam_count)
    opt = tree_set(opt, _in("ScaleByScheduleState"), count=state.step)
    if isinstance(opt, optax.MultiStepsState):
        opt = opt._replace(gradient_step=state.step)
    loss_scale = None
    if t.precision == "fp16":
        loss_scale = LossScale.create() if state.loss_scale is None else LossScale(
            np.float32(state.loss_scale.scale), np.int32(state.loss_scale.growth_tracker))
    rng = jax.random.split(jax.random.PRNGKey(t.seed))[1]  # init_state's dropout key
    built = TrainState(step=state.step, params=params, opt_state=opt, rng=rng, loss_scale=loss_scale)
    # Every leaf as the trainer's own state has it (dtype and shape), which its restore checks against.
    jax_state = jax.tree.map(lambda a, value: _like(np.asarray(value), a), abstract, built)
    return jax_state, {"skipped_steps": state.skipped_steps, "best_val_loss": state.best_val_loss}


def _like(value: np.ndarray, abstract: Any) -> np.ndarray:
    if value.shape != abstract.shape:
        raise ValueError(f"a tensor of shape {value.shape} where the JAX state has {abstract.shape}")
    return value.astype(abstract.dtype)


# --- a JAX run's checkpoint ------------------------------------------------------------------------------------------

def read_checkpoint(step_dir: Path) -> canonical.TrainState:
    """The canonical state of one step folder of a JAX run (its manifest checked first); nothing in the run changes
    (gpt2_formats.runs chooses the step folder)."""
    config = loads_toml(checkpoint.read_meta(step_dir)["config_toml"])
    state, meta = checkpoint.read_train_state(step_dir, abstract_state(config))
    return to_canonical_state(state, meta, config, f"'{step_dir}'")


def write_run(state: canonical.TrainState, run_dir: Path, best: canonical.TrainState | None = None) -> Path:
    """Writes `state` as the one checkpoint of the JAX run directory `run_dir` (checkpoints/<step>, sealed with its
    manifest) through the trainer's own save, and `best` (if any) as its best checkpoint (checkpoints/best/<step>,
    through a keep-1 manager as the trainer keeps it); returns the step folder. The caller renames run_dir into
    place."""
    checkpoints = Path(run_dir) / layout.CHECKPOINTS_DIR
    for one, directory in ((state, checkpoints), (best, checkpoints / layout.BEST_DIR)):
        if one is None:
            continue
        jax_state, extra = from_canonical_state(one)
        manager = checkpoint.checkpoint_manager(directory, keep=1, async_save=False)
        try:
            checkpoint.save(manager, jax_state, one.config, one.loader_position, extra)
        finally:
            manager.close()
    return checkpoints / str(state.step)
