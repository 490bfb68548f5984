"""The loss and every gradient, mapped to the canonical layout, agree between JAX and PyTorch."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

from gpt2_jax import weights as jw
from gpt2_jax.model import GPT as JaxGPT, cross_entropy as jax_cross_entropy
from gpt2_torch import weights as tw
from gpt2_torch.model import cross_entropy as torch_cross_entropy
from parity_tests.conftest import assert_close_to_scale, jax_params, random_weights, torch_model

LOSS_RTOL = 1e-6
GRAD_RTOL = 1e-5


def targets_for(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """Random next-token targets with every third position ignored (-1), as fine-tuning masks prompts."""
    targets = np.random.default_rng(1).integers(0, vocab_size, tokens.shape, dtype=np.int32)
    targets.reshape(-1)[1::3] = -1
    return targets


def jax_loss_and_grads(weights, model, tokens, targets):
    def loss_fn(params):
        logits = JaxGPT(model).apply({"params": params}, tokens)
        return jax_cross_entropy(logits, targets, model.vocab_size)

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(jax_params(weights, model))
    return float(loss), jax.device_get(grads)


def torch_loss_and_grads(weights, model, tokens, targets):
    gpt = torch_model(weights, model)
    loss = torch_cross_entropy(gpt(torch.from_numpy(tokens).long()), torch.from_numpy(targets).long(),
                               model.vocab_size)
    loss.backward()
    # named_parameters lists the tied wte/lm_head matrix once, with the gradient of both of its uses
    return loss.item(), {name: p.grad for name, p in gpt.named_parameters()}


def test_loss_and_gradients_agree(case):
    model, tokens = case.model, case.tokens()
    weights, targets = random_weights(model), targets_for(tokens, model.vocab_size)
    jax_loss, jax_grads = jax_loss_and_grads(weights, model, tokens, targets)
    torch_loss, torch_grads = torch_loss_and_grads(weights, model, tokens, targets)

    assert abs(jax_loss - torch_loss) <= LOSS_RTOL * abs(torch_loss), (jax_loss, torch_loss)
    # The padded vocabulary's rows take no gradient: their logits are masked before the softmax.
    assert not np.asarray(jax_grads["wte"]["embedding"])[model.vocab_size:].any()
    assert not torch_grads["transformer.wte.weight"][model.vocab_size:].any()
    jax_canonical, torch_canonical = jw.to_canonical(jax_grads, model), tw.to_canonical(torch_grads, model)
    for name in torch_canonical:
        assert_close_to_scale(jax_canonical[name], torch_canonical[name], GRAD_RTOL, f"gradient of {name}")


def test_a_batch_with_every_target_ignored_has_loss_zero_in_both():
    logits = np.random.default_rng(0).standard_normal((2, 3, 128)).astype(np.float32)
    targets = -np.ones((2, 3), np.int32)
    assert float(jax_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), 100)) == 0.0
    assert float(torch_cross_entropy(torch.from_numpy(logits), torch.from_numpy(targets), 100)) == 0.0
