"""The Pallas head-and-loss kernels (gpt2_jax/pallas_loss.py, model.loss_kernel = "pallas") and the GELU switch
(model.gelu_dtype), on the CPU: the kernels run in Pallas's interpreter, against the chunked XLA loss they replace.

The shapes are odd on purpose: a vocabulary that is not a whole number of tiles, padded rows that would take much
probability if they were not masked, a width and a row count that are not whole tiles either, ignored targets.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2_common.config import ModelConfig
from gpt2_common.data import IGNORE_INDEX
from gpt2_jax import pallas_loss
from gpt2_jax.loss import fused_cross_entropy
from gpt2_jax.model import build_model, cross_entropy
from loss_inputs import head_inputs

VOCAB, PADDED, B, T, C = 100, 136, 3, 12, 24  # 136 = 4 tiles of 32 and a ragged 8; 36 rows = 2 blocks of 16 and 4
TILES = dict(block_rows=16, block_vocab=32, block_embd=16, block_out=16)  # C = 24: padded to 32, two output blocks
BF16_RTOL = 2e-2  # bf16 operands, fp32 accumulation on both sides: they differ only in the order of fp32 sums


batch = functools.partial(head_inputs, (B, T, C), VOCAB, PADDED)  # (seed, dtype) -> x, embedding, targets


def kernel_value_and_grads(x, embedding, targets, dtype=jnp.float32, **tiles):
    loss = functools.partial(pallas_loss.pallas_cross_entropy, targets=targets, vocab_size=VOCAB, dtype=dtype,
                             interpret=True, **(tiles or TILES))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, embedding)


def xla_value_and_grads(x, embedding, targets, dtype=jnp.float32):
    """The path the kernel replaces: the chunked loss (model.loss_kernel = "xla")."""
    loss = functools.partial(fused_cross_entropy, targets=targets, vocab_size=VOCAB, chunk_size=5, dtype=dtype)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, embedding)


def assert_close(actual, expected, rtol):
    """Within rtol of the expected array's scale (entries near zero ask no more of fp32 than it has)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert np.abs(actual - expected).max() <= rtol * np.abs(expected).max()


def test_fp32_loss_and_gradients_equal_the_xla_path():
    loss, (dx, dw) = kernel_value_and_grads(*batch())
    xla_loss, (xla_dx, xla_dw) = xla_value_and_grads(*batch())
    assert float(loss) == pytest.approx(float(xla_loss), rel=1e-5)
    assert_close(dx, xla_dx, 1e-5)
    assert_close(dw, xla_dw, 1e-5)
    assert dx.dtype == jnp.float32 and dw.shape == (PADDED, C)
    assert not np.asarray(dw)[VOCAB:].any()  # the padding never takes probability, so never a gradient
    assert not np.asarray(dx)[0, :5].any()  # nor does an ignored position


def test_the_loss_is_the_plain_cross_entropy_of_the_whole_logits():
    x, embedding, targets = batch(1)
    loss, _ = kernel_value_and_grads(x, embedding, targets)
    assert float(loss) == pytest.approx(float(cross_entropy(x @ embedding.T, targets, VOCAB)), rel=1e-5)


@pytest.mark.parametrize("tiles", [dict(block_rows=8, block_vocab=16, block_embd=8, block_out=8),
                                   dict(block_rows=64, block_vocab=256, block_embd=32, block_out=256)],
                         ids=["small tiles", "tiles larger than the problem"])
def test_the_tile_sizes_do_not_change_the_result(tiles):
    loss, (dx, dw) = kernel_value_and_grads(*batch(), **tiles)
    xla_loss, (xla_dx, xla_dw) = xla_value_and_grads(*batch())
    assert float(loss) == pytest.approx(float(xla_loss), rel=1e-5)
    assert_close(dx, xla_dx, 1e-5)
    assert_close(dw, xla_dw, 1e-5)


def test_bf16_within_bf16_tolerance_of_the_xla_path():
    loss, (dx, dw) = kernel_value_and_grads(*batch(dtype=jnp.bfloat16), dtype=jnp.bfloat16)
    xla_loss, (xla_dx, xla_dw) = xla_value_and_grads(*batch(dtype=jnp.bfloat16), dtype=jnp.bfloat16)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32  # as the chunked loss hands them back
    assert float(loss) == pytest.approx(float(xla_loss), rel=1e-3)
    assert_close(dx.astype(jnp.float32), xla_dx.astype(jnp.float32), BF16_RTOL)
    assert_close(dw, xla_dw, BF16_RTOL)


def test_every_target_ignored_gives_loss_and_gradients_zero():
    x, embedding, targets = batch()
    loss, (dx, dw) = kernel_value_and_grads(x, embedding, jnp.full_like(targets, IGNORE_INDEX))
    assert float(loss) == 0 and not np.asarray(dx).any() and not np.asarray(dw).any()


