"""The JAX trainer: TrainState, the pure step functions compiled once over the mesh, and the training loop.

One optimizer step takes train.batch_size sequences as batch_size/micro_batch_size micro-batches, either one
jitted call per micro-batch under optax.MultiSteps ("multisteps") or one jitted call that lax.scan's over them
("scan", and any step of a single micro-batch). Both apply the same inner optimizer to the mean gradient. Micro-batch k of step s is loader position
s*accum + k, and its dropout key is fold_in(rng, s*accum + k), so a resumed run replays exactly.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from gpt2_common.cli import data_paths, resolve_run, train_parser, write_run_config
from gpt2_common.config import Config, check_divides, loads_toml
from gpt2_common.data import TokenLoader
from gpt2_common.errors import UserError
from gpt2_common.flops import mfu, num_params, peak_flops
from gpt2_common.metrics import MetricsWriter
from gpt2_common.schedule import lr_at  # equals the optimizer's schedule (tests/test_jax_optim.py checks it)
from gpt2_common.tokenizer import decode, get_tokenizer
from gpt2_jax import checkpoint, distributed, sharding
from gpt2_jax.model import GPT, build_model, cross_entropy
from gpt2_jax.optim import LossScale, build_optimizer, grad_norm, last_update_finite, uses_multisteps
from gpt2_jax.sample import generate


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


def loss_and_grads(state: TrainState, inputs: jax.Array, targets: jax.Array, position: jax.Array,
                   model: GPT) -> tuple[jax.Array, Any]:
    """The micro-batch's loss and its (unscaled) gradient; under fp16 the loss is scaled for the backward pass."""
    scale = state.loss_scale.scale if state.loss_scale is not None else None

    def loss_fn(params):
        logits = model.apply({"params": params}, inputs, deterministic=model.config.dropout == 0,
                             rngs={"dropout": jax.random.fold_in(state.rng, position)})
        loss = cross_entropy(logits, targets, model.config.vocab_size)
        return (loss * scale if scale is not None else loss), loss

    (_, loss), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    if scale is not None:
        grads = jax.tree.map(lambda g: g / scale, grads)
    return loss, grads


def _apply(state: TrainState, grads: Any, optimizer: optax.GradientTransformation) -> tuple[Any, Any]:
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return optax.apply_updates(state.params, updates), opt_state


def _step_metrics(loss: jax.Array, state: TrainState) -> dict[str, jax.Array]:
    metrics = {"loss": loss, "grad_norm": grad_norm(state.opt_state)}
    if state.loss_scale is not None:
        metrics["loss_scale"] = state.loss_scale.scale
    return metrics


def train_step_scan(state: TrainState, batch: tuple[jax.Array, jax.Array], *, model: GPT,
                    optimizer: optax.GradientTransformation, mesh: Mesh) -> tuple[TrainState, dict]:
    """One optimizer step over batch = (inputs, targets), each [accum, micro_batch, T]."""
    with sharding.activation_sharding(mesh):
        inputs, targets = batch
        accum = inputs.shape[0]

        def add_micro_batch(grad_sum, micro):
            k, x, y = micro
            loss, grads = loss_and_grads(state, x, y, state.step * accum + k, model)
            return jax.tree.map(jnp.add, grad_sum, grads), loss

        grad_sum, losses = jax.lax.scan(add_micro_batch, jax.tree.map(jnp.zeros_like, state.params),
                                        (jnp.arange(accum), inputs, targets))
        params, opt_state = _apply(state, jax.tree.map(lambda g: g / accum, grad_sum), optimizer)
        loss_scale = None if state.loss_scale is None else state.loss_scale.adjust(last_update_finite(opt_state))
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, loss_scale=loss_scale)
        return new_state, _step_metrics(losses.mean(), new_state)


