"""PyTorch state dicts <-> the canonical GPT-2 layout of gpt2_common.weights.

The names are the same on both sides (nanoGPT's are Hugging Face's). What differs: nn.Linear keeps its weight as
[out, in] where GPT-2's Conv1D keeps [in, out]; the embedding is padded to padded_vocab_size here and not there; and
the state dict lists the tied output head, lm_head.weight, which is the embedding itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from gpt2_common import weights as canonical
from gpt2_common.config import ModelConfig
from gpt2_common.errors import UserError
from gpt2_common.nanogpt import WRAPPER_PREFIXES


def to_canonical(state_dict: Mapping[str, torch.Tensor], model: ModelConfig) -> canonical.Weights:
    """The canonical (float32 numpy) weights of a gpt2_torch.model.GPT state dict: Linear weights transposed back to
    [in, out], the embedding trimmed to the tokenizer's vocabulary."""
    weights = {}
    for key, value in state_dict.items():
        name = key
        while name.startswith(WRAPPER_PREFIXES):  # torch.compile's `_orig_mod.`, DDP's `module.`
            name = name.split(".", 1)[1]
        if name == "lm_head.weight":  # tied: the same tensor as transformer.wte.weight
            continue
        array = value.detach().cpu().to(torch.float32).numpy()
        if canonical.is_linear_weight(name) and array.ndim == 2:
            array = array.T
        weights[name] = np.array(array, order="C")  # a copy: the model's training must not change exported weights
    wte = weights.get("transformer.wte.weight")
    if wte is not None and wte.shape[0] == model.padded_vocab_size:
        weights["transformer.wte.weight"] = wte[: model.vocab_size]
    canonical.check_weights(weights, model, "the PyTorch state dict")
    return weights


def from_canonical(weights: Mapping[str, np.ndarray], model: ModelConfig) -> dict[str, torch.Tensor]:
    """A state dict that GPT(model).load_state_dict takes (strict): Linear weights as [out, in], the embedding padded
    with zero rows (the padded ids' logits are masked, so those rows never matter), lm_head.weight tied to it."""
    canonical.check_weights(weights, model, "the canonical weights")
    state = {}
    for name in canonical.canonical_shapes(model):
        array = weights[name]
        if name == "transformer.wte.weight":
            array = canonical.pad_vocab(array, model)
        if canonical.is_linear_weight(name):
            array = array.T
        # A contiguous copy: torch.tensor keeps a transposed view's strides, and fused AdamW pairs a gradient with
        # its parameter element by element in memory, so a strided tensor here would update the wrong entries.
        state[name] = torch.tensor(np.ascontiguousarray(array), dtype=torch.float32)
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def read_state_dict_file(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a torch.save'd state dict (a Hugging Face pytorch_model.bin shard), as float32 numpy arrays:
    the reader that gpt2_common.weights.load_hf is handed for that form."""
    from gpt2_torch.nanogpt import load_torch_file, numpy_tensors

    state = load_torch_file(path)
    if not isinstance(state, Mapping):
        raise UserError(f"'{path}' holds a {type(state).__name__}, not a state dict")
    return numpy_tensors(state)
