"""AdamW, decay groups, schedule and clipping of the PyTorch trainer, checked against lr_at and the optax chain."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from gpt2_common.config import ModelConfig, TrainConfig
from gpt2_common.schedule import lr_at
from gpt2_torch.model import GPT, cross_entropy
from gpt2_torch.optim import clip_gradients, load_optimizer_state, make_optimizer, param_groups, set_lr



pytestmark = pytest.mark.usefixtures("torch_one_thread")

TINY = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=16, vocab_size=100)
TRAIN = TrainConfig(lr=1e-2, min_lr=1e-3, warmup_steps=2, max_steps=6, weight_decay=0.1, grad_clip=0.5)


def tiny_model(seed=0) -> GPT:
    torch.manual_seed(seed)
    return GPT(TINY)


def batches(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(n):
        batch = torch.randint(0, 100, (4, 17), generator=generator)
        yield batch[:, :-1], batch[:, 1:]


def run_steps(model, optimizer, train, n):
    """The trainer's update order: loss, backward, set lr, clip, step."""
    norms = []
    for update, (inputs, targets) in enumerate(batches(n)):
        cross_entropy(model(inputs), targets, 100).backward()
        set_lr(optimizer, update, train)
        norms.append(clip_gradients(model.parameters(), train.grad_clip).item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return norms


def test_weight_decay_on_matrices_and_embeddings_only():
    model = tiny_model()
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "transformer.wte.weight" in decayed and "transformer.wpe.weight" in decayed
    assert "transformer.h.0.attn.c_attn.weight" in decayed
    assert all(p.dim() < 2 for p in no_decay["params"]) and len(no_decay["params"]) == 2 * 8 + 2
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))  # tied wte counted once


def test_learning_rate_per_step_is_lr_at():
    model = tiny_model()
    optimizer = make_optimizer(model, TRAIN)
    for update in range(TRAIN.max_steps):
        lr = set_lr(optimizer, update, TRAIN)
        assert lr == lr_at(update, TRAIN)
        assert all(group["lr"] == lr for group in optimizer.param_groups)
    assert lr_at(0, TRAIN) == pytest.approx(TRAIN.lr / 2) and lr_at(TRAIN.max_steps - 1, TRAIN) == TRAIN.min_lr


def test_fused_adamw_is_used_on_cpu_and_matches_the_unfused_one():
    fused_model, plain_model = tiny_model(), tiny_model()
    fused = make_optimizer(fused_model, TRAIN)
    assert fused.defaults["fused"] is True  # torch >= 2.4 has a fused CPU kernel; make_optimizer asks for it
    plain = make_optimizer(plain_model, TRAIN, fused=False)
    assert run_steps(fused_model, fused, TRAIN, 5) == pytest.approx(run_steps(plain_model, plain, TRAIN, 5), rel=1e-5)
    for (name, a), b in zip(fused_model.named_parameters(), plain_model.parameters()):
        if name.endswith("c_attn.bias"):
            # The key bias has a gradient of exactly 0 in exact arithmetic (it adds the same q.b_k to every score
            # of a row, which the softmax ignores): what remains is rounding noise, which Adam scales up to steps
            # of ~lr. Compare only the query and value biases.
            a, b = torch.cat([a[:64], a[128:]]), torch.cat([b[:64], b[128:]])
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_loading_optimizer_state_keeps_the_current_config():
    model = tiny_model()
    saved = make_optimizer(model, TRAIN)
    run_steps(model, saved, TRAIN, 2)
    resumed = make_optimizer(model, replace(TRAIN, weight_decay=0.0, beta2=0.9), fused=False)
    load_optimizer_state(resumed, saved.state_dict())
    assert resumed.param_groups[0]["weight_decay"] == 0.0 and resumed.param_groups[0]["betas"] == (0.9, 0.9)
    assert not resumed.param_groups[0]["fused"]
    for p in model.parameters():
        assert all(torch.equal(resumed.state[p][k], saved.state[p][k]) for k in ("step", "exp_avg", "exp_avg_sq"))


def test_clipping_reports_the_norm_before_clipping():
    model = tiny_model()
    inputs, targets = next(batches(1))
    cross_entropy(model(inputs), targets, 100).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert norm > 0.1
    assert clip_gradients(model.parameters(), 0.0).item() == pytest.approx(norm.item(), rel=1e-6)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))  # 0: off
    assert clip_gradients(model.parameters(), 0.1).item() == pytest.approx(norm.item(), rel=1e-6)
    after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()]))
    assert after.item() == pytest.approx(0.1, rel=1e-4)


def test_updates_match_the_optax_chain_step_for_step():
    """Same parameters, same gradients: torch's clip + AdamW + lr_at against optax's clip + adamw + schedule."""
    optax = pytest.importorskip("optax")
    import jax
    import jax.numpy as jnp

    model = tiny_model()
    optimizer = make_optimizer(model, TRAIN)
    names = [n for n, _ in model.named_parameters()]
    params = {n: jnp.asarray(p.detach().numpy()) for n, p in model.named_parameters()}
    schedule = optax.warmup_cosine_decay_schedule(0.0, TRAIN.lr, TRAIN.warmup_steps, TRAIN.max_steps, TRAIN.min_lr)
    chain = optax.chain(
        optax.clip_by_global_norm(TRAIN.grad_clip),
        optax.adamw(lambda count: schedule(count + 1), b1=TRAIN.beta1, b2=TRAIN.beta2, eps=TRAIN.eps,
                    weight_decay=TRAIN.weight_decay, mask={n: p.ndim >= 2 for n, p in params.items()}),
    )
    state = chain.init(params)

    @jax.jit  # one compile, not one per optax op and step
    def apply(grads, state, params):
        updates, state = chain.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for update, (inputs, targets) in enumerate(batches(TRAIN.max_steps)):
        cross_entropy(model(inputs), targets, 100).backward()
        grads = {n: jnp.asarray(p.grad.numpy()) for n, p in model.named_parameters()}
        set_lr(optimizer, update, TRAIN)
        clip_gradients(model.parameters(), TRAIN.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        params, state = apply(grads, state, params)
        for n, p in zip(names, model.parameters()):
            np.testing.assert_allclose(p.detach().numpy(), np.asarray(params[n]), rtol=1e-5, atol=1e-6,
                                       err_msg=f"update {update}: {n}")
