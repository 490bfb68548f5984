"""gpt2_torch state dicts <-> the canonical layout: names, transposes, vocabulary padding, tied head."""

import numpy as np
import pytest
import torch

from gpt2_common import weights as cw
from gpt2_common.config import ModelConfig
from gpt2_common.errors import UserError
from gpt2_torch import weights as tw
from gpt2_torch.model import GPT

MODEL = ModelConfig(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=100)  # padded to 128


@pytest.fixture
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(MODEL)


def test_linear_weights_are_transposed_and_vocabulary_trimmed(model):
    state = model.state_dict()
    weights = tw.to_canonical(state, MODEL)
    assert {k: v.shape for k, v in weights.items()} == cw.canonical_shapes(MODEL)
    np.testing.assert_array_equal(weights["transformer.h.1.attn.c_attn.weight"],
                                  state["transformer.h.1.attn.c_attn.weight"].numpy().T)
    np.testing.assert_array_equal(weights["transformer.h.0.mlp.c_proj.weight"],
                                  state["transformer.h.0.mlp.c_proj.weight"].numpy().T)
    np.testing.assert_array_equal(weights["transformer.wte.weight"], state["transformer.wte.weight"][:100].numpy())


def test_round_trip_is_exact_and_loads_strictly(model):
    weights = tw.to_canonical(model.state_dict(), MODEL)
    fresh = GPT(MODEL)
    fresh.load_state_dict(tw.from_canonical(weights, MODEL))  # strict: every key, lm_head included
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    assert not fresh.transformer.wte.weight[100:].any()  # padded rows are zeros
    again = tw.to_canonical(fresh.state_dict(), MODEL)
    for name, value in weights.items():
        np.testing.assert_array_equal(again[name], value, err_msg=name)


def test_canonical_weights_do_not_alias_the_model(model):
    weights = tw.to_canonical(model.state_dict(), MODEL)
    before = weights["transformer.ln_f.weight"].copy()
    with torch.no_grad():
        model.transformer.ln_f.weight.add_(1.0)
    np.testing.assert_array_equal(weights["transformer.ln_f.weight"], before)


def test_compiled_and_ddp_prefixes_are_stripped(model):
    state = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    assert tw.to_canonical(state, MODEL).keys() == cw.canonical_shapes(MODEL).keys()


def test_a_state_dict_of_another_shape_is_one_clear_line(model):
    with pytest.raises(UserError, match=r"lacks 12 of the 40 tensors .*n_layer=3"):
        tw.to_canonical(model.state_dict(), ModelConfig(**{**MODEL.__dict__, "n_layer": 3}))
    with pytest.raises(UserError, match=r"wte.weight has shape \(128, 32\) but .* needs \(64, 32\)"):
        tw.to_canonical(model.state_dict(), ModelConfig(**{**MODEL.__dict__, "vocab_size": 64}))


def test_state_dict_tensors_are_contiguous(model):
    state = tw.from_canonical(tw.to_canonical(model.state_dict(), MODEL), MODEL)
    assert all(t.is_contiguous() for t in state.values())
