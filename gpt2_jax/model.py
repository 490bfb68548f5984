"""GPT-2 in Flax linen, block for block the model of gpt2_torch/model.py (nanoGPT's shape and names).

Parameters are fp32; `dtype` is the compute dtype (bf16/fp16 for mixed precision), and the logits come back in fp32
for the loss. Every parameter carries logical axis names ("embed", "heads", "mlp", "vocab", ...) that
gpt2_jax.sharding maps onto the device mesh; the activation constraints below are no-ops unless a rule table is in
context, so the model runs unsharded anywhere.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from gpt2_common.config import ModelConfig
from gpt2_common.errors import UserError
from gpt2_jax.loss import (cross_entropy, eval_chunk_size, fused_cross_entropy, mask_padded_vocab,  # noqa: F401
                           fused_token_losses)
from gpt2_jax.pallas_loss import pallas_cross_entropy

COMPUTE_DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}


def compute_dtype(precision: str) -> Any:
    return COMPUTE_DTYPES[precision]


def attention_implementation(setting: str, backend: str, dtype: Any) -> str:
    """The `implementation` for jax.nn.dot_product_attention: cuDNN's fused (flash) kernel where it runs, else XLA.

    cuDNN attention only exists on NVIDIA GPUs and only for half precision; "auto" picks it there, since it is
    what makes a JAX GPT-2 as fast as PyTorch's SDPA on GPU.
    """
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if setting == "xla":
        return "xla"
    if setting == "cudnn":
        if backend != "gpu":
            raise UserError(f"model.attention='cudnn' needs an NVIDIA GPU (this backend is {backend}); "
                            "set model.attention=auto or xla")
        if not half:
            raise UserError("model.attention='cudnn' runs in bf16 or fp16 only; set train.precision=bf16 "
                            "or model.attention=auto")
        return "cudnn"
    if setting == "auto":
        return "cudnn" if backend == "gpu" and half else "xla"
    raise UserError(f"model.attention is {setting!r}; choose one of auto, cudnn, xla")


def _kernel_init(axes: tuple[str, str], std: float = 0.02):
    """GPT-2's Linear init: a normal(0, std) kernel [in, out] with logical axis names; its bias is _bias_init."""
    return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def _bias_init(kernel_axes: tuple[str, str]):
    """Zeros along the kernel's output axis."""
    return nn.with_logical_partitioning(nn.initializers.zeros, (kernel_axes[1],))


def _dense(features: int, axes: tuple[str, str], dtype: Any, name: str, std: float = 0.02) -> nn.Dense:
    """A Linear layer as in GPT-2: normal(0, std) kernel of shape [in, out], zero bias, logical axis names."""
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, kernel_init=_kernel_init(axes, std),
                    bias_init=_bias_init(axes), name=name)


class QKVDense(nn.Module):
    """c_attn: the [C, 3C] kernel and [3C] bias of torch's Linear, applied as three matmuls, one per column block,
    so that q, k and v [B, T, C] each come out of a matmul of their own.

    The one [B, T, 3C] matmul and a split would give the same numbers, but cuDNN's attention takes q, k and v as
    separate dense arrays: the split copies all three out of the [B, T, 3C] output, and the backward pass
    concatenates their gradients back; the three matmuls remove those copies (measured in docs/benchmarks.md,
    "Where the step's time goes on one H100"). torch's split is free (views), so
    gpt2_torch keeps its plain Linear; the parameters here are the same arrays under the same names.
    """

    features: int  # C: the width of each of q, k and v
    dtype: Any = jnp.float32
    # Decoding: one matmul, then a split of its small output. The column blocks of the kernel are strided, so each
    # matmul on one would first copy its block out of the kernel: for one token a step that copy costs more than the
    # matmul (on a CPU, 1.7 MB a layer of GPT-2 small read and written again every token).
    one_matmul: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        C, axes = self.features, ("embed", "qkv")
        kernel = self.param("kernel", _kernel_init(axes), (x.shape[-1], 3 * C), jnp.float32)
        bias = self.param("bias", _bias_init(axes), (3 * C,), jnp.float32)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if self.one_matmul:
            qkv = jnp.dot(x, kernel) + bias
            return tuple(qkv[..., i * C:(i + 1) * C] for i in range(3))
        return tuple(jnp.dot(x, kernel[:, i * C:(i + 1) * C]) + bias[i * C:(i + 1) * C] for i in range(3))


