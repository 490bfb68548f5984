"""gpt2_jax params <-> the canonical layout: names, vocabulary padding, boxed and plain pytrees."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import meta

from gpt2_common import weights as cw
from gpt2_common.config import ModelConfig
from gpt2_common.errors import UserError
from gpt2_jax import weights as jw
from gpt2_jax.model import GPT

MODEL = ModelConfig(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=100)  # padded to 128


@pytest.fixture(scope="module")
def variables():
    # boxed, with logical axis names; one compile, not one per op of the initialisation
    return jax.jit(GPT(MODEL).init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))


def test_names_map_one_to_one():
    names = list(cw.canonical_shapes(MODEL))
    paths = [jw.flax_path(n) for n in names]
    assert paths[:2] == [("wte", "embedding"), ("wpe", "embedding")]
    assert ("h_1", "attn", "c_attn", "kernel") in paths and ("h_0", "ln_2", "scale") in paths
    assert ("ln_f", "bias") in paths and len(set(paths)) == len(names)
    assert [jw.canonical_name(p) for p in paths] == names


def test_kernels_keep_their_layout_and_vocabulary_is_trimmed(variables):
    params = jax.device_get(variables["params"])
    weights = jw.to_canonical(variables, MODEL)
    assert {k: v.shape for k, v in weights.items()} == cw.canonical_shapes(MODEL)
    np.testing.assert_array_equal(weights["transformer.h.1.mlp.c_fc.weight"],
                                  params["h_1"]["mlp"]["c_fc"]["kernel"].value)
    np.testing.assert_array_equal(weights["transformer.wte.weight"], params["wte"]["embedding"].value[:100])


def test_round_trip_is_exact_and_matches_the_model_tree(variables):
    weights = jw.to_canonical(variables, MODEL)
    params = jw.from_canonical(weights, MODEL)
    assert jax.tree.structure(params) == jax.tree.structure(meta.unbox(variables["params"]))
    assert params["wte"]["embedding"].shape == (128, 32) and not params["wte"]["embedding"][100:].any()
    again = jw.to_canonical(params, MODEL)
    for name, value in weights.items():
        np.testing.assert_array_equal(again[name], value, err_msg=name)
    logits = GPT(MODEL).apply({"params": params}, jnp.array([[1, 2, 3]]))
    assert logits.shape == (1, 3, 128) and np.isfinite(np.asarray(logits)).all()


def test_params_of_another_shape_are_one_clear_line(variables):
    with pytest.raises(UserError, match=r"JAX params holds 12 tensors .*transformer.h.1"):
        jw.to_canonical(variables, ModelConfig(**{**MODEL.__dict__, "n_layer": 1}))
