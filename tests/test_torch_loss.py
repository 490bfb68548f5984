"""The fused head and loss (gpt2_torch/loss.py) against the plain one: the same loss and the same gradients."""

import numpy as np
import pytest
import torch

from gpt2_torch.loss import fused_cross_entropy
from gpt2_torch.model import cross_entropy

pytestmark = pytest.mark.usefixtures("torch_one_thread")

VOCAB, PADDED, B, T, C = 100, 128, 3, 12, 16


def batch(seed: int = 0):
    """The inputs of tests/test_jax_loss.py: hidden states, an embedding whose padding rows would take much
    probability if they were not masked, and targets with ignored positions."""
    rng = np.random.default_rng(seed)
    x = torch.tensor(rng.normal(size=(B, T, C)), dtype=torch.float32, requires_grad=True)
    embedding = torch.tensor(rng.normal(size=(PADDED, C)) * 0.5, dtype=torch.float32)
    embedding[VOCAB:] = 3.0
    embedding.requires_grad_(True)
    targets = rng.integers(0, VOCAB, (B, T))
    targets[0, :5] = -1
    targets[2, -1] = -1
    return x, embedding, torch.tensor(targets)


def value_and_grads(loss_fn, x, embedding, targets):
    loss = loss_fn(x, embedding, targets)
    loss.backward()
    return loss.detach(), x.grad, embedding.grad


def plain(x, embedding, targets):
    return cross_entropy(x @ embedding.T, targets, VOCAB)


@pytest.mark.parametrize("chunk", [1, 5, T, 64])  # 5 leaves a ragged last chunk; 64 is longer than the sequence
def test_fused_loss_and_gradients_equal_the_plain_ones(chunk):
    loss, dx, dw = value_and_grads(lambda *a: fused_cross_entropy(*a, VOCAB, chunk), *batch())
    want_loss, want_dx, want_dw = value_and_grads(plain, *batch())
    assert float(loss) == pytest.approx(float(want_loss), rel=1e-6)
    torch.testing.assert_close(dx, want_dx, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dw, want_dw, rtol=1e-5, atol=1e-7)
    assert dw[VOCAB:].abs().max() == 0 and dx[0, :5].abs().max() == 0


def test_without_gradients_it_is_the_same_loss():
    x, embedding, targets = batch()
    with torch.no_grad():
        assert float(fused_cross_entropy(x, embedding, targets, VOCAB, 5)) == pytest.approx(
            float(plain(x, embedding, targets)), rel=1e-6)


def test_the_backward_pass_scales_with_the_incoming_gradient():
    """GradScaler multiplies the loss before backward() under fp16: the gradients must follow."""
    _, dx, dw = value_and_grads(lambda *a: 1024.0 * fused_cross_entropy(*a, VOCAB, 5), *batch())
    _, want_dx, want_dw = value_and_grads(lambda *a: 1024.0 * plain(*a), *batch())
    torch.testing.assert_close(dx, want_dx, rtol=1e-5, atol=1024 * 1e-7)
    torch.testing.assert_close(dw, want_dw, rtol=1e-5, atol=1024 * 1e-7)


def test_every_target_ignored_gives_zero_loss_and_gradient():
    x, embedding, targets = batch()
    loss, dx, dw = value_and_grads(lambda x, w, t: fused_cross_entropy(x, w, t, VOCAB, 5), x, embedding,
                                   torch.full_like(targets, -1))
    assert float(loss) == 0.0 and dx.abs().max() == 0 and dw.abs().max() == 0


def test_under_bf16_autocast_it_is_the_plain_loss_up_to_rounding():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, dx, dw = value_and_grads(lambda *a: fused_cross_entropy(*a, VOCAB, 5), *batch())
        want_loss, want_dx, want_dw = value_and_grads(lambda x, w, t: cross_entropy(
            torch.nn.functional.linear(x, w), t, VOCAB), *batch())
    assert dx.dtype == torch.float32 and dw.dtype == torch.float32  # x and the embedding are fp32 leaves
    assert float(loss) == pytest.approx(float(want_loss), rel=1e-3)
    torch.testing.assert_close(dw, want_dw, rtol=0, atol=3e-2 * float(want_dw.abs().max()))
    torch.testing.assert_close(dx, want_dx, rtol=0, atol=3e-2 * float(want_dx.abs().max()))


def test_under_fp16_autocast_the_gradients_keep_their_small_values():
    """Over 16k positions each dlogit/count is ~1e-6, under fp16's smallest normal number (6e-5): the fused loss
    casts dlogits to fp16 unscaled and divides by the count in fp32, so its gradients stay within fp16's rounding
    of the fp64 ones, closer than the plain fp16 head's (whose autograd casts the divided values)."""
    rng = np.random.default_rng(0)
    Bf, Tf = 2, 8192
    x = torch.tensor(rng.normal(size=(Bf, Tf, C)) * 0.1, dtype=torch.float32)
    embedding = torch.tensor(rng.normal(size=(PADDED, C)) * 0.5, dtype=torch.float32)
    targets = torch.tensor(rng.integers(0, VOCAB, (Bf, Tf)))

    def grads(loss_fn):
        leaves = [x.clone().requires_grad_(True), embedding.clone().requires_grad_(True)]
        loss_fn(*leaves, targets).backward()
        return [leaf.grad.double() for leaf in leaves]

    want = grads(lambda x, w, t: cross_entropy(x.double() @ w.double().T, t, VOCAB))
    with torch.autocast("cpu", dtype=torch.float16):
        fused = grads(lambda x, w, t: fused_cross_entropy(x, w, t, VOCAB, 512))
        plain = grads(lambda x, w, t: cross_entropy(torch.nn.functional.linear(x, w), t, VOCAB))
    for got, base, ref in zip(fused, plain, want):
        error, plain_error = float((got - ref).norm() / ref.norm()), float((base - ref).norm() / ref.norm())
        assert error < 1.5e-3 and error < plain_error / 2
