"""The output head and its cross-entropy as Pallas kernels (model.loss_kernel = "pallas"): the loss of the last hidden
states under logits x @ embedding.T without ever writing the logits, not even a chunk's, to memory.

The forward kernel takes a block of rows and walks the (padded) vocabulary a tile at a time: it computes the tile's
logits on chip, folds them into a running max and sum of exponentials (an online logsumexp) and picks out the
target's logit, and writes only two numbers a row: the logsumexp and the row's NLL. The backward pass recomputes each
tile's logits from the saved logsumexp, as Apple's Cut Cross-Entropy and Liger do: d logits = softmax - one_hot on
the counted rows, which one kernel multiplies into d(hidden) (a block of rows, over every vocabulary tile) and another
into d(embedding) (a vocabulary tile, over every block of rows). No atomics: each output block has one writer.

The kernels lower to Triton on a GPU and run in Pallas's interpreter elsewhere (the CPU path of the tests);
gpt2_jax/loss.py's chunked loss stays the reference (tests/test_pallas_kernels.py holds the two together).
Numerics follow the chunked loss: the matmuls take operands in the compute dtype and accumulate in fp32, the
softmax is fp32, d logits is rounded to the compute dtype before its matmuls, unscaled by 1/count.

The cost, to be measured on a GPU: the forward's matmul FLOPs are the head's (2·N·V·C), and each backward kernel
recomputes the logits once per output block of `block_out` columns of the width (C / block_out times): for
`small` (C = 768, block_out = 256) the head's matmuls cost 2 + 2·(3·2 + 2) = 18 N·V·C against the chunked loss's 6,
in exchange for the logits' memory traffic. The kernels see one device's rows: under a mesh that splits the batch
they would need a shard_map around them, which is not here yet (model.loss_kernel = "pallas" is for one device).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from gpt2_common.data import IGNORE_INDEX

# Tile sizes (powers of two, as Triton wants): rows a block, vocabulary ids a tile, the width's slice per inner matmul,
# and the width of an output block of the backward kernels (each costs one recomputation of the logits).
BLOCK_ROWS = 64
BLOCK_VOCAB = 128
BLOCK_EMBD = 64
BLOCK_OUT = 256


# Triton, not Mosaic GPU (jax's default GPU lowering for Pallas, which stages whole blocks in shared memory).
_TRITON = pl_triton.CompilerParams(num_warps=4, num_stages=2)


def _vocab_tile_start(tile: jax.Array, block_vocab: int) -> jax.Array:
    """The first vocabulary id of a tile (a function of its own so that a test can plant a wrong offset here)."""
    return tile * block_vocab


def _tile_logits(x_ref, w_ref, rows, start, block_vocab, block_embd, width):
    """fp32 logits [block rows, block_vocab] of the rows `rows` against the embedding rows from `start`."""
    acc = None
    for c in range(0, width, block_embd):  # static: the width is a few slices
        xc = x_ref[rows, pl.ds(c, block_embd)]
        wc = w_ref[pl.ds(start, block_vocab), pl.ds(c, block_embd)]
        part = jax.lax.dot_general(xc, wc, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        acc = part if acc is None else acc + part
    return acc


def _masked(logits, start, targets, vocab_size):
    """The tile's logits with ids >= vocab_size at -inf, and where each row's target falls in it."""
    ids = start + jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
    return jnp.where(ids < vocab_size, logits, -jnp.inf), ids == targets[:, None]


def _forward_kernel(x_ref, w_ref, t_ref, lse_ref, nll_ref, *, vocab_size, n_tiles, block_vocab, block_embd, width):
    targets = t_ref[...]
    rows = pl.ds(0, targets.shape[0])

    def add_tile(tile, carry):
        peak, total, target_logit = carry
        start = _vocab_tile_start(tile, block_vocab)
        logits, is_target = _masked(_tile_logits(x_ref, w_ref, rows, start, block_vocab, block_embd, width),
                                    start, targets, vocab_size)
        target_logit = target_logit + jnp.sum(jnp.where(is_target, logits, 0.0), axis=1)
        new_peak = jnp.maximum(peak, jnp.max(logits, axis=1))
        total = total * jnp.exp(peak - new_peak) + jnp.sum(jnp.exp(logits - new_peak[:, None]), axis=1)
        return new_peak, total, target_logit

    zeros = jnp.zeros(targets.shape, jnp.float32)
    peak, total, target_logit = jax.lax.fori_loop(0, n_tiles, add_tile, (zeros - jnp.inf, zeros, zeros))
    lse = peak + jnp.log(total)
    lse_ref[...] = lse
    nll_ref[...] = jnp.where(targets != IGNORE_INDEX, lse - target_logit, 0.0)


def _dlogits(logits, is_target, lse, targets, dtype):
    """(softmax - one_hot) on the counted rows, in the compute dtype: what the chunked loss multiplies too."""
    d = jnp.exp(logits - lse[:, None]) - is_target.astype(jnp.float32)
    return jnp.where((targets != IGNORE_INDEX)[:, None], d, 0.0).astype(dtype)


def _dx_kernel(x_ref, w_ref, t_ref, lse_ref, dx_ref, *, vocab_size, n_tiles, block_vocab, block_embd, width):
    """d(hidden) [block rows, block_out] = sum over vocabulary tiles of d logits @ embedding[tile, out columns]."""
    targets, lse = t_ref[...], lse_ref[...]
    rows = pl.ds(0, targets.shape[0])
    block_out = dx_ref.shape[1]
    out_cols = pl.ds(pl.program_id(1) * block_out, block_out)

    def add_tile(tile, acc):
        start = _vocab_tile_start(tile, block_vocab)
        logits, is_target = _masked(_tile_logits(x_ref, w_ref, rows, start, block_vocab, block_embd, width),
                                    start, targets, vocab_size)
        d = _dlogits(logits, is_target, lse, targets, x_ref.dtype)
        w_out = w_ref[pl.ds(start, block_vocab), out_cols]
        return acc + jax.lax.dot_general(d, w_out, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    dx_ref[...] = jax.lax.fori_loop(0, n_tiles, add_tile, jnp.zeros(dx_ref.shape, jnp.float32))


def _dw_kernel(x_ref, w_ref, t_ref, lse_ref, dw_ref, *, vocab_size, n_row_blocks, block_rows, block_vocab,
               block_embd, width):
    """d(embedding) [block_vocab, block_out] = sum over row blocks of d logits.T @ hidden[rows, out columns]."""
    block_out = dw_ref.shape[1]
    start = _vocab_tile_start(pl.program_id(0), block_vocab)
    out_cols = pl.ds(pl.program_id(1) * block_out, block_out)

    def add_rows(block, acc):
        rows = pl.ds(block * block_rows, block_rows)
        targets, lse = t_ref[rows], lse_ref[rows]
        logits, is_target = _masked(_tile_logits(x_ref, w_ref, rows, start, block_vocab, block_embd, width),
                                    start, targets, vocab_size)
        d = _dlogits(logits, is_target, lse, targets, x_ref.dtype)
        x_out = x_ref[rows, out_cols]
        return acc + jax.lax.dot_general(d, x_out, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    dw_ref[...] = jax.lax.fori_loop(0, n_row_blocks, add_rows, jnp.zeros(dw_ref.shape, jnp.float32))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class _Tiles:
    """The problem's sizes (rows n, vocabulary v, width c) and the tiles: rows, vocabulary and width are padded to
    whole tiles (zero rows ignored, zero vocabulary rows masked, zero columns that add nothing)."""
    n: int
    v: int
    c: int
    block_rows: int
    block_vocab: int
    block_embd: int
    block_out: int

    @property
    def padded(self) -> tuple[int, int, int]:
        c = _round_up(self.c, self.block_embd)
        return _round_up(self.n, self.block_rows), _round_up(self.v, self.block_vocab), _round_up(c, self.out)

    @property
    def out(self) -> int:
        """The backward kernels' output block width: block_out, or the whole (padded) width if narrower."""
        return min(self.block_out, _round_up(self.c, self.block_embd))

    def pad(self, x, w, targets):
        n, v, c = self.padded
        x = jnp.pad(x, ((0, n - self.n), (0, c - self.c)))
        w = jnp.pad(w, ((0, v - self.v), (0, c - self.c)))
        return x, w, jnp.pad(targets, (0, n - self.n), constant_values=IGNORE_INDEX)


