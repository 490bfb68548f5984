"""Shared pieces of the parity suite: the model shapes it runs over, random canonical weights, and each framework's
model built from the same canonical weights through the real conversion code (gpt2_jax.weights, gpt2_torch.weights).

The shapes are a representative cross-section, not the full product: together they cover 1 to 3 layers, 1 and 4 heads,
sequences of 1, 7 and the full context, batches of 1 and 3, and vocabularies that are padded (100 -> 128,
50257 -> 50304) and not (128). Tiny widths keep the whole suite fast on two CPU cores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from gpt2_common import weights as cw
from gpt2_common.config import ModelConfig
from tests.canonical_random import random_weights  # noqa: F401  (the parity tests import it from here)

# At these sizes every torch op is microseconds of work, and handing it to a pool of threads costs more than it saves
# (on two cores shared with other processes, many times more): one thread keeps the suite fast and its timing steady.
torch.set_num_threads(1)


@dataclass(frozen=True)
class Case:
    name: str
    model: ModelConfig
    batch: int
    seq: int

    def tokens(self, seed: int = 0) -> np.ndarray:
        return np.random.default_rng(seed).integers(0, self.model.vocab_size, (self.batch, self.seq), dtype=np.int32)


CASES = [
    Case("1L-1H-vocab128-B1-T1", ModelConfig(n_layer=1, n_head=1, n_embd=32, block_size=16, vocab_size=128), 1, 1),
    Case("2L-4H-vocab100-B3-T7", ModelConfig(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=100), 3, 7),
    Case("3L-4H-vocab200-B3-Tfull", ModelConfig(n_layer=3, n_head=4, n_embd=64, block_size=32, vocab_size=200), 3, 32),
    Case("2L-1H-vocab50257-B1-Tfull",
         ModelConfig(n_layer=2, n_head=1, n_embd=32, block_size=16, vocab_size=50257), 1, 16),
]


@pytest.fixture(params=CASES, ids=[c.name for c in CASES])
def case(request) -> Case:
    return request.param


def torch_model(weights: cw.Weights, model: ModelConfig):
    from gpt2_torch.model import GPT
    from gpt2_torch.weights import from_canonical

    gpt = GPT(model)
    gpt.load_state_dict(from_canonical(weights, model))
    return gpt.eval()


def jax_params(weights: cw.Weights, model: ModelConfig):
    import jax

    from gpt2_jax.weights import from_canonical

    return jax.tree.map(jax.numpy.asarray, from_canonical(weights, model))


def hf_model(weights: cw.Weights, model: ModelConfig):
    """transformers' own GPT-2 (eager attention: an implementation independent of ours) with these weights."""
    import transformers

    config = transformers.GPT2Config(**cw.hf_config(model), attn_implementation="eager")
    hf = transformers.GPT2LMHeadModel(config).eval()
    state = {k: torch.from_numpy(v.copy()) for k, v in weights.items()}
    hf.load_state_dict({**state, "lm_head.weight": state["transformer.wte.weight"]})
    return hf


def assert_close_to_scale(actual, expected, rtol: float, what: str) -> None:
    """max |actual - expected| <= rtol * max |expected|: a tolerance relative to the tensor's scale, so that entries
    near zero do not demand more than fp32 can give."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = np.abs(expected).max()
    error = np.abs(actual - expected).max()
    assert error <= rtol * scale, f"{what}: max error {error:.3g} exceeds {rtol:g} x scale {scale:.3g}"