def train_step_multisteps(state: TrainState, batch: tuple[jax.Array, jax.Array], *, model: GPT,
                          optimizer: optax.GradientTransformation, mesh: Mesh, accum: int) -> tuple[TrainState, dict]:
    """One micro-batch (inputs, targets), each [micro_batch, T]; every accum-th call updates the parameters."""
    with sharding.activation_sharding(mesh):
        inputs, targets = batch
        loss, grads = loss_and_grads(state, inputs, targets, state.step * accum + state.opt_state.mini_step, model)
        params, opt_state = _apply(state, grads, optimizer)
        updated = opt_state.mini_step == 0
        loss_scale = state.loss_scale
        if loss_scale is not None:
            # MultiSteps clears its accumulator by multiplying it by zero, which keeps an overflow's inf/NaN.
            opt_state = opt_state._replace(acc_grads=jax.tree.map(
                lambda a: jnp.where(updated, jnp.zeros_like(a), a), opt_state.acc_grads))
            adjusted = loss_scale.adjust(last_update_finite(opt_state))
            loss_scale = jax.tree.map(functools.partial(jnp.where, updated), adjusted, loss_scale)
        new_state = state.replace(step=state.step + updated.astype(jnp.int32), params=params, opt_state=opt_state,
                                  loss_scale=loss_scale)
        return new_state, _step_metrics(loss, new_state)


def eval_step(params: Any, batch: tuple[jax.Array, jax.Array], *, model: GPT, mesh: Mesh) -> jax.Array:
    with sharding.activation_sharding(mesh):
        inputs, targets = batch
        return cross_entropy(model.apply({"params": params}, inputs), targets, model.config.vocab_size)


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

    def step(self, state: TrainState, loader: TokenLoader, position: int) -> tuple[TrainState, dict]:
        """One optimizer step on the micro-batches at loader positions position, position+1, ... (host side:
        fetch, place, call; the positions are counted on the host so as not to wait for the device)."""
        accum = self.config.train.grad_accum_steps
        micro_batches = [loader.batch(position + k) for k in range(accum)]
        if not uses_multisteps(self.config.train):
            stacked = tuple(np.stack(parts) for parts in zip(*micro_batches))
            return self.train_step(state, self.put(stacked, leading_dims=1))
        losses = []
        for micro_batch in micro_batches:
            state, metrics = self.train_step(state, self.put(micro_batch))
            losses.append(metrics["loss"])
        return state, {**metrics, "loss": sum(losses) / accum}


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
        step_fn = functools.partial(train_step_scan, model=model, optimizer=optimizer, mesh=mesh)
    else:
        step_fn = functools.partial(train_step_multisteps, model=model, optimizer=optimizer, mesh=mesh,
                                    accum=t.grad_accum_steps)
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


# Runs of one config in one process (a notebook, a sweep, a test that stops and resumes) compile their steps once.
_cached_trainer = functools.lru_cache(maxsize=4)(build_trainer)


# --- the loop -------------------------------------------------------------------------------------------------------

def train(config: Config, run_dir: Path, *, init_from: str | None = None, stop_at: int | None = None,
          sample_tokens: int = 200, devices: list | None = None, log: Callable[[str], None] = print) -> TrainState:
    """Trains `config` in `run_dir` to train.max_steps (or `stop_at`), resuming from its newest checkpoint."""
    t, seq_len = config.train, config.model.block_size
    main_process = jax.process_index() == 0
    say = log if main_process else (lambda _: None)
    mesh = sharding.make_mesh(config.mesh, devices)
    trainer = _cached_trainer(config, mesh)
    train_loader, val_loader = _loaders(config, trainer)
    if main_process:
        write_run_config(config, run_dir)
    manager = checkpoint.checkpoint_manager(Path(run_dir) / "checkpoints", t.keep_checkpoints)
    state, position = _restore_or_init(trainer, manager, init_from, say)
    step = first_step = int(jax.device_get(state.step))
    end = t.max_steps if stop_at is None else min(stop_at, t.max_steps)
    writer = MetricsWriter(run_dir, enabled=main_process)
    val_batches = [trainer.put(val_loader.batch(i)) for i in range(t.eval_steps)]
    peak = peak_flops(jax.devices()[0].device_kind, t.precision)
    peak = peak * jax.device_count() if peak else None
    accumulation = f" ({t.accumulation})" if t.grad_accum_steps > 1 else ""
    say(f"{config.name}: {num_params(config.model) / 1e6:.1f}M parameters, {jax.device_count()} "
        f"{jax.devices()[0].device_kind} devices as {dict(mesh.shape)}, {t.precision}, "
        f"{t.grad_accum_steps} micro-batch(es) a step{accumulation}; steps {step} -> {end}")

    try:
        tick, timed_steps = time.perf_counter(), 0
        while step < end:
            state, metrics = trainer.step(state, train_loader, position)
            step, position, timed_steps = step + 1, position + t.grad_accum_steps, timed_steps + 1
            if step % t.log_interval == 0 or step == t.max_steps:
                metrics = jax.device_get(metrics)
                step_time = (time.perf_counter() - tick) / timed_steps
                tokens_per_s = t.batch_size * seq_len / step_time
                record = {"step": step, "loss": float(metrics["loss"]), "lr": lr_at(step - 1, t),
                          "grad_norm": float(metrics["grad_norm"]), "tokens_per_s": tokens_per_s,
                          "mfu": mfu(tokens_per_s, config.model, peak, seq_len), "step_time_s": step_time}
                if "loss_scale" in metrics:
                    record["loss_scale"] = float(metrics["loss_scale"])
                writer.write(record)
                say(_log_line(record, t.max_steps))
                tick, timed_steps = time.perf_counter(), 0
            elif step == first_step + 1:  # that call compiled the step function: keep it out of the step times
                jax.block_until_ready(state)
                say(f"step {step:>6} | compiled and ran in {time.perf_counter() - tick:.1f} s")
                tick, timed_steps = time.perf_counter(), 0
            if val_batches and ((t.eval_interval > 0 and step % t.eval_interval == 0) or step == t.max_steps):
                losses = [trainer.eval_step(state.params, batch) for batch in val_batches]
                val_loss = float(np.mean(jax.device_get(losses)))
                writer.write({"step": step, "val_loss": val_loss})
                say(f"step {step:>6} | val loss {val_loss:.4f}")
                tick, timed_steps = time.perf_counter(), 0  # step times leave evaluation out
            if (t.save_interval > 0 and step % t.save_interval == 0) or step == end:
                checkpoint.save(manager, state, config, position)
    finally:  # an interrupted run still finishes the checkpoint it was writing, and keeps its metrics
        manager.wait_until_finished()
        manager.close()
        writer.close()
    if step >= t.max_steps and sample_tokens > 0:
        say("sample:\n" + _sample_text(trainer, state.params, sample_tokens, t.seed))
    return state


