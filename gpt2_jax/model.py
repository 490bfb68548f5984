"""GPT-2 in Flax linen, block for block the model of gpt2_torch/model.py (nanoGPT's shape and names).

Parameters are fp32; `dtype` is the compute dtype (bf16/fp16 for mixed precision), and the logits come back in fp32
for the loss. Every parameter carries logical axis names ("embed", "heads", "mlp", "vocab", ...) that
gpt2_jax.sharding maps onto the device mesh; the activation constraints below are no-ops unless a rule table is in
context, so the model runs unsharded anywhere.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from gpt2_common.config import ModelConfig
from gpt2_common.errors import UserError

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


def _dense(features: int, axes: tuple[str, str], dtype: Any, name: str, std: float = 0.02) -> nn.Dense:
    """A Linear layer as in GPT-2: normal(0, std) kernel of shape [in, out], zero bias, logical axis names."""
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(std), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)),
        name=name,
    )


def _layer_norm(dtype: Any, name: str) -> nn.LayerNorm:
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


class CausalSelfAttention(nn.Module):
    config: ModelConfig
    dtype: Any = jnp.float32
    attention: str = "xla"  # resolved by attention_implementation: "xla" or "cudnn"

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg = self.config
        B, T, C = x.shape
        qkv = _dense(3 * C, ("embed", "qkv"), self.dtype, "c_attn")(x)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        # [B, T, n_head, head_dim] is the layout dot_product_attention takes (no transpose, unlike torch's SDPA).
        q, k, v = (
            nn.with_logical_constraint(t.reshape(B, T, cfg.n_head, cfg.head_dim),
                                       ("batch", "seq", "act_heads", "head_dim"))
            for t in (q, k, v)
        )
        y = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=self.attention)
        y = y.reshape(B, T, C)
        y = _dense(C, ("heads", "embed"), self.dtype, "c_proj", std=_residual_std(cfg))(y)
        return nn.Dropout(cfg.dropout)(y, deterministic=deterministic)


class MLP(nn.Module):
    config: ModelConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        C = self.config.n_embd
        h = _dense(4 * C, ("embed", "mlp"), self.dtype, "c_fc")(x)
        h = nn.gelu(h, approximate=True)  # GPT-2's tanh GELU; the exact erf one breaks parity with released weights
        h = nn.with_logical_constraint(h, ("batch", "seq", "act_mlp"))
        y = _dense(C, ("mlp", "embed"), self.dtype, "c_proj", std=_residual_std(self.config))(h)
        return nn.Dropout(self.config.dropout)(y, deterministic=deterministic)


class Block(nn.Module):
    config: ModelConfig
    dtype: Any = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        x = x + CausalSelfAttention(self.config, self.dtype, self.attention, name="attn")(
            _layer_norm(self.dtype, "ln_1")(x), deterministic)
        x = x + MLP(self.config, self.dtype, name="mlp")(_layer_norm(self.dtype, "ln_2")(x), deterministic)
        return nn.with_logical_constraint(x, ("batch", "seq", "act_embed"))


class GPT(nn.Module):
    config: ModelConfig
    dtype: Any = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, idx: jax.Array, deterministic: bool = True) -> jax.Array:
        """Token ids [B, T] -> fp32 logits [B, T, padded_vocab_size]."""
        cfg = self.config
        B, T = idx.shape
        if T > cfg.block_size:
            raise ValueError(f"sequence of length {T} is longer than model.block_size={cfg.block_size}")
        embed_init = nn.initializers.normal(0.02)
        wte = nn.Embed(cfg.padded_vocab_size, cfg.n_embd, dtype=self.dtype, param_dtype=jnp.float32,
                       embedding_init=nn.with_logical_partitioning(embed_init, ("vocab", "embed")), name="wte")
        wpe = nn.Embed(cfg.block_size, cfg.n_embd, dtype=self.dtype, param_dtype=jnp.float32,
                       embedding_init=nn.with_logical_partitioning(embed_init, ("pos", "embed")), name="wpe")
        x = wte(idx) + wpe(jnp.arange(T))
        x = nn.with_logical_constraint(x, ("batch", "seq", "act_embed"))
        x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
        # A Python loop, not nn.scan: unrolled layers compile to faster code on GPU (jax issue 24411), and the
        # parameters keep the flat h_0, h_1, ... names that map one to one onto transformer.h.{i}.
        for i in range(cfg.n_layer):
            x = Block(cfg, self.dtype, self.attention, name=f"h_{i}")(x, deterministic)
        x = _layer_norm(self.dtype, "ln_f")(x)
        logits = wte.attend(x)  # the output head is the token embedding, transposed
        logits = nn.with_logical_constraint(logits, ("batch", "seq", "act_vocab"))
        return logits.astype(jnp.float32)


def build_model(config: ModelConfig, precision: str = "fp32", backend: str | None = None) -> GPT:
    """The GPT for a config: compute dtype from train.precision, attention kernel for this backend."""
    dtype = compute_dtype(precision)
    backend = backend or jax.default_backend()
    return GPT(config, dtype=dtype, attention=attention_implementation(config.attention, backend, dtype))


def mask_padded_vocab(logits: jax.Array, vocab_size: int) -> jax.Array:
    """-inf at ids >= vocab_size: the rows that pad the embedding to a fast size never take probability."""
    ids = jnp.arange(logits.shape[-1])
    return jnp.where(ids < vocab_size, logits, -jnp.inf)


def cross_entropy(logits: jax.Array, targets: jax.Array, vocab_size: int) -> jax.Array:
    """Mean fp32 cross-entropy over the positions whose target is not -1 (-1 marks positions to ignore)."""
    valid = targets != -1
    losses = optax.losses.softmax_cross_entropy_with_integer_labels(
        mask_padded_vocab(logits.astype(jnp.float32), vocab_size),
        jnp.where(valid, targets, 0),  # any in-range id: an ignored position's loss is zeroed below
    )
    return jnp.sum(losses * valid) / jnp.maximum(jnp.sum(valid), 1)