class TokamaxLayerNorm(nn.Module):
    """model.layer_norm = "tokamax": Flax's LayerNorm, same parameters and names, computed by tokamax.layer_norm
    (its fused Pallas/Triton forward and backward on a GPU, XLA elsewhere); statistics in fp32 as Flax's are."""
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        import tokamax  # an optional dependency (pyproject's "kernels" extra), imported only when chosen
        from absl import flags

        if not flags.FLAGS.is_parsed():  # else tokamax's first call parses sys.argv (our scripts' flags) as absl's
            flags.FLAGS.mark_as_parsed()
        C = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (C,), jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (C,), jnp.float32)
        return tokamax.layer_norm(x.astype(self.dtype), scale, bias, epsilon=1e-5).astype(self.dtype)


def _layer_norm(dtype: Any, name: str, kernel: str = "flax") -> nn.Module:
    if kernel == "tokamax":
        return TokamaxLayerNorm(dtype, name=name)
    # Flax computes the statistics in fp32 whatever the compute dtype.
    return nn.LayerNorm(
        epsilon=1e-5,
        dtype=dtype,
        param_dtype=jnp.float32,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
        name=name,
    )


def _residual_std(config: ModelConfig) -> float:
    # GPT-2 scales the projections that write into the residual stream by 1/sqrt(number of residual additions).
    return 0.02 / math.sqrt(2 * config.n_layer)


class KVCache(NamedTuple):
    """The keys and values of every layer at every position of the context, each [n_layer, B, block_size, n_head,
    head_dim], allocated once so that a decoding step has the same shapes from the first token to the last.

    Explicit state: GPT.decode takes a cache and returns the next one; nothing is kept inside the module.
    """

    k: jax.Array
    v: jax.Array


