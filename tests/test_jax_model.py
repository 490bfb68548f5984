"""The Flax GPT-2: names and shapes of the contract, GPT-2 init, causality, the loss, attention selection, sampling."""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from gpt2_common.config import ModelConfig
from gpt2_common.errors import UserError
from gpt2_common.flops import num_params
from gpt2_jax.model import QKVDense, attention_implementation, build_model, cross_entropy
from gpt2_jax.sample import _decode_loop, generate, sample_next

CFG = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=16, vocab_size=100)  # padded to 128



@functools.cache
def init():
    """One tiny model for the module: XLA on CPU takes seconds to compile the random initialisation."""
    model = build_model(CFG, "fp32", backend="cpu")
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, CFG.block_size), jnp.int32))
    return model, nn.unbox(variables)["params"]


@functools.partial(jax.jit, static_argnums=0)
def apply(model, params, ids):
    return model.apply({"params": params}, ids)


def test_parameter_names_and_shapes_follow_the_contract():
    _, params = init()
    C = CFG.n_embd
    shapes = {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(params).items()}
    expected = {"wte/embedding": (128, C), "wpe/embedding": (16, C), "ln_f/scale": (C,), "ln_f/bias": (C,)}
    for i in range(CFG.n_layer):
        expected.update({
            f"h_{i}/ln_1/scale": (C,), f"h_{i}/ln_1/bias": (C,), f"h_{i}/ln_2/scale": (C,), f"h_{i}/ln_2/bias": (C,),
            f"h_{i}/attn/c_attn/kernel": (C, 3 * C), f"h_{i}/attn/c_attn/bias": (3 * C,),
            f"h_{i}/attn/c_proj/kernel": (C, C), f"h_{i}/attn/c_proj/bias": (C,),
            f"h_{i}/mlp/c_fc/kernel": (C, 4 * C), f"h_{i}/mlp/c_fc/bias": (4 * C,),
            f"h_{i}/mlp/c_proj/kernel": (4 * C, C), f"h_{i}/mlp/c_proj/bias": (C,),
        })
    assert shapes == expected  # no lm_head: the output head is tied to wte
    assert sum(math.prod(s) for s in shapes.values()) == num_params(CFG)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(params))


def test_gpt2_initialization():
    _, params = init()
    residual = 0.02 / math.sqrt(2 * CFG.n_layer)
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
    for name, std in [("wte/embedding", 0.02), ("wpe/embedding", 0.02), ("h_1/attn/c_attn/kernel", 0.02),
                      ("h_1/mlp/c_fc/kernel", 0.02), ("h_1/attn/c_proj/kernel", residual),
                      ("h_1/mlp/c_proj/kernel", residual)]:
        value = flat[name]
        assert value.std() == pytest.approx(std, rel=0.1), name
        assert abs(value.mean()) < std / 5, name
    assert all(np.abs(v).max() == 0 for k, v in flat.items() if k.endswith("bias"))
    assert all((v == 1).all() for k, v in flat.items() if k.endswith("scale"))


def test_attention_is_causal_and_logits_are_fp32():
    model, params = init()
    ids = np.random.default_rng(1).integers(0, 100, (1, 16)).astype(np.int32)
    changed = ids.copy()
    changed[:, 10:] = (ids[:, 10:] + 1) % 100
    a, b = apply(model, params, ids), apply(model, params, changed)
    assert a.shape == (1, 16, 128) and a.dtype == jnp.float32
    np.testing.assert_allclose(a[:, :10], b[:, :10], rtol=1e-6, atol=1e-6)
    assert not np.allclose(a[:, 10:], b[:, 10:])


def test_bf16_compute_keeps_fp32_params_and_tracks_fp32():
    model32, params = init()
    model16 = build_model(CFG, "bf16", backend="cpu")
    ids = np.random.default_rng(1).integers(0, 100, (1, 16)).astype(np.int32)
    out = apply(model16, params, ids)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, apply(model32, params, ids), atol=0.05)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_loss_masks_padded_vocabulary_and_ignored_targets():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 128)).astype(np.float32)
    targets = rng.integers(0, 100, (2, 5)).astype(np.int32)
    big_padding = logits.copy()
    big_padding[..., 100:] = 50.0  # would take all the probability if it were not masked
    token_losses = -np.take_along_axis(_log_softmax(logits[..., :100]), targets[..., None], -1)[..., 0]
    loss = jax.jit(cross_entropy, static_argnums=2)
    assert float(loss(big_padding, targets, 100)) == pytest.approx(token_losses.mean(), rel=1e-5)
    ignored = targets.copy()
    ignored[1] = -1
    assert float(loss(big_padding, ignored, 100)) == pytest.approx(token_losses[0].mean(), rel=1e-5)
    grads = np.asarray(jax.jit(jax.grad(cross_entropy), static_argnums=2)(big_padding, ignored, 100))
    assert np.isfinite(grads).all() and np.abs(grads[..., 100:]).max() == 0 and np.abs(grads[1]).max() == 0


