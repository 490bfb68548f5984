"""The optax chain (schedule, decay mask), gradient accumulation (MultiSteps and scan against one big batch) and
fp16 loss scaling (skip and halve on overflow, grow after good steps)."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gpt2_common.config import MeshConfig, TrainConfig, from_dict
from gpt2_common.schedule import lr_at
from gpt2_jax.optim import LossScale, build_optimizer, learning_rate_schedule
from gpt2_jax.sharding import make_mesh
from gpt2_jax import step as step_module
from gpt2_jax.step import build_trainer


def tiny_config(**train):
    base = dict(batch_size=16, micro_batch_size=8, max_steps=10, warmup_steps=2, lr=1e-3, min_lr=1e-4, precision="fp32")
    return from_dict({"model": dict(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=128),
                      "train": {**base, **train}}, name="tiny-test")


def host_params(model, seed=0):
    """GPT-2-like params drawn with numpy: XLA on CPU takes seconds to compile a random initialisation."""
    dummy = jnp.zeros((1, model.config.block_size), jnp.int32)
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), dummy))["params"]
    rng = np.random.default_rng(seed)

    def draw(path, shape):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return np.ones(shape.shape, np.float32)
        return rng.normal(0, 0.02 if len(shape.shape) == 2 else 0.01, shape.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


class RowLoader:
    """TokenLoader's interface over fixed rows: batch(p) is rows [p*rows, (p+1)*rows)."""

    def __init__(self, tokens, rows):
        self.tokens, self.rows = tokens, rows

    def batch(self, position):
        chunk = self.tokens[position * self.rows:(position + 1) * self.rows]
        return chunk[:, :-1], chunk[:, 1:]


def random_tokens(rows, seq_len=32, vocab=128, seed=1):
    return np.random.default_rng(seed).integers(0, vocab, (rows, seq_len + 1)).astype(np.int32)


@pytest.mark.parametrize("warmup, max_steps", [(2, 10), (0, 5), (5, 5), (10, 100)])
def test_schedule_equals_the_shared_lr_at(warmup, max_steps):
    train = TrainConfig(lr=6e-4, min_lr=6e-5, warmup_steps=warmup, max_steps=max_steps)
    lrs = jax.jit(learning_rate_schedule(train))(jnp.arange(max_steps + 2))
    np.testing.assert_allclose(lrs, [lr_at(i, train) for i in range(max_steps + 2)], rtol=1e-6, atol=1e-12)


def test_weight_decay_only_on_matrices_and_embeddings():
    train = TrainConfig(lr=0.1, min_lr=0.1, warmup_steps=0, max_steps=10, weight_decay=0.5, accumulation="scan")
    optimizer = build_optimizer(train)
    params = {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3), "scale": jnp.ones(3)}

    @jax.jit
    def update(params):
        zero_grads = jax.tree.map(jnp.zeros_like, params)
        updates, _ = optimizer.update(zero_grads, optimizer.init(params), params)
        return optax.apply_updates(params, updates)

    new = update(params)
    np.testing.assert_allclose(new["kernel"], 1 - 0.1 * 0.5)  # decoupled decay: p -= lr * wd * p
    np.testing.assert_array_equal(new["bias"], 1)
    np.testing.assert_array_equal(new["scale"], 1)


def test_a_skipped_update_advances_the_schedule_but_not_adam():
    """After a non-finite step the next update uses the next step's learning rate (as the PyTorch trainer's
    lr_at(step) does) and is Adam's first: |update| = lr for every entry, with no decay and no clipping."""
    train = TrainConfig(lr=1e-2, min_lr=1e-3, warmup_steps=4, max_steps=10, weight_decay=0.0, grad_clip=0.0,
                        accumulation="scan")
    optimizer = build_optimizer(train)
    params = {"kernel": jnp.ones((2, 3))}
    grads = {"kernel": jnp.asarray([[1.0, -2.0, 3.0], [-4.0, 5.0, -6.0]])}

    @jax.jit
    def two_updates(params):
        state = optimizer.init(params)
        skipped, state = optimizer.update(jax.tree.map(lambda g: g * jnp.nan, grads), state, params)
        applied, _ = optimizer.update(grads, state, params)
        return skipped, applied

    skipped, applied = two_updates(params)
    np.testing.assert_array_equal(skipped["kernel"], 0)
    np.testing.assert_allclose(applied["kernel"], -lr_at(1, train) * np.sign(grads["kernel"]), rtol=1e-5)
    assert lr_at(1, train) != lr_at(0, train)


def test_loss_scale_halves_on_overflow_and_grows_after_good_steps():
    scale = LossScale.create(growth_interval=3)
    assert float(scale.scale) == 2.0**16
    for expected in (2.0**16, 2.0**16, 2.0**17):
        scale = scale.adjust(jnp.array(True))
        assert float(scale.scale) == expected
    scale = scale.adjust(jnp.array(True)).adjust(jnp.array(False))
    assert float(scale.scale) == 2.0**16 and int(scale.good_steps) == 0