def init_cache(config: ModelConfig, batch: int, dtype: Any = jnp.float32) -> KVCache:
    shape = (config.n_layer, batch, config.block_size, config.n_head, config.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array) -> jax.Array:
    """Queries q [B, T, H, D] at absolute `positions` [B, T] over one layer's cache k, v [B, S, H, D]: each query
    sees the keys at its own position and before, so whatever the cache holds beyond is never read.

    Plain einsums in fp32 rather than jax.nn.dot_product_attention: jitted in bf16 on CPU, the latter fails for a
    single query of a single head (shape [1, 1, 1, D]; ALG_DOT_BF16_BF16_F32 in jax 0.10.2), and with one query
    per step a fused kernel has nothing to fuse. The cache is read in fp32 whatever its dtype.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    visible = jnp.arange(k.shape[1])[None, None, None, :] <= positions[:, None, :, None]
    probs = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
    return jnp.einsum("bhts,bshd->bthd", probs, v.astype(jnp.float32)).astype(q.dtype)


class CausalSelfAttention(nn.Module):
    config: ModelConfig
    dtype: Any = jnp.float32
    attention: str = "xla"  # resolved by attention_implementation: "xla" or "cudnn"

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True, cache: KVCache | None = None,
                 positions: jax.Array | None = None, layer: int = 0):
        """x [B, T, C] -> [B, T, C]; with a cache (decoding), this layer's keys and values are first written into it
        at `positions` [B, T], and (output, cache) comes back."""
        cfg = self.config
        B, T, C = x.shape
        q, k, v = QKVDense(C, self.dtype, one_matmul=cache is not None, name="c_attn")(x)
        # [B, T, n_head, head_dim] is the layout dot_product_attention takes (no transpose, unlike torch's SDPA).
        q, k, v = (
            nn.with_logical_constraint(t.reshape(B, T, cfg.n_head, cfg.head_dim),
                                       ("batch", "seq", "act_heads", "head_dim"))
            for t in (q, k, v)
        )
        if cache is None:
            y = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=self.attention)
        else:
            rows = jnp.arange(B)[:, None]  # each row writes at its own positions (prompts of different lengths)
            cache = KVCache(cache.k.at[layer, rows, positions].set(k.astype(cache.k.dtype)),
                            cache.v.at[layer, rows, positions].set(v.astype(cache.v.dtype)))
            y = cached_attention(q, cache.k[layer], cache.v[layer], positions)
        y = y.reshape(B, T, C)
        y = _dense(C, ("heads", "embed"), self.dtype, "c_proj", std=_residual_std(cfg))(y)
        y = nn.Dropout(cfg.dropout)(y, deterministic=deterministic)
        return y if cache is None else (y, cache)


class MLP(nn.Module):
    config: ModelConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        C = self.config.n_embd
        h = _dense(4 * C, ("embed", "mlp"), self.dtype, "c_fc")(x)
        # model.activation: GPT-2's tanh GELU ("gelu_new") by default; the exact erf GELU for nanoGPT's weights
        approximate = self.config.activation == "gelu_tanh"
        if self.config.gelu_dtype == "fp32":  # model.gelu_dtype: an explicit fp32 GELU, rounded back
            h = nn.gelu(h.astype(jnp.float32), approximate=approximate).astype(h.dtype)
        else:
            h = nn.gelu(h, approximate=approximate)
        h = nn.with_logical_constraint(h, ("batch", "seq", "act_mlp"))
        y = _dense(C, ("mlp", "embed"), self.dtype, "c_proj", std=_residual_std(self.config))(h)
        return nn.Dropout(self.config.dropout)(y, deterministic=deterministic)


class Block(nn.Module):
    config: ModelConfig
    dtype: Any = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True, cache: KVCache | None = None,
                 positions: jax.Array | None = None, layer: int = 0):
        attn = CausalSelfAttention(self.config, self.dtype, self.attention, name="attn")
        norm = self.config.layer_norm  # model.layer_norm: Flax's, or tokamax's kernels
        if cache is None:
            x = x + attn(_layer_norm(self.dtype, "ln_1", norm)(x), deterministic)
        else:
            y, cache = attn(_layer_norm(self.dtype, "ln_1", norm)(x), deterministic, cache, positions, layer)
            x = x + y
        x = x + MLP(self.config, self.dtype, name="mlp")(_layer_norm(self.dtype, "ln_2", norm)(x), deterministic)
        x = nn.with_logical_constraint(x, ("batch", "seq", "act_embed"))
        return x if cache is None else (x, cache)


class GPT(nn.Module):
    config: ModelConfig
    dtype: Any = jnp.float32
    attention: str = "xla"
    keep_loss_exp: bool = False  # model.loss_exp, resolved for the backend
    eval_chunk_tokens: int = 128  # evaluation's per-token loss: tokens through the head at a time (EVAL_TOKENS)
    eval_group_tokens: int = 16  # ... and tokens of a chunk whose softmax is one reduction

    @nn.compact
    def __call__(self, idx: jax.Array, deterministic: bool = True, cache: KVCache | None = None,
                 positions: jax.Array | None = None, targets: jax.Array | None = None, reduction: str = "mean"):
        """Token ids [B, T] -> fp32 logits [B, T, padded_vocab_size]; given targets [B, T], their mean loss instead
        (reduction "none": each target's loss [B, T], 0 where it is ignored, for evaluation).

        The loss is computed here, through the head in chunks of model.loss_chunk_size positions (gpt2_jax/loss.py),
        so that the full fp32 logits, the largest activation by far, never exist. With a cache, see `decode`.
        """
        cfg = self.config
        B, T = idx.shape
        if T > cfg.block_size:
            raise ValueError(f"sequence of length {T} is longer than model.block_size={cfg.block_size}")
        embed_init = nn.initializers.normal(0.02)
        wte = nn.Embed(cfg.padded_vocab_size, cfg.n_embd, dtype=self.dtype, param_dtype=jnp.float32,
                       embedding_init=nn.with_logical_partitioning(embed_init, ("vocab", "embed")), name="wte")
        wpe = nn.Embed(cfg.block_size, cfg.n_embd, dtype=self.dtype, param_dtype=jnp.float32,
                       embedding_init=nn.with_logical_partitioning(embed_init, ("pos", "embed")), name="wpe")
        x = wte(idx) + wpe(jnp.arange(T) if cache is None else positions)
        x = nn.with_logical_constraint(x, ("batch", "seq", "act_embed"))
        x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
        # A Python loop, not nn.scan: unrolled layers compile to faster code on GPU (jax issue 24411), and the
        # parameters keep the flat h_0, h_1, ... names that map one to one onto transformer.h.{i}.
        for i in range(cfg.n_layer):
            block = Block(cfg, self.dtype, self.attention, name=f"h_{i}")
            if cache is None:
                x = block(x, deterministic)
            else:
                x, cache = block(x, deterministic, cache, positions, i)
        x = _layer_norm(self.dtype, "ln_f", cfg.layer_norm)(x)
        if targets is not None and reduction == "none":  # evaluation: by chunks sized for the cache, no gradient
            chunk, group = (eval_chunk_size(B, T, n) for n in (self.eval_chunk_tokens, self.eval_group_tokens))
            return fused_token_losses(x, wte.embedding, targets, cfg.vocab_size, chunk, self.dtype, group)
        if targets is not None and cfg.loss_kernel == "pallas":  # the head and loss as Pallas kernels
            return pallas_cross_entropy(x, wte.embedding, targets, cfg.vocab_size, self.dtype)
        if targets is not None and cfg.loss_chunk_size:
            return fused_cross_entropy(x, wte.embedding, targets, cfg.vocab_size, cfg.loss_chunk_size, self.dtype,
                                       keep_exp=self.keep_loss_exp)
        if cache is None:
            logits = wte.attend(x)  # the output head is the token embedding, transposed
        else:
            # Decoding: E x rather than x E^T. XLA on a CPU wants a dot's right operand as [K, N], so x E^T copies the
            # whole transposed embedding every step (154 MB for GPT-2 small); as the left operand E is read in place.
            x, embedding = nn.dtypes.promote_dtype(x, wte.embedding, dtype=self.dtype)
            logits = jnp.einsum("vc,btc->btv", embedding, x)
        logits = nn.with_logical_constraint(logits, ("batch", "seq", "act_vocab")).astype(jnp.float32)
        if targets is not None:
            return cross_entropy(logits, targets, cfg.vocab_size)
        return logits if cache is None else (logits, cache)

    def decode(self, idx: jax.Array, positions: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """The cached forward for generation: tokens idx [B, T] at absolute positions [B, T] (each row its own, all
        < block_size) -> (fp32 logits [B, T, padded_vocab_size], the cache with these tokens' keys and values).

        Each token attends to the cache at its position and before, so the cache must already hold the tokens before
        idx; T > 1 fills it a chunk at a time (the prompt), T = 1 is one decoding step.
        Apply as model.apply({"params": params}, idx, positions, cache, method=GPT.decode).
        """
        return self(idx, True, cache, positions)


# Evaluation's per-token loss goes through the head EVAL_TOKENS[backend][0] tokens at a time, and the softmax of
# each EVAL_TOKENS[backend][1] of them is a reduction of its own. On a CPU a chunk's fp32 logits (128 tokens x GPT-2's
# vocabulary: 26 MB) stay in the last-level cache, where the whole batch's (206 MB for 8 x 128) went to memory and
# back three times, and XLA runs the groups' reductions on both cores, where one reduction runs on one; together
# 2.4x the whole logits' tokens/s for `shakespeare` (docs/benchmarks.md). A GPU wants big matmuls and has the memory.
EVAL_TOKENS = {"cpu": (128, 16), "gpu": (8192, 8192)}


def build_model(config: ModelConfig, precision: str = "fp32", backend: str | None = None) -> GPT:
    """The GPT for a config: compute dtype from train.precision, attention kernel and loss for this backend."""
    dtype = compute_dtype(precision)
    backend = backend or jax.default_backend()
    keep_loss_exp = config.loss_exp == "keep" or (config.loss_exp == "auto" and backend == "cpu")
    eval_chunk_tokens, eval_group_tokens = EVAL_TOKENS["cpu" if backend == "cpu" else "gpu"]
    return GPT(config, dtype=dtype, attention=attention_implementation(config.attention, backend, dtype),
               keep_loss_exp=keep_loss_exp, eval_chunk_tokens=eval_chunk_tokens, eval_group_tokens=eval_group_tokens)
