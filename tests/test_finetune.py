"""Instruction fine-tuning's loss in both frameworks: on rows from gpt2_common.instruct.build_rows, the prompt's
positions contribute nothing (their logits get exactly zero gradient and may be anything), and the loss is the mean
cross-entropy of the response tokens, computed here by hand."""

import functools

import jax
import numpy as np
import pytest
import torch

from gpt2_common import weights as canonical
from gpt2_common.config import ModelConfig
from gpt2_common.data import IGNORE_INDEX
from gpt2_common.instruct import build_rows, encode_example
from gpt2_jax.model import GPT as JaxGPT
from gpt2_jax.model import cross_entropy as jax_cross_entropy
from gpt2_jax.weights import from_canonical as jax_from_canonical
from gpt2_torch.model import GPT as TorchGPT
from gpt2_torch.model import cross_entropy as torch_cross_entropy
from gpt2_torch.weights import from_canonical as torch_from_canonical

MODEL = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=128, vocab_size=50257)  # padded to 50304
RECORDS = [
    {"instruction": "Name a primary colour.", "output": "Red."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "2 plus 3 is 5."},
]


@functools.cache
def rows():
    """One padded row per record: targets are -1 on the prompt and on the padding after <|endoftext|>."""
    inputs, targets = build_rows(RECORDS, MODEL.block_size, pack=False)
    for row, record in enumerate(RECORDS):
        tokens, learn = encode_example(record)
        prompt = int((~learn).sum())
        assert (targets[row, :prompt - 1] == IGNORE_INDEX).all()  # predicting a prompt token: nothing to learn
        assert targets[row, prompt - 1:len(tokens) - 1].tolist() == tokens[prompt:].tolist()  # the response + EOT
        assert (targets[row, len(tokens) - 1:] == IGNORE_INDEX).all()
    return inputs, targets


@functools.cache
def weights():
    rng = np.random.default_rng(0)
    return {name: ((1.0 if len(shape) == 1 and name.endswith(".weight") else 0.0) + 0.05 * rng.standard_normal(shape))
            .astype(np.float32) for name, shape in canonical.canonical_shapes(MODEL).items()}


def hand_loss(logits: np.ndarray, targets: np.ndarray) -> float:
    """Mean over the learned positions of -log softmax(logits over the real vocabulary)[target], in float64."""
    logits = logits[..., :MODEL.vocab_size].astype(np.float64)
    total, count = 0.0, 0
    for b, t in zip(*np.nonzero(targets != IGNORE_INDEX)):
        row = logits[b, t]
        log_z = row.max() + np.log(np.exp(row - row.max()).sum())
        total += log_z - row[targets[b, t]]
        count += 1
    return total / count


@functools.cache
def torch_logits() -> np.ndarray:
    model = TorchGPT(MODEL)
    model.load_state_dict(torch_from_canonical(weights(), MODEL))
    with torch.no_grad():
        return model.eval()(torch.from_numpy(rows()[0]).long()).numpy()


@functools.cache
def jax_logits() -> np.ndarray:
    params = jax_from_canonical(weights(), MODEL)
    return np.asarray(jax.jit(JaxGPT(MODEL).apply)({"params": params}, rows()[0]))


def torch_loss_and_grad(logits: np.ndarray, targets: np.ndarray) -> tuple[float, np.ndarray]:
    logits = torch.tensor(logits, requires_grad=True)
    loss = torch_cross_entropy(logits, torch.from_numpy(targets), MODEL.vocab_size)
    loss.backward()
    return loss.item(), logits.grad.numpy()


def jax_loss_and_grad(logits: np.ndarray, targets: np.ndarray) -> tuple[float, np.ndarray]:
    loss, grad = jax.jit(jax.value_and_grad(jax_cross_entropy), static_argnums=2)(logits, targets, MODEL.vocab_size)
    return float(loss), np.asarray(grad)


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_prompt_positions_contribute_nothing_and_the_loss_is_the_responses(framework):
    logits = (torch_logits() if framework == "torch" else jax_logits()).copy()
    loss_and_grad = torch_loss_and_grad if framework == "torch" else jax_loss_and_grad
    _, targets = rows()
    prompt = targets == IGNORE_INDEX
    assert prompt.any() and (~prompt).any()

    loss, grad = loss_and_grad(logits, targets)
    assert loss == pytest.approx(hand_loss(logits, targets), rel=1e-5)
    assert np.all(grad[prompt] == 0.0)  # exactly: the prompt's logits do not reach the loss
    assert np.all(np.abs(grad[~prompt]).sum(axis=-1) > 0)  # every learned position does
    assert np.all(grad[..., MODEL.vocab_size:] == 0.0)  # nor do the padded ids

    scrambled = logits.copy()  # anything at all at the prompt's positions: the same loss
    scrambled[prompt] = np.random.default_rng(1).normal(0, 100, scrambled[prompt].shape)
    assert loss_and_grad(scrambled, targets)[0] == loss


def test_both_frameworks_give_the_same_fine_tuning_loss():
    _, targets = rows()
    torch_loss = torch_loss_and_grad(torch_logits(), targets)[0]
    jax_loss = jax_loss_and_grad(jax_logits(), targets)[0]
    assert jax_loss == pytest.approx(torch_loss, rel=1e-5)