def _whole(shape):
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _forward(x, w, targets, vocab_size, tiles: _Tiles, interpret):
    n, v, c = tiles.padded
    kernel = functools.partial(_forward_kernel, vocab_size=vocab_size, n_tiles=v // tiles.block_vocab,
                               block_vocab=tiles.block_vocab, block_embd=tiles.block_embd, width=c)
    rows = pl.BlockSpec((tiles.block_rows,), lambda i: (i,))
    return pl.pallas_call(
        kernel, grid=(n // tiles.block_rows,),
        in_specs=[pl.BlockSpec((tiles.block_rows, c), lambda i: (i, 0)), _whole((v, c)), rows],
        out_specs=[rows, rows],
        out_shape=[jax.ShapeDtypeStruct((n,), jnp.float32)] * 2,
        interpret=interpret, name="fused_ce_forward", compiler_params=_TRITON,
    )(x, w, targets)


def _backward(x, w, targets, lse, vocab_size, tiles: _Tiles, interpret):
    n, v, c = tiles.padded
    common = dict(vocab_size=vocab_size, block_vocab=tiles.block_vocab, block_embd=tiles.block_embd, width=c)
    rows = pl.BlockSpec((tiles.block_rows,), lambda i, j: (i,))
    dx = pl.pallas_call(
        functools.partial(_dx_kernel, n_tiles=v // tiles.block_vocab, **common),
        grid=(n // tiles.block_rows, c // tiles.out),
        in_specs=[pl.BlockSpec((tiles.block_rows, c), lambda i, j: (i, 0)), _whole((v, c)), rows, rows],
        out_specs=pl.BlockSpec((tiles.block_rows, tiles.out), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((n, c), jnp.float32),
        interpret=interpret, name="fused_ce_dx", compiler_params=_TRITON,
    )(x, w, targets, lse)
    dw = pl.pallas_call(
        functools.partial(_dw_kernel, n_row_blocks=n // tiles.block_rows, block_rows=tiles.block_rows, **common),
        grid=(v // tiles.block_vocab, c // tiles.out),
        in_specs=[_whole((n, c)), pl.BlockSpec((tiles.block_vocab, c), lambda i, j: (i, 0)), _whole((n,)),
                  _whole((n,))],
        out_specs=pl.BlockSpec((tiles.block_vocab, tiles.out), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((v, c), jnp.float32),
        interpret=interpret, name="fused_ce_dw", compiler_params=_TRITON,
    )(x, w, targets, lse)
    return dx[:tiles.n, :tiles.c], dw[:tiles.v, :tiles.c]


def pallas_cross_entropy(x: jax.Array, embedding: jax.Array, targets: jax.Array, vocab_size: int, dtype: Any,
                         interpret: bool | None = None, block_rows: int = BLOCK_ROWS, block_vocab: int = BLOCK_VOCAB,
                         block_embd: int = BLOCK_EMBD, block_out: int = BLOCK_OUT) -> jax.Array:
    """Mean fp32 cross-entropy of targets [B, T] (IGNORE_INDEX: skipped) under logits x @ embedding.T: the same
    contract as loss.fused_cross_entropy. interpret: run in Pallas's interpreter (None: off a GPU)."""
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    B, T, C = x.shape
    tiles = _Tiles(B * T, embedding.shape[0], C, block_rows, block_vocab, block_embd, block_out)
    return _pallas_ce(x.astype(dtype).reshape(B * T, C), embedding, targets.reshape(-1), vocab_size, dtype,
                      interpret, tiles).astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _pallas_ce(x, embedding, targets, vocab_size, dtype, interpret, tiles):
    return _pallas_ce_forward(x, embedding, targets, vocab_size, dtype, interpret, tiles)[0]


def _pallas_ce_forward(x, embedding, targets, vocab_size, dtype, interpret, tiles):
    xp, wp, tp = tiles.pad(x, embedding.astype(dtype), targets)
    lse, nll = _forward(xp, wp, tp, vocab_size, tiles, interpret)
    count = jnp.maximum(jnp.sum(targets != IGNORE_INDEX), 1).astype(jnp.float32)
    return jnp.sum(nll) / count, (xp, wp, tp, lse, count)


def _pallas_ce_backward(vocab_size, dtype, interpret, tiles, residuals, g):
    xp, wp, tp, lse, count = residuals
    dx, dw = _backward(xp, wp, tp, lse, vocab_size, tiles, interpret)
    scale = g / count
    return (dx * scale).astype(dtype), dw * scale, None


_pallas_ce.defvjp(_pallas_ce_forward, _pallas_ce_backward)
