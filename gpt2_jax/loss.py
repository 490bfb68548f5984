"""GPT-2's loss: the plain cross-entropy over the logits, and the output head fused with it, which gives the mean
loss of the last hidden states without [B, T, V] logits. The model (model.py) imports both.

The head's fp32 logits are by far the largest activation of a step (a 16 x 1024 micro-batch of `small` over the
50304-wide vocabulary is 3.3 GB), and the plain loss keeps them, their bf16 twin and their gradient alive at once.
Here the sequence goes through the head `chunk_size` positions at a time (every row of the batch in each chunk, so
each device keeps its own rows): the forward pass computes a chunk's loss and, when a gradient is wanted, that chunk's
gradient with respect to the hidden states and the head weights in the same pass (softmax minus one-hot, then two
matmuls), so that only one chunk's logits ever exist and the backward pass is a scaling. The FLOPs are those of the
plain head and loss: nothing is recomputed. `cross_entropy` below, over GPT.__call__'s logits, is the same loss
computed the plain way (tests/test_jax_loss.py holds the two together).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from gpt2_common.data import IGNORE_INDEX


# The embedding gradient's per-device shares [S, V, C]: the share axis over the devices of the batch, the
# vocabulary as the logits split it (over tensor), the width whole.
DW_SHARES_AXES = ("batch", "act_vocab", None)


def mask_padded_vocab(logits: jax.Array, vocab_size: int) -> jax.Array:
    """-inf at ids >= vocab_size: the rows that pad the embedding to a fast size never take probability."""
    ids = jnp.arange(logits.shape[-1])
    return jnp.where(ids < vocab_size, logits, -jnp.inf)


def cross_entropy(logits: jax.Array, targets: jax.Array, vocab_size: int) -> jax.Array:
    """Mean fp32 cross-entropy over the positions whose target is not IGNORE_INDEX (-1: positions to ignore)."""
    valid = targets != IGNORE_INDEX
    losses = optax.losses.softmax_cross_entropy_with_integer_labels(
        mask_padded_vocab(logits.astype(jnp.float32), vocab_size),
        jnp.where(valid, targets, 0),  # any in-range id: an ignored position's loss is zeroed below
    )
    return jnp.sum(losses * valid) / jnp.maximum(jnp.sum(valid), 1)


def fused_cross_entropy(x: jax.Array, embedding: jax.Array, targets: jax.Array, vocab_size: int, chunk_size: int,
                        dtype: Any, keep_exp: bool = False) -> jax.Array:
    """Mean fp32 cross-entropy of targets [B, T] (IGNORE_INDEX: skipped) under logits x @ embedding.T, by chunks.

    x: the final hidden states [B, T, C] in the compute dtype; embedding: the fp32 token embedding [V_padded, C],
    cast to dtype for the matmuls as the plain head casts it; ids >= vocab_size (the padding) never take probability.
    keep_exp: compute each chunk's exponentials once for the loss and the gradient's softmax, rather than twice
    (model.loss_exp).
    """
    # The custom VJP hands back a cotangent in x's dtype: make that the compute dtype it was written for.
    return _fused(x.astype(dtype), embedding, targets, vocab_size, chunk_size, dtype, keep_exp)


def _chunked(x: jax.Array, targets: jax.Array, chunk_size: int) -> tuple[jax.Array, jax.Array]:
    """[B, T, C], [B, T] -> [n, B, chunk, C], [n, B, chunk]: the sequence cut into n chunks (padding ignored)."""
    B, T, C = x.shape
    chunk_size = min(chunk_size, T)
    n = -(-T // chunk_size)
    pad = n * chunk_size - T
    x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)
    return (x.reshape(B, n, chunk_size, C).swapaxes(0, 1), targets.reshape(B, n, chunk_size).swapaxes(0, 1))


def _chunk_logits(x: jax.Array, w: jax.Array, vocab_size: int) -> jax.Array:
    """One chunk through the head: fp32 logits [B, chunk, V] with the padded ids at -inf, as the plain head gives."""
    logits = nn.with_logical_constraint(jnp.dot(x, w.T), ("batch", "seq", "act_vocab")).astype(jnp.float32)
    return mask_padded_vocab(logits, vocab_size)


def _chunk_nll(logits: jax.Array, targets: jax.Array,
               lse: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(NLL of each row's valid positions [B], logsumexp [B, chunk], valid mask [B, chunk]); `lse` if known."""
    valid = targets != IGNORE_INDEX
    lse = jax.nn.logsumexp(logits, axis=-1) if lse is None else lse
    target_logit = jnp.take_along_axis(logits, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, lse - target_logit, 0.0), axis=-1), lse, valid


