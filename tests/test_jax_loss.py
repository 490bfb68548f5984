"""The fused head and loss (gpt2_jax/loss.py) against the plain one: the same loss and the same gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gpt2_jax.loss import fused_cross_entropy, fused_token_losses
from gpt2_jax.model import cross_entropy, mask_padded_vocab
from loss_inputs import head_inputs

VOCAB, PADDED, B, T, C = 100, 128, 3, 12, 16


batch = functools.partial(head_inputs, (B, T, C), VOCAB, PADDED)  # (seed, dtype) -> x, embedding, targets


def plain_loss(x, embedding, targets, dtype=jnp.float32):
    """What GPT.__call__ computes with loss_chunk_size=0: the whole logits, then model.cross_entropy."""
    return cross_entropy(jnp.dot(x.astype(dtype), embedding.astype(dtype).T).astype(jnp.float32), targets, VOCAB)


def fused_loss(x, embedding, targets, chunk, dtype=jnp.float32, keep_exp=False):
    return fused_cross_entropy(x, embedding, targets, VOCAB, chunk, dtype, keep_exp)


@functools.cache
def plain_value_and_grads():
    return jax.jit(jax.value_and_grad(plain_loss, argnums=(0, 1)))(*batch())


@pytest.mark.parametrize("keep_exp", [False, True])  # model.loss_exp: recompute or keep the exponentials
@pytest.mark.parametrize("chunk", [1, 5, T, 64])  # 5 leaves a ragged last chunk; 64 is longer than the sequence
def test_fused_loss_and_gradients_equal_the_plain_ones(chunk, keep_exp):
    loss, (dx, dw) = jax.jit(jax.value_and_grad(fused_loss, argnums=(0, 1)), static_argnums=(3, 4, 5))(
        *batch(), chunk, jnp.float32, keep_exp)
    plain, (plain_dx, plain_dw) = plain_value_and_grads()
    assert float(loss) == pytest.approx(float(plain), rel=1e-6)
    np.testing.assert_allclose(dx, plain_dx, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dw, plain_dw, rtol=1e-5, atol=1e-7)
    assert np.abs(np.asarray(dw)[VOCAB:]).max() == 0  # the padding never takes probability, so never a gradient
    assert np.abs(np.asarray(dx)[0, :5]).max() == 0  # nor does an ignored position


def test_fused_loss_without_gradient_is_the_same_loss():
    loss = jax.jit(fused_loss, static_argnums=3)(*batch(), 5)
    assert float(loss) == pytest.approx(float(plain_value_and_grads()[0]), rel=1e-6)


def plain_token_losses(logits, targets, vocab_size):
    """What scripts/evaluate.py scored before it went by chunks: the whole logits, then optax's per-token loss."""
    valid = targets != -1
    losses = optax.losses.softmax_cross_entropy_with_integer_labels(mask_padded_vocab(logits, vocab_size),
                                                                    jnp.where(valid, targets, 0))
    return jnp.where(valid, losses, 0.0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("chunk,group", [(1, None), (5, 2), (T, 5), (64, None)])  # ragged last chunks and groups
def test_per_token_losses_by_chunks_are_the_plain_ones(chunk, group, dtype):
    x, embedding, targets = batch(dtype=dtype)
    chunked = jax.jit(fused_token_losses, static_argnums=(3, 4, 5, 6))(x, embedding, targets, VOCAB, chunk, dtype,
                                                                         group)
    logits = jnp.dot(x.astype(dtype), embedding.astype(dtype).T).astype(jnp.float32)
    assert chunked.shape == (B, T) and chunked.dtype == jnp.float32
    np.testing.assert_allclose(chunked, plain_token_losses(logits, targets, VOCAB), rtol=1e-6)
    assert np.asarray(chunked)[0, :5].max() == 0 and np.asarray(chunked).min() >= 0


@pytest.mark.parametrize("rows,length,precision", [(8, 128, "fp32"), (8, 128, "bf16"),  # shards' batches,
                                                   (4, 64, "fp32"), (1, 128, "bf16")])  # HellaSwag, text windows
def test_evaluation_losses_are_the_whole_logits_ones_bit_for_bit(rows, length, precision):
    """At GPT-2's vocabulary, in the shapes evaluation scores, GPT(reduction="none") by cache-sized chunks gives
    the losses of the whole logits to the last bit: what scripts/evaluate.py reported before, it reports still.
    (With a toy vocabulary XLA's reductions over chunks of a few tokens can round differently; the test above.)"""
    from gpt2_common.config import ModelConfig
    from gpt2_jax.model import build_model
    from test_jax_optim import host_params

    model = build_model(ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=128), precision, backend="cpu")
    rng = np.random.default_rng(rows * length)
    inputs = jnp.asarray(rng.integers(0, 50257, (rows, length)), jnp.int32)
    targets = np.asarray(rng.integers(0, 50257, (rows, length)), np.int32)
    targets[0, : length // 4] = -1
    params = host_params(model)  # GPT-2's initial scales, drawn by numpy: no seconds of compiling model.init
    by_chunks = jax.jit(lambda p, i, t: model.apply({"params": p}, i, targets=t, reduction="none"))
    whole = jax.jit(lambda p, i, t: plain_token_losses(model.apply({"params": p}, i), t, 50257))
    np.testing.assert_array_equal(by_chunks(params, inputs, targets), whole(params, inputs, targets))


def test_the_backward_pass_scales_with_the_incoming_gradient():
    """Under fp16 the loss is multiplied by the loss scale before the backward pass: the gradients must follow."""
    x, embedding, targets = batch()
    scaled = jax.jit(jax.grad(lambda x, w: 1024.0 * fused_loss(x, w, targets, 5), argnums=(0, 1)))(x, embedding)
    for got, want in zip(scaled, plain_value_and_grads()[1]):
        np.testing.assert_allclose(got, 1024.0 * np.asarray(want), rtol=1e-5, atol=1024.0 * 1e-7)


@pytest.mark.parametrize("keep_exp", [False, True])
def test_every_target_ignored_gives_zero_loss_and_gradient(keep_exp):
    x, embedding, targets = batch()
    loss, grads = jax.jit(jax.value_and_grad(fused_loss, argnums=(0, 1)), static_argnums=(3, 4, 5))(
        x, embedding, jnp.full_like(targets, -1), 5, jnp.float32, keep_exp)
    assert float(loss) == 0.0
    assert all(np.abs(np.asarray(g)).max() == 0 for g in grads)


@pytest.mark.parametrize("keep_exp", [False, True])
def test_bf16_fused_loss_is_the_plain_bf16_loss_up_to_rounding(keep_exp):
    x, embedding, targets = batch(dtype=jnp.bfloat16)
    loss, (dx, dw) = jax.jit(jax.value_and_grad(fused_loss, argnums=(0, 1)), static_argnums=(3, 4, 5))(
        x, embedding, targets, 5, jnp.bfloat16, keep_exp)
    plain, (plain_dx, plain_dw) = jax.jit(jax.value_and_grad(plain_loss, argnums=(0, 1)), static_argnums=3)(
        x, embedding, targets, jnp.bfloat16)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    assert float(loss) == pytest.approx(float(plain), rel=1e-3)
    scale = np.abs(np.asarray(plain_dw)).max()
    np.testing.assert_allclose(np.asarray(dw), np.asarray(plain_dw), atol=3e-2 * scale)
    np.testing.assert_allclose(np.asarray(dx, np.float32), np.asarray(plain_dx, np.float32),
                               atol=3e-2 * np.abs(np.asarray(plain_dx, np.float32)).max())


# On a GPU, scripts/gpu_check.sh runs this file on the one device there.
@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (the CPU's simulated ones)")
@pytest.mark.parametrize("mesh", [["mesh.data=8"], ["mesh.data=1", "mesh.fsdp=8"],
                                  ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]])
def test_the_embedding_gradient_crosses_devices_once_a_step_not_once_a_chunk(mesh):
    """Its rows lie on different devices: summed into one carry, the [V, C] gradient would be all-reduced in every
    chunk of the loss's loop (as it was). Each device now sums its own share, and no collective inside a loop of the
    compiled step moves a vocabulary-sized array."""
    from gpt2_jax.hlo import collectives
    from gpt2_common.config import load_config
    from gpt2_jax import sharding
    from gpt2_jax.step import build_trainer, compile_on_zeros

    config = load_config("tiny", [*mesh, "train.batch_size=16", "train.micro_batch_size=16",
                                  "model.loss_chunk_size=16"])
    found = collectives(compile_on_zeros(build_trainer(config, sharding.make_mesh(config.mesh))).as_text())
    # tiny's padded vocabulary, whole or split over 2 tensor devices
    vocabulary_sized = [c for c in found if c.op in ("all-reduce", "reduce-scatter")
                        and any(rows in shape for shape in c.shapes for rows in (50304, 25152))]
    assert vocabulary_sized and all(c.runs == 1 for c in vocabulary_sized)  # once a step, after the loss's loop