LAYOUTS = {  # name: (mesh, devices)
    "single": ({"data": 1}, 1),
    "data8": ({"data": 8}, 8),
    "fsdp8": ({"data": 1, "fsdp": 8}, 8),
    "data2_fsdp2_tensor2": ({"data": 2, "fsdp": 2, "tensor": 2}, 8),
}


@functools.cache
def trainer_for(layout="single", micro_batch_size=8, accumulation="multisteps"):
    """A trainer of batch 16 at a constant lr of 1e-2 on a layout of the mesh; cached, since compiling a step
    takes seconds on a CPU (test_jax_sharding.py and test_jax_train.py share these)."""
    mesh, devices = LAYOUTS[layout]
    config = tiny_config(micro_batch_size=micro_batch_size, accumulation=accumulation, lr=1e-2, min_lr=1e-2,
                         warmup_steps=0, max_steps=100)
    config = dataclasses.replace(config, mesh=MeshConfig(**mesh))
    return build_trainer(config, make_mesh(config.mesh, jax.devices()[:devices]))


@functools.cache
def trained(layout="single", micro_batch_size=8, accumulation="multisteps", steps=3):
    """(trainer, state, [(loss, grad norm)] of each step) after `steps` steps on one batch of 16 rows, from the
    same initial params."""
    trainer = trainer_for(layout, micro_batch_size, accumulation)
    initial = host_params(trainer.model)
    state = trainer.init(jax.random.PRNGKey(0), initial)
    loader, history = RowLoader(random_tokens(16), micro_batch_size), []
    for _ in range(steps):  # positions 0 .. 16/micro - 1 again and again: the same 16 rows every step
        state, metrics = trainer.step(state, loader, 0)
        history.append((float(metrics["loss"]), float(metrics["grad_norm"])))
    assert not np.array_equal(jax.device_get(state.params)["wte"]["embedding"], initial["wte"]["embedding"])
    return trainer, state, np.array(history)


def test_accumulated_micro_batches_equal_one_big_batch():
    _, _, whole = trained(micro_batch_size=16)
    for accumulation in ("multisteps", "scan"):
        _, state, accumulated = trained(micro_batch_size=8, accumulation=accumulation)
        # Losses after updates and the pre-clip norms of the mean gradients. (Parameters are not compared: Adam's
        # first steps move each weight by about +-lr whatever the size of its gradient, so the rounding noise of
        # near-zero gradients, e.g. of the key bias, flips their direction.)
        np.testing.assert_allclose(accumulated, whole, rtol=1e-5)
        assert int(state.step) == 3


# The scanned step's fp16 path (one adjust per call) is the simpler one; its compile costs ~15 s on two cores.
@pytest.mark.parametrize("accumulation", ["multisteps", pytest.param("scan", marks=pytest.mark.slow)])
def test_fp16_overflow_skips_the_step_and_halves_the_scale(accumulation, monkeypatch):
    # CPUs have no fp16 matmul with fp32 accumulation (which attention asks for), so the model computes in fp32
    # here and an overflow is simulated as fp16 would have it: the gradient is inf while the scale is too big.
    real_build_model, real_loss_and_grads = step_module.build_model, step_module.loss_and_grads

    def overflowing_loss_and_grads(state, *args, **kwargs):
        loss, grads = real_loss_and_grads(state, *args, **kwargs)
        too_big = state.loss_scale.scale > 2.0**19
        return loss, jax.tree.map(lambda g: jnp.where(too_big, jnp.inf, g), grads)

    monkeypatch.setattr(step_module, "build_model", lambda cfg, _, backend: real_build_model(cfg, "fp32", backend))
    monkeypatch.setattr(step_module, "loss_and_grads", overflowing_loss_and_grads)
    config = tiny_config(precision="fp16", accumulation=accumulation)
    trainer = build_trainer(config, make_mesh(config.mesh))
    state = trainer.init(jax.random.PRNGKey(0), host_params(trainer.model))
    state = state.replace(loss_scale=state.loss_scale.replace(scale=jnp.float32(2.0**20)))
    before = jax.device_get(state.params)
    loader = RowLoader(random_tokens(64), 8)

    state, metrics = trainer.step(state, loader, 0)
    assert not np.isfinite(float(metrics["grad_norm"]))
    assert int(state.step) == 1 and float(state.loss_scale.scale) == 2.0**19
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before)

    state, metrics = trainer.step(state, loader, 2)
    assert np.isfinite(float(metrics["grad_norm"]))
    assert float(state.loss_scale.scale) == 2.0**19 and int(state.loss_scale.good_steps) == 1
    after = jax.device_get(state.params)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(after))
    assert not np.array_equal(after["h_0"]["mlp"]["c_fc"]["kernel"], before["h_0"]["mlp"]["c_fc"]["kernel"])
    # Adam counted the applied update only; the schedule counted both steps (torch's lr follows the step index too).
    counts = {jax.tree_util.keystr(path): int(c)
              for path, c in optax.tree_utils.tree_get_all_with_path(state.opt_state, "count")}
    assert sorted(counts.values()) == [1, 2]
    assert counts[max(counts, key=lambda p: "inner_state" in p)] == 1  # Adam's, inside the skip (ApplyIfFiniteState)
