"""Text generation for the end-of-training sample: one compiled loop over a fixed block-sized buffer.

Every new token reruns the model over the whole buffer (no KV cache yet), which is quadratic but compiles once for
any prompt: the buffer's shape never changes, and the prompt length is a traced value. Once the buffer is full it
slides left by one token a step, as nanoGPT crops the context to block_size.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from gpt2_jax.model import GPT, mask_padded_vocab


def sample_next(logits: jax.Array, rng: jax.Array, temperature: jax.Array, top_k: int, vocab_size: int) -> jax.Array:
    """Next ids [B] from logits [B, V]: padded ids never, only the top_k most likely (0 = all), greedy at
    temperature 0."""
    logits = mask_padded_vocab(logits.astype(jnp.float32), vocab_size)
    if 0 < top_k < vocab_size:
        kth_largest = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    sampled = jax.random.categorical(rng, logits / jnp.maximum(temperature, 1e-6), axis=-1)
    return jnp.where(temperature > 0, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "top_k"))
def _generate(model: GPT, params: Any, buffer: jax.Array, length: jax.Array, rng: jax.Array,
              temperature: jax.Array, *, max_new_tokens: int, top_k: int) -> jax.Array:
    rows, size = buffer.shape

    def next_token(i, carry):
        buffer, length, out = carry
        logits = model.apply({"params": params}, buffer)
        last = jax.lax.dynamic_index_in_dim(logits, length - 1, axis=1, keepdims=False)
        token = sample_next(last, jax.random.fold_in(rng, i), temperature, top_k, model.config.vocab_size)
        full = length == size
        buffer = jnp.where(full, jnp.roll(buffer, -1, axis=1), buffer)
        buffer = jax.lax.dynamic_update_slice_in_dim(buffer, token[:, None], jnp.where(full, size - 1, length), 1)
        return buffer, jnp.minimum(length + 1, size), out.at[:, i].set(token)

    out = jnp.zeros((rows, max_new_tokens), jnp.int32)
    return jax.lax.fori_loop(0, max_new_tokens, next_token, (buffer, length, out))[2]


def generate(model: GPT, params: Any, prompt: Sequence[int], max_new_tokens: int, *, temperature: float = 0.8,
             top_k: int = 200, seed: int = 0, num_samples: int = 1, sharding: Any = None) -> np.ndarray:
    """`num_samples` continuations of the token ids `prompt`: int32 [num_samples, max_new_tokens].

    `sharding`: where the inputs go when params live on a mesh (a replicated NamedSharding of it), so that every
    process of a multi-host job runs the same computation.
    """
    if len(prompt) == 0:
        raise ValueError("the prompt needs at least one token (e.g. the tokens of '\\n')")
    size = model.config.block_size
    prompt = list(prompt)[-size:]
    buffer = np.zeros((num_samples, size), np.int32)
    buffer[:, :len(prompt)] = prompt
    inputs = (buffer, np.int32(len(prompt)), jax.random.PRNGKey(seed), np.float32(temperature))
    if sharding is not None:
        inputs = jax.device_put(inputs, sharding)
    out = _generate(model, params, *inputs, max_new_tokens=max_new_tokens, top_k=top_k)
    if sharding is not None:  # the result may span processes: give every process all of it
        return np.asarray(multihost_utils.process_allgather(out, tiled=True))
    return np.asarray(jax.device_get(out))