def test_the_gradients_follow_the_incoming_gradient():
    """Under fp16 the loss is multiplied by the loss scale before the backward pass: the gradients must follow."""
    x, embedding, targets = batch()
    loss = functools.partial(pallas_loss.pallas_cross_entropy, targets=targets, vocab_size=VOCAB, dtype=jnp.float32,
                             interpret=True, **TILES)
    dx, dw = jax.jit(jax.grad(lambda x, w: 1024.0 * loss(x, w), argnums=(0, 1)))(x, embedding)
    _, (dx1, dw1) = kernel_value_and_grads(x, embedding, targets)
    assert_close(dx, 1024.0 * dx1, 1e-6)
    assert_close(dw, 1024.0 * dw1, 1e-6)


def test_a_planted_wrong_tile_offset_fails_the_comparison(monkeypatch):
    """The tests above would catch a kernel that reads the wrong embedding rows: plant an off-by-one tile offset."""
    monkeypatch.setattr(pallas_loss, "_vocab_tile_start", lambda tile, block_vocab: tile * block_vocab + 1)
    loss, (dx, dw) = kernel_value_and_grads(*batch())
    xla_loss, (xla_dx, xla_dw) = xla_value_and_grads(*batch())
    with pytest.raises(AssertionError):
        assert float(loss) == pytest.approx(float(xla_loss), rel=1e-5)
    with pytest.raises(AssertionError):
        assert_close(dx, xla_dx, 1e-5)
    with pytest.raises(AssertionError):
        assert_close(dw, xla_dw, 1e-5)


def test_the_kernels_lower_to_triton():
    """What a GPU would compile, checked without one: the three kernels lower through Pallas's Triton backend (Triton
    wants power-of-two tiles, among other things) at GPT-2's own vocabulary, padded, in bf16."""
    from jax import export

    def value_and_grads(x, w, t):
        return jax.value_and_grad(lambda x, w: pallas_loss.pallas_cross_entropy(
            x, w, t, 50257, jnp.bfloat16, interpret=False), argnums=(0, 1))(x, w)

    args = (jax.ShapeDtypeStruct((2, 64, 96), jnp.bfloat16), jax.ShapeDtypeStruct((50304, 96), jnp.float32),
            jax.ShapeDtypeStruct((2, 64), jnp.int32))
    triton = "__gpu$xla.gpu.triton"
    exported = export.export(jax.jit(value_and_grads), platforms=["cuda"],
                             disabled_checks=[export.DisabledSafetyCheck.custom_call(triton)])(*args)
    text = exported.mlir_module()
    assert text.count(f"@{triton}") == 3
    for name in ("fused_ce_forward", "fused_ce_dx", "fused_ce_dw"):
        assert f'name = "{name}"' in text


# --- through the model ----------------------------------------------------------------------------------------------

TINY = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=100)  # padded to 128


@functools.cache  # the plain model's loss and gradients are the reference of three tests: one compile each
def model_value_and_grads(config: ModelConfig, precision: str = "fp32"):
    model = build_model(config, precision, backend="cpu")
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (3, 16)), jnp.int32)
    targets = rng.integers(0, config.vocab_size, (3, 16)).astype(np.int32)
    targets[:, ::3] = IGNORE_INDEX
    params = build_model(TINY, "fp32", backend="cpu").init(jax.random.key(0), tokens)["params"]
    loss = lambda p: model.apply({"params": p}, tokens, targets=jnp.asarray(targets))  # noqa: E731
    return jax.jit(jax.value_and_grad(loss))(params)


def assert_trees_close(actual, expected, rtol):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert_close(a, e, rtol)


def test_model_loss_kernel_switch_gives_the_same_training_arithmetic():
    loss, grads = model_value_and_grads(dataclasses.replace(TINY, loss_kernel="pallas"))
    xla_loss, xla_grads = model_value_and_grads(TINY)
    assert float(loss) == pytest.approx(float(xla_loss), rel=1e-5)
    assert_trees_close(grads, xla_grads, 1e-5)


def test_gelu_dtype_switch_changes_nothing_in_fp32_and_stays_within_bf16_rounding():
    fp32 = model_value_and_grads(dataclasses.replace(TINY, gelu_dtype="fp32"))
    compute = model_value_and_grads(TINY)
    assert float(fp32[0]) == float(compute[0])  # in fp32 the compute dtype is fp32: the same arithmetic
    assert_trees_close(fp32[1], compute[1], 0)
    bf16_fp32 = model_value_and_grads(dataclasses.replace(TINY, gelu_dtype="fp32"), "bf16")
    bf16_compute = model_value_and_grads(TINY, "bf16")
    assert float(bf16_fp32[0]) == pytest.approx(float(bf16_compute[0]), rel=1e-2)
    assert_trees_close(bf16_fp32[1], bf16_compute[1], 5e-2)


# --- the parity suite's cases, with the switches on -----------------------------------------------------------------

def _parity_cases():
    from parity_tests.conftest import CASES
    return CASES


