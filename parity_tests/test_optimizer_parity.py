"""The optimizers of both trainers, built by their own optim.py, take the same steps: clipping, AdamW with weight
decay on matrices only, and the learning rate of the shared schedule at every update of a run."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from gpt2_common.config import TrainConfig
from gpt2_common.schedule import lr_at
from gpt2_jax import weights as jw
from gpt2_jax.optim import build_optimizer, learning_rate_schedule
from gpt2_torch import weights as tw
from gpt2_torch.optim import clip_gradients, make_optimizer, set_lr
from parity_tests.conftest import CASES, jax_params, random_weights, torch_model

PARAM_ATOL = 1e-6
# lr 1e-2 and weight decay 0.1 move every parameter by far more than the tolerance (the decay alone by ~1e-4 of a
# LayerNorm scale), and warmup over 2 updates makes the three updates use three different learning rates.
TRAIN = TrainConfig(batch_size=1, micro_batch_size=1, max_steps=10, lr=1e-2, min_lr=1e-3, warmup_steps=2,
                    weight_decay=0.1, grad_clip=1.0, precision="fp32")


@pytest.mark.parametrize("case", CASES[1:3], ids=[c.name for c in CASES[1:3]])
def test_three_updates_give_the_same_parameters(case):
    model = case.model
    weights = random_weights(model)
    grads = [random_weights(model, seed=10 + i) for i in range(3)]  # norms far above grad_clip: clipping acts

    optimizer = build_optimizer(TRAIN)
    params = jax_params(weights, model)
    state = optimizer.init(params)
    update = jax.jit(optimizer.update)
    for g in grads:
        updates, state = update(jax_params(g, model), state, params)
        params = optax.apply_updates(params, updates)

    gpt = torch_model(weights, model)
    torch_optimizer = make_optimizer(gpt, TRAIN)
    for step, g in enumerate(grads):
        g_state = tw.from_canonical(g, model)
        for name, p in gpt.named_parameters():
            p.grad = g_state[name].clone()
        set_lr(torch_optimizer, step, TRAIN)
        assert clip_gradients(gpt.parameters(), TRAIN.grad_clip) > 10 * TRAIN.grad_clip
        torch_optimizer.step()

    ours_jax, ours_torch = jw.to_canonical(params, model), tw.to_canonical(gpt.state_dict(), model)
    for name, value in ours_torch.items():
        assert np.abs(value - weights[name]).max() > 100 * PARAM_ATOL, f"{name} did not move"
        np.testing.assert_allclose(ours_jax[name], value, rtol=0, atol=PARAM_ATOL, err_msg=name)


def test_a_skipped_update_is_skipped_alike():
    """A non-finite step (fp16 overflow, or train.nan_policy=skip) changes nothing in either trainer, and the
    schedule goes on with the step index in both: JAX's optax count and torch's lr_at(step) stay in step."""
    case = CASES[1]
    model = case.model
    weights = random_weights(model)
    grads = [random_weights(model, seed=10 + i) for i in range(3)]

    optimizer = build_optimizer(TRAIN)
    params = jax_params(weights, model)
    state = optimizer.init(params)
    update = jax.jit(optimizer.update)
    for i, g in enumerate(grads):
        g = jax_params(g, model)
        updates, state = update(jax.tree.map(lambda x: x * jnp.nan, g) if i == 1 else g, state, params)
        params = optax.apply_updates(params, updates)

    gpt = torch_model(weights, model)
    torch_optimizer = make_optimizer(gpt, TRAIN)
    for step, g in enumerate(grads):
        if step == 1:
            continue  # what GradScaler (fp16) and the loop (nan_policy=skip) do: no optimizer.step()
        g_state = tw.from_canonical(g, model)
        for name, p in gpt.named_parameters():
            p.grad = g_state[name].clone()
        set_lr(torch_optimizer, step, TRAIN)
        clip_gradients(gpt.parameters(), TRAIN.grad_clip)
        torch_optimizer.step()

    ours_jax, ours_torch = jw.to_canonical(params, model), tw.to_canonical(gpt.state_dict(), model)
    for name, value in ours_torch.items():
        np.testing.assert_allclose(ours_jax[name], value, rtol=0, atol=PARAM_ATOL, err_msg=name)


SCHEDULES = [
    TrainConfig(max_steps=60, warmup_steps=7, lr=0.1, min_lr=0.01, weight_decay=1.0),
    TrainConfig(max_steps=25, warmup_steps=0, lr=0.1, min_lr=0.02, weight_decay=1.0),
    TrainConfig(max_steps=12, warmup_steps=12, lr=0.1, min_lr=0.0, weight_decay=1.0),  # all warmup, no decay
]


def lr_used_by_jax(train: TrainConfig) -> np.ndarray:
    """The learning rate of each update, read back from what the optimizer did: with a zero gradient AdamW only
    decays, p <- p * (1 - lr * weight_decay), so each update's lr is (1 - p_new / p_old) / weight_decay."""
    optimizer = build_optimizer(dataclasses.replace(train, batch_size=1, micro_batch_size=1, precision="fp32"))
    params = {"matrix": jnp.ones((2, 2)), "bias": jnp.ones(2)}
    state, zeros = optimizer.init(params), jax.tree.map(jnp.zeros_like, params)
    update, used = jax.jit(optimizer.update), []
    for _ in range(train.max_steps):
        updates, state = update(zeros, state, params)
        new = optax.apply_updates(params, updates)
        used.append((1 - float(new["matrix"][0, 0]) / float(params["matrix"][0, 0])) / train.weight_decay)
        params = new
    assert np.array_equal(params["bias"], np.ones(2)), "a bias was decayed"
    return np.array(used)


def lr_used_by_torch(train: TrainConfig) -> np.ndarray:
    """As lr_used_by_jax, through the torch trainer's optimizer and set_lr, in float64 (exact to ~1e-13)."""
    layer = torch.nn.Linear(2, 2).double()
    torch.nn.init.ones_(layer.weight), torch.nn.init.ones_(layer.bias)
    optimizer, used = make_optimizer(layer, train), []
    for update in range(train.max_steps):
        for p in layer.parameters():
            p.grad = torch.zeros_like(p)
        set_lr(optimizer, update, train)
        before = layer.weight[0, 0].item()
        optimizer.step()
        used.append((1 - layer.weight[0, 0].item() / before) / train.weight_decay)
    assert torch.equal(layer.bias, torch.ones(2, dtype=torch.float64)), "a bias was decayed"
    return np.array(used)


@pytest.mark.parametrize("train", SCHEDULES, ids=["steps60-warmup7", "steps25-warmup0", "steps12-warmup12"])
def test_learning_rate_of_every_update_of_a_run(train):
    expected = np.array([lr_at(i, train) for i in range(train.max_steps)])
    optax_schedule = np.array([float(learning_rate_schedule(train)(i)) for i in range(train.max_steps)])
    np.testing.assert_allclose(optax_schedule, expected, rtol=1e-6, err_msg="optax schedule vs lr_at")
    np.testing.assert_allclose(lr_used_by_torch(train), expected, rtol=1e-9, err_msg="torch optimizer vs lr_at")
    # read back through fp32 arithmetic: (1 - p_new/p_old) carries ~1e-7 / (lr * weight_decay) relative error
    np.testing.assert_allclose(lr_used_by_jax(train), expected, rtol=1e-4, err_msg="optax optimizer vs lr_at")
    assert expected[0] > 0 and np.isclose(expected[-1], train.min_lr if train.warmup_steps < train.max_steps
                                          else train.lr)
