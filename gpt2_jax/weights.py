"""JAX (Flax linen) params <-> the canonical GPT-2 layout of gpt2_common.weights.

The two layouts hold the same arrays: Dense kernels are [in, out] like GPT-2's Conv1D weights, so nothing is
transposed. Only the names differ (`h_3/attn/c_attn/kernel` is `transformer.h.3.attn.c_attn.weight`; LayerNorm's
`scale` is `weight`; an Embed's `embedding` is `weight`), and the embedding is padded to padded_vocab_size here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util
from flax.linen import meta

from gpt2_common import weights as canonical
from gpt2_common.config import ModelConfig

Params = dict[str, Any]
_LEAF_NAMES = {"embedding", "scale", "kernel"}  # Flax's names for what GPT-2 calls `weight`


def flax_path(name: str) -> tuple[str, ...]:
    """transformer.h.3.attn.c_attn.weight -> ('h_3', 'attn', 'c_attn', 'kernel')."""
    *module, leaf = name.removeprefix("transformer.").split(".")
    if module[0] == "h":
        module = [f"h_{module[1]}", *module[2:]]
    if leaf == "weight":
        leaf = "embedding" if module[-1] in ("wte", "wpe") else "scale" if module[-1].startswith("ln_") else "kernel"
    return (*module, leaf)


def canonical_name(path: tuple[str, ...]) -> str:
    """('h_3', 'attn', 'c_attn', 'kernel') -> transformer.h.3.attn.c_attn.weight; the inverse of flax_path."""
    *module, leaf = path
    if module and module[0].startswith("h_"):
        module = ["h", module[0][2:], *module[1:]]
    return ".".join(["transformer", *module, "weight" if leaf in _LEAF_NAMES else leaf])


def to_canonical(params: Params, model: ModelConfig) -> canonical.Weights:
    """The canonical (float32 numpy) weights of a params pytree (boxed or plain, on any devices, or inside a
    {'params': ...} collection), the embedding trimmed to the tokenizer's vocabulary."""
    params = meta.unbox(params)
    if set(params) == {"params"}:
        params = params["params"]
    # device_get gathers sharded arrays to the host; np.array copies, so later updates cannot reach the result.
    flat = traverse_util.flatten_dict(jax.device_get(params))
    weights = {canonical_name(path): np.array(value, dtype=np.float32) for path, value in flat.items()}
    wte = weights.get("transformer.wte.weight")
    if wte is not None and wte.shape[0] == model.padded_vocab_size:
        weights["transformer.wte.weight"] = wte[: model.vocab_size].copy()
    canonical.check_weights(weights, model, "the JAX params")
    return weights


def from_canonical(weights: Mapping[str, np.ndarray], model: ModelConfig) -> Params:
    """The params pytree of GPT(model) as float32 numpy arrays, for the caller to place on its devices (with its
    shardings); the embedding padded with zero rows, which the loss and the sampler mask, so they never matter."""
    canonical.check_weights(weights, model, "the canonical weights")
    flat = {}
    for name in canonical.canonical_shapes(model):
        array = np.array(weights[name], dtype=np.float32)
        flat[flax_path(name)] = canonical.pad_vocab(array, model) if name == "transformer.wte.weight" else array
    return traverse_util.unflatten_dict(flat)