def test_attention_selection():
    assert attention_implementation("auto", "gpu", jnp.bfloat16) == "cudnn"
    assert attention_implementation("auto", "gpu", jnp.float16) == "cudnn"
    assert attention_implementation("auto", "gpu", jnp.float32) == "xla"
    assert attention_implementation("auto", "cpu", jnp.bfloat16) == "xla"
    assert attention_implementation("auto", "tpu", jnp.bfloat16) == "xla"
    assert attention_implementation("xla", "gpu", jnp.bfloat16) == "xla"
    assert attention_implementation("cudnn", "gpu", jnp.bfloat16) == "cudnn"
    with pytest.raises(UserError, match="needs an NVIDIA GPU"):
        attention_implementation("cudnn", "cpu", jnp.bfloat16)
    with pytest.raises(UserError, match="bf16 or fp16"):
        attention_implementation("cudnn", "gpu", jnp.float32)
    assert build_model(CFG, "bf16", backend="gpu").attention == "cudnn"
    assert build_model(CFG, "bf16", backend="cpu").attention == "xla"


def test_loss_exponentials_selection():
    """model.loss_exp: "auto" keeps the fused loss's exponentials on a CPU (1.18-1.21x the step there) and
    recomputes them on an accelerator; "keep" and "recompute" hold anywhere."""
    def kept(setting, backend):
        return build_model(dataclasses.replace(CFG, loss_exp=setting), "bf16", backend=backend).keep_loss_exp

    assert kept("auto", "cpu") and not kept("auto", "gpu") and not kept("auto", "tpu")
    assert kept("keep", "gpu") and not kept("recompute", "cpu")


def test_queries_keys_and_values_come_from_matmuls_of_their_own():
    """No slice of a [B, T, 3C] activation, forward or backward: the split copied q, k and v out of one c_attn output
    (and the backward pass concatenated their gradients) for 3.6 ms of a 68.5 ms step on an H100 (QKVDense)."""
    model, params = init()
    ids = jnp.zeros((2, CFG.block_size), jnp.int32)
    step = jax.make_jaxpr(jax.grad(lambda p: model.apply({"params": p}, ids, targets=ids)))(params)

    def equations(jaxpr):
        for eqn in jaxpr.eqns:
            yield eqn
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from equations(sub)

    def is_qkv_wide(var):  # an activation [B, T, 3C]
        shape = getattr(var.aval, "shape", ())
        return len(shape) == 3 and shape[-1] == 3 * CFG.n_embd

    qkv_wide = [eqn.primitive.name for eqn in equations(step.jaxpr)
                if eqn.primitive.name in ("split", "slice", "concatenate")
                and any(map(is_qkv_wide, [*eqn.invars, *eqn.outvars]))]
    assert qkv_wide == []
    # and the three matmuls compute what the one did
    x = jax.random.normal(jax.random.PRNGKey(2), (2, CFG.block_size, CFG.n_embd))
    attn = params["h_0"]["attn"]["c_attn"]
    whole = x @ attn["kernel"] + attn["bias"]
    parts = QKVDense(CFG.n_embd).apply({"params": attn}, x)
    np.testing.assert_allclose(jnp.concatenate(parts, axis=-1), whole, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU (this run is CPU)")
def test_cudnn_attention_matches_xla_on_gpu():
    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=256, block_size=128, vocab_size=1000)
    model = build_model(cfg, "bf16")
    assert model.attention == "cudnn"
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 128), jnp.int32)))["params"]
    ids = jax.random.randint(jax.random.PRNGKey(1), (4, 128), 0, 1000)
    cudnn = apply(model, params, ids)
    xla = apply(model.clone(attention="xla"), params, ids)
    np.testing.assert_allclose(cudnn, xla, atol=0.05)


def test_sampling_never_picks_padded_ids_and_top_k_1_is_greedy():
    logits = np.zeros((64, 128), np.float32)
    logits[:, 120], logits[:, 7] = 100.0, 1.0
    keys = jax.random.split(jax.random.PRNGKey(0), 64)  # a key a row, as the decoder gives them
    sample = jax.jit(sample_next, static_argnums=(4,))

    def draw(temperature: float, top_k: int) -> list[int]:
        return np.asarray(sample(logits, keys, jnp.full(64, temperature, jnp.float32), jnp.full(64, top_k, jnp.int32),
                                 100)).tolist()

    assert set(draw(0.0, 0)) == {7}
    sampled = draw(1.0, 0)
    assert max(sampled) < 100 and len(set(sampled)) > 1
    assert set(draw(5.0, 1)) == {7}


def test_greedy_generation_matches_a_plain_loop_and_compiles_once():
    model, params = init()
    prompt = [5, 17, 3, 99, 42, 8, 1, 2, 3, 4, 5, 6, 7]  # 13 tokens: the 16-token buffer fills and slides
    out = generate(model, params, [prompt], 6, temperature=0.0, top_k=5)  # top-k does not change the argmax
    tokens = list(prompt)
    for _ in range(6):  # nanoGPT's loop: crop to block_size, run, take the last position's argmax
        context = np.zeros((1, CFG.block_size), np.int32)  # right-padded to one shape: one compile; causal
        window = tokens[-CFG.block_size:]
        context[0, :len(window)] = window
        logits = apply(model, params, context)[0, len(window) - 1]
        tokens.append(int(jnp.argmax(logits[:100])))
    assert out.tolist() == [tokens[len(prompt):]]
    before = _decode_loop._cache_size()
    other = generate(model, params, [[1, 2]], 6, temperature=0.8, top_k=5, seed=1)
    generate(model, params, [[9, 9, 9, 9, 9]], 6, temperature=0.5, top_k=5, seed=2)
    assert _decode_loop._cache_size() == before  # neither the prompt nor the temperature recompiles
    assert other.shape == (1, 6) and other.max() < 100
