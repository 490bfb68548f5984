"""What the head-and-loss tests (test_jax_loss.py, test_pallas_kernels.py) feed a loss: hidden states, an embedding
whose padded rows would take much probability if they were not masked, and targets with ignored positions."""

import jax.numpy as jnp
import numpy as np

from gpt2_common.data import IGNORE_INDEX


def head_inputs(shape: tuple[int, int, int], vocab: int, padded: int, seed: int = 0, dtype=jnp.float32):
    """(x [B, T, C] in `dtype`, embedding [padded, C] fp32, targets [B, T] int32) for shape (B, T, C), B >= 3."""
    b, t, c = shape
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(b, t, c)), dtype)
    embedding = jnp.asarray(rng.normal(size=(padded, c)) * 0.5, jnp.float32)
    embedding = embedding.at[vocab:].set(3.0)
    targets = rng.integers(0, vocab, (b, t)).astype(np.int32)
    targets[0, :5] = IGNORE_INDEX
    targets[2, -1] = IGNORE_INDEX
    targets[1, 0] = vocab - 1  # the last real id: in a tiled kernel, the last unmasked column of a ragged tile
    return x, embedding, jnp.asarray(targets)
