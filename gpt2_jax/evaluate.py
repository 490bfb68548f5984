"""The JAX model's per-token negative log-likelihood, the one thing gpt2_common.evaluation needs from a framework
(validation loss on shards, perplexity of a text, HellaSwag), as gpt2_torch/evaluate.py gives it for PyTorch; and
the trainer's evaluation of its parameters (validation loss, HellaSwag) on its mesh."""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gpt2_common.evaluation import IGNORE, TokenNLL, hellaswag_correct
from gpt2_jax.model import GPT
from gpt2_jax.step import Trainer

MIN_WIDTH = 16


def token_nll(model: GPT, params: Any, inputs: jax.Array, targets: jax.Array) -> jax.Array:
    """fp32 NLL [B, T] of each target under the model (0 where the target is -1): the terms of model.cross_entropy,
    before it averages them, computed through the head by chunks (gpt2_jax.loss.fused_token_losses)."""
    return model.apply({"params": params}, inputs, targets=targets, reduction="none")


_token_nll = jax.jit(token_nll, static_argnums=0)


@functools.cache
def _replicated_token_nll(mesh: Mesh):
    """token_nll whose result every process holds whole, for parameters spread over a (multi-process) mesh."""
    return jax.jit(token_nll, static_argnums=0, out_shardings=NamedSharding(mesh, P()))


def model_token_nll(model: GPT, params: Any, mesh: Mesh | None = None) -> TokenNLL:
    """`token_nll(inputs, targets) -> nll` over numpy arrays [B, T], T <= block_size. Sequences are padded (with
    ignored targets) to the next power of two, so that the windows and endings of varying length that evaluation
    scores compile a handful of shapes, not one per length; causal attention keeps the padding out of the scores.
    The rows are not padded: XLA's results depend in the last bits on the shapes of the matmuls, and evaluation's
    batches keep one row count (the loader's last partial batch is dropped). The result is a device array, returned
    before it is computed (gpt2_common.evaluation reads it after dispatching the next call). With the training mesh
    of `params`, every process computes the same and gets the whole result."""
    block_size = model.config.block_size
    compiled = _token_nll if mesh is None else _replicated_token_nll(mesh)

    def nll(inputs: np.ndarray, targets: np.ndarray) -> jax.Array:
        rows, length = inputs.shape
        width = min(block_size, max(MIN_WIDTH, 1 << (length - 1).bit_length()))
        padded_inputs = np.zeros((rows, width), np.int32)
        padded_targets = np.full((rows, width), IGNORE, np.int32)
        padded_inputs[:, :length], padded_targets[:, :length] = inputs, targets
        return compiled(model, params, padded_inputs, padded_targets)[:, :length]

    return nll


def token_nll_fn(config, weights, precision: str = "fp32") -> TokenNLL:
    """The TokenNLL of a Config and canonical weights (gpt2_formats.read_canonical gives both); precision "bf16"
    computes in bfloat16 from bfloat16 parameters (the NLL stays fp32)."""
    from gpt2_jax.sample import load_model

    return model_token_nll(*load_model(config, weights, precision))


def evaluate_params(trainer: Trainer, params: Any, val_batches: list, hellaswag: list | None) -> dict[str, float]:
    """A training run's evaluation: the mean loss of the jitted eval step over the fixed validation batches, and with
    data.hellaswag its accuracies, which every process scores whole (the parameters may span them all) and gets
    alike."""
    record = {}
    if val_batches:
        losses = [trainer.eval_step(params, batch) for batch in val_batches]
        record["val_loss"] = float(np.mean(jax.device_get(losses)))
    if hellaswag is not None:
        token_nll = model_token_nll(trainer.model, params, trainer.mesh)
        correct, correct_norm = hellaswag_correct(hellaswag, trainer.config.model.block_size, token_nll)
        record.update(hellaswag_acc=correct / len(hellaswag), hellaswag_acc_norm=correct_norm / len(hellaswag))
    return record
