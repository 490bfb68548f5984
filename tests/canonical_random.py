"""Random canonical weights for the tests that run a model: every tensor random, LayerNorm scales around 1 and
biases around 0, so that a tensor put in the wrong place, or transposed, changes the outputs, and wider than GPT-2's
init so that the next token's argmax wins by a clear margin (a tie decided by rounding would make two correct
implementations disagree)."""

import numpy as np

from gpt2_common import weights as cw
from gpt2_common.config import ModelConfig


def random_weights(model: ModelConfig, seed: int = 0, std: float = 0.1) -> cw.Weights:
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in cw.canonical_shapes(model).items():
        center = 1.0 if len(shape) == 1 and name.endswith(".weight") else 0.0
        weights[name] = (center + std * rng.standard_normal(shape)).astype(np.float32)
    return weights
