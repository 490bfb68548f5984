"""Weights from elsewhere give that codebase's own logits here: a checkpoint in nanoGPT's exact form (its names,
`_orig_mod.` prefixes, model_args, an AdamW state) against a forward pass written below from nanoGPT's equations
(exact GELU, nn.Linear [out, in] weights), and exact-GELU Hugging Face models against transformers itself."""

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import gpt2_formats
from gpt2_common import weights as cw
from gpt2_common.config import ModelConfig
from gpt2_common.errors import UserError
from gpt2_jax.model import GPT as JaxGPT
from gpt2_jax.weights import from_canonical as jax_from_canonical
from gpt2_torch.model import GPT as TorchGPT
from gpt2_torch.weights import from_canonical as torch_from_canonical
from tests.script_module import load_script

ODD = dict(n_layer=3, n_head=3, n_embd=48, block_size=13, vocab_size=67, dropout=0.0)  # head_dim 16, vocab padded
TOKENS = np.random.default_rng(1).integers(0, ODD["vocab_size"], (2, ODD["block_size"]))
ATOL = 1e-5


convert = load_script("convert")


# --- nanoGPT, as its model.py computes and its train.py saves -------------------------------------------------------

def nanogpt_state_dict(bias: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random GPT in nanoGPT's state-dict form: nn.Linear weights [out, in], lm_head.weight the same tensor as the
    embedding; with bias=False, no Linear or LayerNorm biases at all."""
    rng = np.random.default_rng(seed)
    c, state = ODD["n_embd"], {}

    def put(name, shape, center=0.0):
        state[name] = torch.tensor(center + 0.2 * rng.standard_normal(shape), dtype=torch.float32)

    put("transformer.wte.weight", (ODD["vocab_size"], c))
    put("transformer.wpe.weight", (ODD["block_size"], c))
    for i in range(ODD["n_layer"]):
        p = f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            put(p + f"{ln}.weight", (c,), 1.0)
            if bias:
                put(p + f"{ln}.bias", (c,))
        for name, (out, inp) in (("attn.c_attn", (3 * c, c)), ("attn.c_proj", (c, c)), ("mlp.c_fc", (4 * c, c)),
                                 ("mlp.c_proj", (c, 4 * c))):
            put(p + f"{name}.weight", (out, inp))
            if bias:
                put(p + f"{name}.bias", (out,))
    put("transformer.ln_f.weight", (c,), 1.0)
    if bias:
        put("transformer.ln_f.bias", (c,))
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def save_like_nanogpt_train(state: dict[str, torch.Tensor], bias: bool, path: Path) -> None:
    """The dict nanoGPT's train.py saves: the compiled model's state dict (keys prefixed `_orig_mod.`), model_args,
    a real AdamW state after one step, iter_num, best_val_loss (a tensor) and the config globals."""
    params = [torch.nn.Parameter(t.clone()) for k, t in state.items() if k != "lm_head.weight"]
    optimizer = torch.optim.AdamW(params, lr=6e-4, betas=(0.9, 0.95))
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    model_args = dict(n_layer=ODD["n_layer"], n_head=ODD["n_head"], n_embd=ODD["n_embd"],
                      block_size=ODD["block_size"], bias=bias, vocab_size=ODD["vocab_size"], dropout=0.0)
    checkpoint = {"model": {f"_orig_mod.{k}": v for k, v in state.items()}, "optimizer": optimizer.state_dict(),
                  "model_args": model_args, "iter_num": 250, "best_val_loss": torch.tensor(2.5),
                  "config": {"out_dir": "out", "dataset": "openwebtext", "compile": True, "learning_rate": 6e-4}}
    torch.save(checkpoint, path)


def nanogpt_forward(state: dict[str, torch.Tensor], n_head: int, idx: np.ndarray) -> np.ndarray:
    """nanoGPT's forward pass in float64 numpy: pre-LayerNorm blocks (eps 1e-5, absent bias = none), causal
    self-attention over n_head heads, an MLP with the exact GELU 0.5 x (1 + erf(x / sqrt 2)), the tied head."""
    w = {k.removeprefix("_orig_mod."): v.double().numpy() for k, v in state.items()}
    erf = np.vectorize(math.erf)

    def layer_norm(x, name):
        x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
        return x * w[f"{name}.weight"] + w.get(f"{name}.bias", 0.0)

    def linear(x, name):
        return x @ w[f"{name}.weight"].T + w.get(f"{name}.bias", 0.0)

    B, T = idx.shape
    C = w["transformer.wte.weight"].shape[1]
    hd = C // n_head
    x = w["transformer.wte.weight"][idx] + w["transformer.wpe.weight"][:T]
    causal = np.tril(np.ones((T, T), bool))
    for i in range(sum(k.endswith(".ln_1.weight") for k in w)):
        p = f"transformer.h.{i}."
        q, k, v = np.split(linear(layer_norm(x, p + "ln_1"), p + "attn.c_attn"), 3, axis=-1)
        q, k, v = (t.reshape(B, T, n_head, hd).transpose(0, 2, 1, 3) for t in (q, k, v))
        att = np.where(causal, q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd), -np.inf)
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        x = x + linear((att @ v).transpose(0, 2, 1, 3).reshape(B, T, C), p + "attn.c_proj")
        h = linear(layer_norm(x, p + "ln_2"), p + "mlp.c_fc")
        x = x + linear(0.5 * h * (1 + erf(h / math.sqrt(2))), p + "mlp.c_proj")
    return layer_norm(x, "transformer.ln_f") @ w["lm_head.weight"].T


def jax_logits(weights, model) -> np.ndarray:
    params = jax.tree.map(jnp.asarray, jax_from_canonical(weights, model))
    return np.asarray(JaxGPT(model).apply({"params": params}, jnp.asarray(TOKENS)))[..., : model.vocab_size]


def torch_logits(weights, model) -> np.ndarray:
    gpt = TorchGPT(model).eval()
    gpt.load_state_dict(torch_from_canonical(weights, model))
    with torch.no_grad():
        return gpt(torch.from_numpy(TOKENS)).numpy()[..., : model.vocab_size]


def hf_logits(directory: Path) -> np.ndarray:
    hf = transformers.GPT2LMHeadModel.from_pretrained(directory, attn_implementation="eager").eval()
    with torch.no_grad():
        return hf(torch.from_numpy(TOKENS)).logits.numpy()


def assert_within(actual, expected, what):
    error = np.abs(np.asarray(actual, np.float64) - expected).max()
    assert error <= ATOL, f"{what}: max |logit error| {error:.3g} > {ATOL} (logits up to {np.abs(expected).max():.3g})"


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_a_nanogpt_checkpoint_gives_nanogpt_s_logits_in_jax_torch_and_transformers(tmp_path, bias):
    state = nanogpt_state_dict(bias)
    save_like_nanogpt_train(state, bias, tmp_path / "ckpt.pt")
    expected = nanogpt_forward(state, ODD["n_head"], TOKENS)

    config, weights = gpt2_formats.read_canonical(tmp_path)  # nanoGPT's out_dir, as sample/evaluate/serve take it
    model = config.model
    assert model == ModelConfig(**ODD, activation="gelu")
    if not bias:
        assert not weights["transformer.h.1.attn.c_attn.bias"].any() and not weights["transformer.ln_f.bias"].any()
    assert_within(jax_logits(weights, model), expected, "JAX")
    assert_within(torch_logits(weights, model), expected, "PyTorch")
    # --init-from, as both trainers call it, with the run's own config
    assert_within(torch_logits(gpt2_formats.init_weights(tmp_path / "ckpt.pt", model), model), expected,
                  "PyTorch --init-from")

    convert.main([str(tmp_path / "ckpt.pt"), str(tmp_path / "hf"), "--to", "hf"])
    assert_within(hf_logits(tmp_path / "hf"), expected, "transformers after --to hf")

    # and out again: a ckpt.pt of nanoGPT's bias=True form, which its sample.py loads (strict load_state_dict)
    convert.main([str(tmp_path / "hf"), str(tmp_path / "out"), "--to", "nanogpt"])
    written = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert set(written["model_args"]) == {"n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout"}
    assert written["model_args"]["bias"] is True and "dataset" not in written["config"]
    assert set(written["model"]) == set(nanogpt_state_dict(bias=True))
    assert written["model"]["lm_head.weight"].data_ptr() == written["model"]["transformer.wte.weight"].data_ptr()
    for name, value in state.items():
        assert torch.equal(written["model"][name], value), name
    assert_within(nanogpt_forward(written["model"], written["model_args"]["n_head"], TOKENS), expected,
                  "nanoGPT's forward on the ckpt.pt written")


def test_a_bare_nanogpt_state_dict_is_read_with_gpt2_s_head_width(tmp_path):
    """No model_args: the shapes come from the tensors, n_head from GPT-2's 64-wide heads (the file has no record
    of it), and a width that is no multiple of 64 is refused rather than guessed."""
    torch.save(nanogpt_state_dict(bias=True), tmp_path / "model.pt")  # 48 wide
    with pytest.raises(UserError, match="does not record n_head, and its width 48 is not a multiple of"):
        gpt2_formats.read_canonical(tmp_path / "model.pt")
    model = ModelConfig(n_layer=1, n_head=1, n_embd=64, block_size=8, vocab_size=50, activation="gelu")
    rng = np.random.default_rng(0)
    canonical = {k: rng.standard_normal(s).astype(np.float32) for k, s in cw.canonical_shapes(model).items()}
    bare = {f"_orig_mod.{k}": v for k, v in torch_from_canonical(canonical, model).items()}
    bare["_orig_mod.transformer.wte.weight"] = bare["_orig_mod.transformer.wte.weight"][:50]
    bare["_orig_mod.lm_head.weight"] = bare["_orig_mod.transformer.wte.weight"]
    torch.save(bare, tmp_path / "bare.pt")
    config, weights = gpt2_formats.read_canonical(tmp_path / "bare.pt")
    assert config.model == ModelConfig(n_layer=1, n_head=1, n_embd=64, block_size=8, vocab_size=50, activation="gelu")
    for name, value in canonical.items():
        np.testing.assert_array_equal(weights[name], value, err_msg=name)


# --- exact-GELU Hugging Face models ---------------------------------------------------------------------------------

def test_exact_gelu_hf_models_round_trip_bit_exact_with_transformers_logits(tmp_path):
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=ODD["vocab_size"], n_positions=ODD["block_size"], n_embd=ODD["n_embd"], n_layer=ODD["n_layer"],
        n_head=ODD["n_head"], activation_function="gelu", attn_implementation="eager")).eval()
    with torch.no_grad():  # weights large enough that the two GELUs part clearly
        for name, p in hf.named_parameters():
            p.normal_(1.0 if ".ln_" in name and name.endswith("weight") else 0.0, 0.2)
    hf.save_pretrained(tmp_path / "hf")
    with torch.no_grad():
        expected = hf(torch.from_numpy(TOKENS)).logits.double().numpy()

    config, weights = gpt2_formats.read_canonical(tmp_path / "hf")
    assert config.model.activation == "gelu"
    assert_within(jax_logits(weights, config.model), expected, "JAX")
    assert_within(torch_logits(weights, config.model), expected, "PyTorch")
    tanh = ModelConfig(**{**config.model.__dict__, "activation": "gelu_tanh"})
    assert np.abs(torch_logits(weights, tanh) - expected).max() > 100 * ATOL  # the test can tell the two apart

    convert.main([str(tmp_path / "hf"), str(tmp_path / "jax"), "--to", "jax"])
    convert.main([str(tmp_path / "jax"), str(tmp_path / "t.pt"), "--to", "torch"])
    convert.main([str(tmp_path / "t.pt"), str(tmp_path / "hf2"), "--to", "hf"])
    assert transformers.GPT2Config.from_pretrained(tmp_path / "hf2").activation_function == "gelu"
    original = load_file(tmp_path / "hf" / "model.safetensors")
    returned = load_file(tmp_path / "hf2" / "model.safetensors")
    for name, value in returned.items():
        assert value.dtype == np.float32 and np.array_equal(value, original[name]), name
    assert_within(hf_logits(tmp_path / "hf2"), expected, "transformers after the round trip")
