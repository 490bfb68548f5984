"""The PyTorch model's per-token negative log-likelihood, the one thing gpt2_common.evaluation needs from a framework
(validation loss on shards, perplexity of a text, HellaSwag), as gpt2_jax/evaluate.py gives it for JAX."""

from __future__ import annotations

import numpy as np
import torch

from gpt2_common.evaluation import TokenNLL
from gpt2_torch.model import GPT


@torch.inference_mode()
def token_nll(model: GPT, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """fp32 NLL [B, T] of each target under the model (0 where the target is -1): the terms of model.cross_entropy,
    before it averages them (gpt2_torch.loss.token_losses)."""
    return model(inputs, targets, reduction="none")


def model_token_nll(model: GPT) -> TokenNLL:
    """`token_nll(inputs, targets) -> nll` over numpy arrays [B, T], T <= block_size; the model in eval mode."""
    model.eval()
    device = next(model.parameters()).device

    def nll(inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
        inputs, targets = (torch.as_tensor(np.asarray(a, np.int64), device=device) for a in (inputs, targets))
        return token_nll(model, inputs, targets).cpu().numpy()

    return nll


def token_nll_fn(config, weights, device: str | None = None, precision: str = "fp32") -> TokenNLL:
    """The TokenNLL of a Config and canonical weights (gpt2_formats.read_canonical gives both); precision "bf16"
    runs the model in bfloat16 (the NLL stays fp32)."""
    from gpt2_torch.sample import load_model

    return model_token_nll(load_model(config, weights, device, precision))