def _loaders(config: Config, trainer: Trainer) -> tuple[TokenLoader, TokenLoader]:
    """Train and validation loaders for this process's rows of every micro-batch."""
    t = config.train
    if jax.process_count() > 1:  # one process prepares an embedded corpus; the others wait, then read it
        if jax.process_index() == 0:
            data_paths(config)
        multihost_utils.sync_global_devices("gpt2_jax: data prepared")
    train_paths, val_paths = data_paths(config, progress=jax.process_index() == 0)
    index, count = sharding.process_rows(trainer.micro_batch_sharding, (t.micro_batch_size, config.model.block_size))
    common = dict(process_index=index, process_count=count, seed=t.seed, vocab_size=config.model.vocab_size)
    return (TokenLoader(train_paths, t.micro_batch_size, config.model.block_size, shuffle=True, **common),
            TokenLoader(val_paths, t.micro_batch_size, config.model.block_size, shuffle=False, **common))


def _restore_or_init(trainer: Trainer, manager, init_from: str | None, say) -> tuple[TrainState, int]:
    """(state, loader position): the newest checkpoint's if there is one, else a new state (from --init-from's
    weights when given)."""
    config = trainer.config
    if manager.latest_step() is None:
        params = checkpoint.init_params_from(init_from, config) if init_from else None
        return trainer.init(jax.random.PRNGKey(config.train.seed), params), 0
    saved = loads_toml(checkpoint.read_meta(manager.directory)["config_toml"])
    _check_resumable(saved, config, manager.directory)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            trainer.abstract_state, trainer.state_shardings)
    state, meta = checkpoint.restore(manager, abstract)
    say(f"resumed from step {meta['step']} in {manager.directory}" + (" (--init-from ignored)" if init_from else ""))
    return state, int(meta["loader_position"])


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


def _log_line(record: dict, max_steps: int) -> str:
    line = (f"step {record['step']:>6}/{max_steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
            f"grad norm {record['grad_norm']:.3f} | {record['step_time_s'] * 1000:.0f} ms/step | "
            f"{record['tokens_per_s']:,.0f} tok/s")
    if record["mfu"] is not None:
        line += f" | mfu {record['mfu']:.1%}"
    if "loss_scale" in record:
        line += f" | loss scale {record['loss_scale']:g}"
    return line


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
    train(config, run_dir, init_from=args.init_from, stop_at=args.stop_at, sample_tokens=args.sample_tokens)
