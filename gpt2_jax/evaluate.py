"""The JAX model's per-token negative log-likelihood, the one thing gpt2_common.evaluation needs from a framework
(validation loss on shards, perplexity of a text, HellaSwag), as gpt2_torch/evaluate.py gives it for PyTorch."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gpt2_common.evaluation import IGNORE, TokenNLL
from gpt2_jax.model import GPT, build_model, mask_padded_vocab

MIN_WIDTH = 16


def token_nll(model: GPT, params: Any, inputs: jax.Array, targets: jax.Array) -> jax.Array:
    """fp32 NLL [B, T] of each target under the model (0 where the target is -1): the terms of model.cross_entropy,
    before it averages them."""
    logits = mask_padded_vocab(model.apply({"params": params}, inputs), model.config.vocab_size)
    valid = targets != IGNORE
    losses = optax.losses.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, targets, 0))
    return jnp.where(valid, losses, 0.0)


_token_nll = jax.jit(token_nll, static_argnums=0)


@functools.cache
def _replicated_token_nll(mesh: Mesh):
    """token_nll whose result every process holds whole, for parameters spread over a (multi-process) mesh."""
    return jax.jit(token_nll, static_argnums=0, out_shardings=NamedSharding(mesh, P()))


def model_token_nll(model: GPT, params: Any, mesh: Mesh | None = None) -> TokenNLL:
    """`token_nll(inputs, targets) -> nll` over numpy arrays [B, T], T <= block_size. Sequences are padded (with
    ignored targets) to the next power of two, so that the windows and endings of varying length that evaluation
    scores compile a handful of shapes, not one per length; causal attention keeps the padding out of the scores.
    With the training mesh of `params`, every process computes the same and gets the whole result."""
    block_size = model.config.block_size
    compiled = _token_nll if mesh is None else _replicated_token_nll(mesh)

    def nll(inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
        rows, length = inputs.shape
        width = min(block_size, max(MIN_WIDTH, 1 << (length - 1).bit_length()))
        padded_inputs = np.zeros((rows, width), np.int32)
        padded_targets = np.full((rows, width), IGNORE, np.int32)
        padded_inputs[:, :length], padded_targets[:, :length] = inputs, targets
        return np.asarray(compiled(model, params, padded_inputs, padded_targets))[:, :length]

    return nll


def token_nll_fn(config, weights, precision: str = "fp32") -> TokenNLL:
    """The TokenNLL of a Config and canonical weights (gpt2_common.weights.read_canonical gives both)."""
    from gpt2_jax.weights import from_canonical

    params = jax.device_put(from_canonical(weights, config.model))
    return model_token_nll(build_model(config.model, precision), params)