@pytest.mark.parametrize("case", _parity_cases(), ids=[c.name for c in _parity_cases()])
def test_parity_suite_loss_and_gradients_agree_with_pytorch_with_the_switches_on(case, torch_one_thread):
    """parity_tests/test_grad_parity.py's comparison with the JAX loss taken through the model's head (the kernel,
    and the fp32 GELU switch), not through its logits: the same tolerances against the PyTorch reference."""
    from gpt2_jax import weights as jw
    from gpt2_jax.model import GPT
    from gpt2_torch import weights as tw
    from parity_tests.conftest import assert_close_to_scale, jax_params, random_weights
    from parity_tests.test_grad_parity import GRAD_RTOL, LOSS_RTOL, targets_for, torch_loss_and_grads

    model, tokens = case.model, case.tokens()
    weights, targets = random_weights(model), targets_for(tokens, model.vocab_size)
    switched = dataclasses.replace(model, loss_kernel="pallas", gelu_dtype="fp32")
    loss_fn = lambda p: GPT(switched).apply({"params": p}, jnp.asarray(tokens), targets=jnp.asarray(targets))  # noqa
    jax_loss, jax_grads = jax.jit(jax.value_and_grad(loss_fn))(jax_params(weights, model))
    torch_loss, torch_grads = torch_loss_and_grads(weights, model, tokens, targets)
    assert abs(float(jax_loss) - torch_loss) <= LOSS_RTOL * abs(torch_loss), (float(jax_loss), torch_loss)
    assert not np.asarray(jax_grads["wte"]["embedding"])[model.vocab_size:].any()
    jax_canonical = jw.to_canonical(jax.device_get(jax_grads), model)
    torch_canonical = tw.to_canonical(torch_grads, model)
    for name in torch_canonical:
        assert_close_to_scale(jax_canonical[name], torch_canonical[name], GRAD_RTOL, f"gradient of {name}")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the Triton kernels run on a GPU (scripts/gpu_check.sh)")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_triton_kernels_match_the_xla_path_on_gpu(dtype):
    """The compiled kernels at their default tiles and GPT-2's padded vocabulary, against the chunked loss on the same
    GPU (run with JAX_DEFAULT_MATMUL_PRECISION=highest: the fp32 bound needs fp32 matmuls, not TF32)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 200, 96)), dtype)
    embedding = jnp.asarray(rng.normal(size=(50304, 96)) * 0.1, jnp.float32)
    targets = rng.integers(0, 50257, (2, 200)).astype(np.int32)
    targets[0, :7] = IGNORE_INDEX
    targets = jnp.asarray(targets)
    kernel = functools.partial(pallas_loss.pallas_cross_entropy, targets=targets, vocab_size=50257, dtype=dtype,
                               interpret=False)
    chunked = functools.partial(fused_cross_entropy, targets=targets, vocab_size=50257, chunk_size=128, dtype=dtype)
    loss, (dx, dw) = jax.jit(jax.value_and_grad(kernel, argnums=(0, 1)))(x, embedding)
    xla_loss, (xla_dx, xla_dw) = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(x, embedding)
    rtol = 1e-5 if dtype == jnp.float32 else BF16_RTOL
    assert float(loss) == pytest.approx(float(xla_loss), rel=rtol)
    assert_close(dx.astype(jnp.float32), xla_dx.astype(jnp.float32), rtol)
    assert_close(dw, xla_dw, rtol)


# --- tokamax's LayerNorm (model.layer_norm) ------------------------------------------------------------------------

def test_tokamax_layer_norm_switch_keeps_the_parameters_and_the_arithmetic():
    """Off a GPU tokamax.layer_norm runs its XLA implementation (its Triton kernels need a GPU): this holds the
    module's parameters, names and numerics to Flax's; kernels_tests in scripts/gpu_check.sh times the kernels."""
    pytest.importorskip("tokamax")
    tokamax_config = dataclasses.replace(TINY, layer_norm="tokamax")
    params = build_model(TINY, "fp32", backend="cpu").init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    tokamax_params = build_model(tokamax_config, "fp32", backend="cpu").init(
        jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    assert jax.tree.structure(params) == jax.tree.structure(tokamax_params)
    assert_trees_close(tokamax_params, params, 0)  # the same initial values under the same names
    loss, grads = model_value_and_grads(tokamax_config)
    flax_loss, flax_grads = model_value_and_grads(TINY)
    assert float(loss) == pytest.approx(float(flax_loss), rel=1e-5)
    assert_trees_close(grads, flax_grads, 1e-5)
    bf16_loss, bf16_grads = model_value_and_grads(tokamax_config, "bf16")
    flax_bf16_loss, flax_bf16_grads = model_value_and_grads(TINY, "bf16")
    assert float(bf16_loss) == pytest.approx(float(flax_bf16_loss), rel=1e-2)
    assert_trees_close(bf16_grads, flax_bf16_grads, 5e-2)
