"""The same weights and tokens give the same logits in JAX, PyTorch and transformers.GPT2LMHeadModel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from gpt2_jax.model import GPT as JaxGPT
from parity_tests.conftest import CASES, assert_close_to_scale, hf_model, jax_params, random_weights, torch_model

FP32_RTOL = 1e-5
# bf16 keeps 8 bits of mantissa (a rounding error of up to 2^-9 = 0.2% per operation); after a few layers of matmuls
# with fp32 accumulation the logits of either framework stay within 3% of the fp32 logits' scale, and the two
# frameworks round in different places, so they are held to that bound against fp32 and to each other.
BF16_RTOL = 3e-2


def jax_logits(weights, model, tokens, dtype=jnp.float32) -> np.ndarray:
    apply = jax.jit(JaxGPT(model, dtype=dtype).apply)
    return np.asarray(apply({"params": jax_params(weights, model)}, jnp.asarray(tokens)))


def torch_logits(weights, model, tokens, autocast_dtype=None) -> np.ndarray:
    gpt = torch_model(weights, model)
    autocast = torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None)
    with torch.no_grad(), autocast:
        return gpt(torch.from_numpy(tokens).long()).float().numpy()


def hf_logits(weights, model, tokens) -> np.ndarray:
    with torch.no_grad():
        return hf_model(weights, model)(torch.from_numpy(tokens).long()).logits.float().numpy()


def test_fp32_logits_agree(case):
    weights, tokens, vocab = random_weights(case.model), case.tokens(), case.model.vocab_size
    reference = hf_logits(weights, case.model, tokens)
    ours_jax = jax_logits(weights, case.model, tokens)
    ours_torch = torch_logits(weights, case.model, tokens)
    assert ours_jax.shape == ours_torch.shape == (case.batch, case.seq, case.model.padded_vocab_size)
    assert_close_to_scale(ours_jax[..., :vocab], reference, FP32_RTOL, "JAX vs transformers")
    assert_close_to_scale(ours_torch[..., :vocab], reference, FP32_RTOL, "PyTorch vs transformers")
    assert_close_to_scale(ours_jax, ours_torch, FP32_RTOL, "JAX vs PyTorch (padded vocabulary included)")


@pytest.mark.parametrize("case", CASES[1:3], ids=[c.name for c in CASES[1:3]])
def test_bf16_logits_agree_within_bf16_rounding(case):
    weights, tokens = random_weights(case.model), case.tokens()
    reference = torch_logits(weights, case.model, tokens)
    bf16_jax = jax_logits(weights, case.model, tokens, dtype=jnp.bfloat16)
    bf16_torch = torch_logits(weights, case.model, tokens, autocast_dtype=torch.bfloat16)
    assert bf16_jax.dtype == bf16_torch.dtype == np.float32  # fp32 logits for the loss, whatever the compute dtype
    assert not np.array_equal(bf16_jax, reference)  # it did run in bf16
    assert_close_to_scale(bf16_jax, reference, BF16_RTOL, "JAX bf16 vs fp32")
    assert_close_to_scale(bf16_torch, reference, BF16_RTOL, "PyTorch bf16 vs fp32")
    assert_close_to_scale(bf16_jax, bf16_torch, BF16_RTOL, "JAX bf16 vs PyTorch bf16")
