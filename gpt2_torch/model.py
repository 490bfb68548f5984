"""GPT-2 in PyTorch, block for block the model of gpt2_jax/model.py (same class and module names, same init).

Parameter names are nanoGPT's, which are Hugging Face's: transformer.wte, transformer.wpe, transformer.h.{i}.ln_1,
.attn.c_attn, .attn.c_proj, .ln_2, .mlp.c_fc, .mlp.c_proj, transformer.ln_f, and lm_head tied to wte.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2_common.config import ModelConfig
from gpt2_torch.loss import (cross_entropy, fused_cross_entropy, mask_padded_vocab,  # noqa: F401 (re-exported)
                             token_losses)


class KVCache(NamedTuple):
    """The keys and values of every layer at every position of the context, each [n_layer, B, block_size, n_head,
    head_dim], allocated once so that a decoding step has the same shapes from the first token to the last.

    Explicit state, as on the JAX side; but where JAX returns a new cache, GPT.decode writes into this one in place
    (the tensors are preallocated for exactly that).
    """

    k: torch.Tensor
    v: torch.Tensor


def init_cache(config: ModelConfig, batch: int, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> KVCache:
    shape = (config.n_layer, batch, config.block_size, config.n_head, config.head_dim)
    return KVCache(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Queries q [B, T, H, D] at absolute `positions` [B, T] over one layer's cache k, v [B, S, H, D]: each query
    sees the keys at its own position and before, so whatever the cache holds beyond is never read."""
    visible = torch.arange(k.size(1), device=k.device)[None, None, None, :] <= positions[:, None, :, None]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # SDPA's [B, H, T, D]
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=visible).transpose(1, 2)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v concatenated in that order
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, positions: torch.Tensor | None = None,
                layer: int = 0) -> torch.Tensor:
        """x [B, T, C] -> [B, T, C]; with a cache (decoding), this layer's keys and values are first written into it
        at `positions` [B, T]."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # views here; XLA would copy, so gpt2_jax's QKVDense splits the kernel
        if cache is None:
            # [B, T, C] -> [B, n_head, T, head_dim]: the layout SDPA wants
            q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # flash attention on GPU
            y = y.transpose(1, 2)
        else:
            q, k, v = (t.view(B, T, self.n_head, C // self.n_head) for t in (q, k, v))
            rows = torch.arange(B, device=x.device)[:, None]  # each row writes at its own positions
            cache.k[layer, rows, positions] = k.to(cache.k.dtype)
            cache.v[layer, rows, positions] = v.to(cache.v.dtype)
            y = cached_attention(q, cache.k[layer], cache.v[layer], positions)
        y = y.contiguous().view(B, T, C)
        return self.dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)
        # model.activation: GPT-2's tanh GELU ("gelu_new") by default; the exact erf GELU for nanoGPT's weights
        self.approximate = "tanh" if config.activation == "gelu_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, positions: torch.Tensor | None = None,
                layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, positions, layer)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=1e-5),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied: one matrix reads tokens in and writes logits out
        self.apply(self._init_weights)
        # GPT-2's scaled init: each block adds two residual branches, so their output projections start smaller to
        # keep the residual stream's variance from growing with depth.
        for name, param in self.named_parameters():
            if name.endswith(("attn.c_proj.weight", "mlp.c_proj.weight")):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        # nn.LayerNorm already starts at weight 1, bias 0

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
        """Token ids [B, T] -> fp32 logits [B, T, padded_vocab_size]; given targets [B, T], their mean loss instead
        (reduction "none": each target's loss [B, T], 0 where it is ignored, for evaluation).

        The loss is computed here, through the head in chunks of model.loss_chunk_size positions (gpt2_torch/loss.py),
        so that the full fp32 logits, the largest activation by far, never exist; and here rather than by the caller
        so that DDP and torch.compile see one graph from ids to loss. Compiled, the plain loss is used instead:
        inductor fuses it by itself, while the chunk loop would be unrolled into the graph, which compiles longer and
        runs slower (docs/benchmarks.md, "The fused loss").
        """
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size={self.config.block_size}")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is not None and reduction == "none":  # evaluation: no gradient, the whole logits (see token_losses)
            return token_losses(self.lm_head(x).float(), targets, self.config.vocab_size)
        if targets is not None and self.config.loss_chunk_size and not torch.compiler.is_compiling():
            return fused_cross_entropy(x, self.lm_head.weight, targets, self.config.vocab_size,
                                       self.config.loss_chunk_size)
        logits = self.lm_head(x).float()  # bf16/fp16 under autocast; the softmax and the loss want fp32
        if targets is None:
            return logits
        return cross_entropy(logits, targets, self.config.vocab_size)

    def decode(self, idx: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The cached forward for generation: tokens idx [B, T] at absolute positions [B, T] (each row its own, all
        < block_size) -> fp32 logits [B, T, padded_vocab_size], these tokens' keys and values written into `cache`.

        Each token attends to the cache at its position and before, so the cache must already hold the tokens before
        idx; T > 1 fills it a chunk at a time (the prompt), T = 1 is one decoding step. A method beside forward, not
        arguments of it, so that forward stays the one graph that training compiles.
        """
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))
        for layer, block in enumerate(self.transformer.h):
            x = block(x, cache, positions, layer)
        x = self.transformer.ln_f(x)
        return self.lm_head(x).float()
