"""Weights move between JAX, PyTorch and Hugging Face directories without changing a bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util
from flax.linen import meta

from gpt2_formats import init_weights
from gpt2_common import weights as cw
from gpt2_jax import weights as jw
from gpt2_jax.model import GPT as JaxGPT
from gpt2_torch import weights as tw
from gpt2_torch.model import GPT as TorchGPT
from parity_tests.conftest import CASES, random_weights


def jax_init_weights(path, model):
    """--init-from as the JAX trainer reads it: any form, through gpt2_formats, as params."""
    return jw.from_canonical(init_weights(path, model), model)


def torch_init_weights(path, model):
    """--init-from as the PyTorch trainer reads it: any form, through gpt2_formats, as a state dict."""
    return tw.from_canonical(init_weights(path, model), model)


def test_jax_to_torch_and_back_is_bit_exact(case):
    """JAX params -> canonical -> PyTorch -> canonical -> JAX params: every bit of every parameter comes back (the
    rows that pad the vocabulary come back as zeros: they are not weights, and are not exported)."""
    model = case.model
    params = meta.unbox(JaxGPT(model).init(jax.random.key(3), jnp.zeros((1, 1), jnp.int32))["params"])
    torch_gpt = TorchGPT(model)
    torch_gpt.load_state_dict(tw.from_canonical(jw.to_canonical(params, model), model))
    back = jw.from_canonical(tw.to_canonical(torch_gpt.state_dict(), model), model)

    start, returned = traverse_util.flatten_dict(jax.device_get(params)), traverse_util.flatten_dict(back)
    assert start.keys() == returned.keys()
    for path, value in start.items():
        rows = model.vocab_size if path == ("wte", "embedding") else None
        got = returned[path]
        assert got.dtype == value.dtype and np.array_equal(got[:rows], value[:rows]), path
    assert not returned[("wte", "embedding")][model.vocab_size:].any()


@pytest.mark.parametrize("case", CASES[1:2], ids=[c.name for c in CASES[1:2]])
def test_directory_we_write_gives_transformers_our_weights_and_logits(case, tmp_path):
    weights, tokens = random_weights(case.model), torch.from_numpy(case.tokens()).long()
    torch_gpt = TorchGPT(case.model).eval()
    torch_gpt.load_state_dict(tw.from_canonical(weights, case.model))
    cw.save_hf(tw.to_canonical(torch_gpt.state_dict(), case.model), case.model, tmp_path / "hf")

    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        expected, got = torch_gpt(tokens)[..., : case.model.vocab_size], hf(tokens).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("case", CASES[1:2], ids=[c.name for c in CASES[1:2]])
def test_directory_transformers_writes_starts_both_trainers(case, tmp_path):
    m = case.model
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=m.vocab_size, n_positions=m.block_size, n_embd=m.n_embd, n_layer=m.n_layer, n_head=m.n_head))
    hf.save_pretrained(tmp_path / "hf")
    expected = {k: v.numpy() for k, v in hf.state_dict().items() if k != "lm_head.weight"}

    # through the --init-from entry points, as the trainers call them
    jax_params = jax_init_weights(tmp_path / "hf", m)
    torch_state = torch_init_weights(tmp_path / "hf", m)
    for got in (jw.to_canonical(jax_params, m), tw.to_canonical(torch_state, m)):
        assert got.keys() == expected.keys()
        for name, value in expected.items():
            np.testing.assert_array_equal(got[name], value, err_msg=name)