def _chunk_nll_and_softmax(logits: jax.Array, targets: jax.Array,
                           keep_exp: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(NLL of each row's valid positions [B], softmax [B, chunk, V], valid mask [B, chunk]); keep_exp: both from
    one exp of the logits, else the softmax from the logsumexp and a second exp (see model.loss_exp)."""
    if not keep_exp:
        nll, lse, valid = _chunk_nll(logits, targets)
        return nll, jnp.exp(logits - lse[..., None]), valid
    peak = jnp.max(logits, axis=-1, keepdims=True)
    exp = jnp.exp(logits - peak)
    total = jnp.sum(exp, axis=-1)
    nll, _, valid = _chunk_nll(logits, targets, lse=peak[..., 0] + jnp.log(total))
    return nll, exp / total[..., None], valid


def eval_chunk_size(rows: int, length: int, chunk_tokens: int) -> int:
    """Positions per chunk (or group) for fused_token_losses: about `chunk_tokens` tokens (rows x positions)."""
    return max(1, min(length, chunk_tokens // rows))


def fused_token_losses(x: jax.Array, embedding: jax.Array, targets: jax.Array, vocab_size: int, chunk_size: int,
                       dtype: Any, group_size: int | None = None) -> jax.Array:
    """fp32 NLL [B, T] of each target (0 where it is IGNORE_INDEX) under logits x @ embedding.T, `chunk_size`
    positions at a time, for evaluation (no gradient). Value for value the terms `cross_entropy` averages over the
    plain head's logits: each position's logits are the same row of the same matmul, its loss the same optax
    reduction, only the [B, T, V] fp32 logits (and the passes over them, out of every cache) never exist.

    group_size: positions of a chunk whose losses are one reduction of their own. XLA on a CPU runs one reduction on
    one thread, but independent ones side by side, so groups put every core to work on the softmax's passes, which
    cost as much as the head's matmul (each row's loss stays the same reduction, so its bits do not change)."""
    w = embedding.astype(dtype)
    xs, ts = _chunked(x.astype(dtype), targets, chunk_size)
    chunk_size = xs.shape[2]
    group_size = min(group_size or chunk_size, chunk_size)

    def chunk_nll(carry, chunk):
        x_c, t_c = chunk
        logits = _chunk_logits(x_c, w, vocab_size)
        valid = t_c != IGNORE_INDEX
        labels = jnp.where(valid, t_c, 0)
        losses = jnp.concatenate([
            optax.losses.softmax_cross_entropy_with_integer_labels(logits[:, g:g + group_size],
                                                                   labels[:, g:g + group_size])
            for g in range(0, chunk_size, group_size)], axis=1)
        return carry, jnp.where(valid, losses, 0.0)

    _, nll = jax.lax.scan(chunk_nll, None, (xs, ts))  # [n, B, chunk]
    B, T = targets.shape
    return nll.swapaxes(0, 1).reshape(B, -1)[:, :T]


def _batch_shards() -> int:
    """How many devices the batch's rows are split over in the mesh being traced for (1 outside a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    axes = nn.logical_to_mesh_axes(("batch",))[0] or ()
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def _loss(x, embedding, targets, vocab_size, chunk_size, dtype):
    w = embedding.astype(dtype)
    xs, ts = _chunked(x, targets, chunk_size)

    def add_chunk(row_totals, chunk):
        x_c, t_c = chunk
        nll, _, _ = _chunk_nll(_chunk_logits(x_c, w, vocab_size), t_c)
        return row_totals + nll, None

    # A total per row stays on its row's device: the rows are summed once, after the last chunk.
    row_totals, _ = jax.lax.scan(add_chunk, jnp.zeros(x.shape[0], jnp.float32), (xs, ts))
    return jnp.sum(row_totals) / jnp.maximum(jnp.sum(targets != IGNORE_INDEX), 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _fused(x, embedding, targets, vocab_size, chunk_size, dtype, keep_exp):
    return _loss(x, embedding, targets, vocab_size, chunk_size, dtype)  # no gradient: the logsumexp suffices


def _fused_forward(x, embedding, targets, vocab_size, chunk_size, dtype, keep_exp):
    """The loss, and its gradients with respect to x and the embedding, computed in one pass over the chunks.

    d loss / d logits = (softmax - one_hot(target)) / count on the valid positions. It is cast to the compute dtype
    before its matmuls as autodiff would cast it, but unscaled by 1/count (in [-1, 1]: no fp16 underflow); the
    matmuls accumulate in fp32 and the 1/count is applied there. The embedding's gradient sums over every chunk in
    fp32, where the plain path's single matmul would round its bf16 product once.

    That sum is over rows that lie on different devices. Kept in one replicated [V, C] carry, it would cost an
    all-reduce of the whole matrix every chunk; instead each of the S devices that hold rows sums its own rows'
    share into [S, V, C] (one [V, C] slice a device: the memory of the replicated carry), and the shares are summed
    once, after the scan.
    """
    B, T, C = x.shape
    w = embedding.astype(dtype)
    count = jnp.maximum(jnp.sum(targets != IGNORE_INDEX), 1).astype(jnp.float32)
    xs, ts = _chunked(x, targets, chunk_size)
    shards = _batch_shards()

    def by_shard(a: jax.Array) -> jax.Array:
        """[B, chunk, D] -> [S, B / S * chunk, D]: the rows of each device, whose block of the batch they are."""
        return a.reshape(shards, -1, a.shape[-1])

    def add_chunk(carry, chunk):
        row_totals, dw_shares = carry
        x_c, t_c = chunk
        logits = _chunk_logits(x_c, w, vocab_size)
        nll, softmax, valid = _chunk_nll_and_softmax(logits, t_c, keep_exp)
        one_hot = jax.nn.one_hot(t_c, logits.shape[-1], dtype=jnp.float32)  # all zero at t = IGNORE_INDEX
        dlogits = jnp.where(valid[..., None], softmax - one_hot, 0.0).astype(dtype)
        dx_c = jnp.dot(dlogits, w, preferred_element_type=jnp.float32)
        dw_c = jnp.einsum("srv,src->svc", by_shard(dlogits), by_shard(x_c), preferred_element_type=jnp.float32)
        return (row_totals + nll, dw_shares + nn.with_logical_constraint(dw_c, DW_SHARES_AXES)), dx_c

    dw_shares = nn.with_logical_constraint(jnp.zeros((shards, *w.shape), jnp.float32), DW_SHARES_AXES)
    (row_totals, dw_shares), dxs = jax.lax.scan(add_chunk, (jnp.zeros(B, jnp.float32), dw_shares), (xs, ts))
    dx = dxs.swapaxes(0, 1).reshape(B, -1, C)[:, :T]
    return jnp.sum(row_totals) / count, (dx / count, jnp.sum(dw_shares, axis=0) / count)


def _fused_backward(vocab_size, chunk_size, dtype, keep_exp, residuals, g):
    dx, dw = residuals
    return (g * dx).astype(dtype), g * dw, None


_fused.defvjp(_fused_forward, _fused_backward)
