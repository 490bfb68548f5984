"""The canonical layout and its Hugging Face directory form, checked against transformers itself (no downloads:
tiny randomly initialised GPT2Configs)."""

import json

import numpy as np
import pytest
import torch
import transformers

import gpt2_formats
from gpt2_common import weights as cw
from gpt2_common.config import ModelConfig
from gpt2_common.errors import UserError
from gpt2_torch.weights import read_state_dict_file

MODEL = ModelConfig(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=100, pad_vocab_multiple=64)


def random_weights(model: ModelConfig, seed: int = 0) -> cw.Weights:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in cw.canonical_shapes(model).items()}


def hf_model(model: ModelConfig = MODEL, cls=transformers.GPT2LMHeadModel):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=model.vocab_size, n_positions=model.block_size,
                                     n_embd=model.n_embd, n_layer=model.n_layer, n_head=model.n_head)
    return cls(config).eval()


def hf_canonical(hf) -> cw.Weights:
    return {k: v.numpy() for k, v in hf.state_dict().items() if k != "lm_head.weight"}


def test_canonical_shapes_are_transformers_own():
    ours = cw.canonical_shapes(MODEL)
    theirs = {k: tuple(v.shape) for k, v in hf_canonical(hf_model()).items()}
    assert ours == theirs


def test_linear_weights_are_the_four_matrices_of_each_block():
    linear = [k for k in cw.canonical_shapes(MODEL) if cw.is_linear_weight(k)]
    assert len(linear) == 4 * MODEL.n_layer
    assert all(k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) for k in linear)


def test_config_round_trips_through_config_json():
    model = ModelConfig(n_layer=3, n_head=2, n_embd=48, block_size=24, vocab_size=50257, dropout=0.1)
    assert cw.model_config_from_hf(cw.hf_config(model), "x") == model


def test_directory_we_write_loads_in_transformers(tmp_path):
    weights = random_weights(MODEL)
    cw.save_hf(weights, MODEL, tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    assert hf.config.n_positions == MODEL.block_size and hf.config.vocab_size == MODEL.vocab_size
    assert hf.config.activation_function == "gelu_new" and hf.config.tie_word_embeddings
    state = hf.state_dict()
    for name, value in weights.items():
        np.testing.assert_array_equal(state[name].numpy(), value, err_msg=name)
    np.testing.assert_array_equal(state["lm_head.weight"].numpy(), weights["transformer.wte.weight"])


@pytest.mark.parametrize("cls", [transformers.GPT2LMHeadModel, transformers.GPT2Model])
def test_directory_transformers_writes_loads_in_ours(tmp_path, cls):
    hf = hf_model(cls=cls)
    hf.save_pretrained(tmp_path / "hf")
    model, weights = cw.load_hf(tmp_path / "hf")
    assert model == ModelConfig(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=100, dropout=0.1)
    expected = {k if k.startswith("transformer.") else f"transformer.{k}": v for k, v in hf_canonical(hf).items()}
    assert weights.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(weights[name], value, err_msg=name)


def test_reads_sharded_safetensors(tmp_path):
    hf = hf_model()
    hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    _, weights = cw.load_hf(tmp_path / "hf")
    np.testing.assert_array_equal(weights["transformer.h.1.mlp.c_fc.weight"],
                                  hf.state_dict()["transformer.h.1.mlp.c_fc.weight"].numpy())


def test_reads_pytorch_model_bin_with_mask_buffers_and_half_precision(tmp_path):
    """The form of OpenAI's GPT-2 on the Hub: pytorch_model.bin, attn.bias/masked_bias buffers, no prefix."""
    hf = hf_model()
    state = {k.removeprefix("transformer."): v.half() for k, v in hf.state_dict().items()}
    state["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 16, 16))
    state["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    (tmp_path / "hf").mkdir()
    torch.save(state, tmp_path / "hf" / "pytorch_model.bin")
    (tmp_path / "hf" / "config.json").write_text(hf.config.to_json_string())
    with pytest.raises(UserError, match="holds its weights as pytorch_model.bin, which only PyTorch reads"):
        cw.load_hf(tmp_path / "hf")  # gpt2_common reads no torch file by itself
    _, weights = gpt2_formats.read_canonical(tmp_path / "hf")  # the registry hands it gpt2_torch's reader
    assert weights["transformer.wte.weight"].dtype == np.float32
    np.testing.assert_array_equal(weights["transformer.wte.weight"], state["wte.weight"].float().numpy())


def test_reads_bf16_safetensors(tmp_path):
    hf = hf_model().to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "hf")
    _, weights = cw.load_hf(tmp_path / "hf")
    np.testing.assert_array_equal(weights["transformer.ln_f.weight"], np.ones(32, np.float32))
    np.testing.assert_array_equal(weights["transformer.wpe.weight"],
                                  hf.state_dict()["transformer.wpe.weight"].float().numpy())


def test_pad_vocab_adds_zero_rows():
    wte = np.ones((100, 4), np.float32)
    padded = cw.pad_vocab(wte, MODEL)
    assert padded.shape == (128, 4) and padded[:100].all() and not padded[100:].any()
    assert cw.pad_vocab(padded, ModelConfig(vocab_size=128)) is padded  # already a multiple: nothing to add


def test_fit_to_model_crops_positions_and_refuses_other_shapes():
    weights = random_weights(MODEL)
    shorter = ModelConfig(**{**MODEL.__dict__, "block_size": 8})
    fitted = cw.fit_to_model(weights, MODEL, shorter, "src")
    np.testing.assert_array_equal(fitted["transformer.wpe.weight"], weights["transformer.wpe.weight"][:8])
    with pytest.raises(UserError, match=r"100-token vocabulary does not fit the config's embedding of 64 rows"):
        cw.fit_to_model(weights, MODEL, ModelConfig(**{**MODEL.__dict__, "vocab_size": 64}), "src")
    with pytest.raises(UserError, match=r"vocabulary has 100 tokens, the config's 120; set model.vocab_size=100"):
        cw.fit_to_model(weights, MODEL, ModelConfig(**{**MODEL.__dict__, "vocab_size": 120}), "src")
    with pytest.raises(UserError, match=r"different GPT-2 than the config: set model.n_layer=2 \(e.g. with --set\)"):
        cw.fit_to_model(weights, MODEL, ModelConfig(**{**MODEL.__dict__, "n_layer": 3}), "src")
    with pytest.raises(UserError, match=r"model.block_size=16 \(or less\)"):
        cw.fit_to_model(weights, MODEL, ModelConfig(**{**MODEL.__dict__, "block_size": 32}), "src")


# --- bad input: one clear line, nothing written -----------------------------------------------------------------------

def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_missing_config_json(tmp_path):
    hf_model().save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").unlink()
    with pytest.raises(UserError, match="has no config.json") as err:
        cw.load_hf(tmp_path / "hf")
    one_line(err)


def test_unknown_weight_format(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cw.hf_config(MODEL)))
    (tmp_path / "hf" / "flax_model.msgpack").write_bytes(b"\x80")
    with pytest.raises(UserError, match="holds no weights in a format.*found: config.json, flax_model.msgpack") as err:
        cw.load_hf(tmp_path / "hf")
    one_line(err)


def test_not_gpt2_and_unsupported_variants(tmp_path):
    with pytest.raises(UserError, match="'llama' model"):
        cw.model_config_from_hf({**cw.hf_config(MODEL), "model_type": "llama"}, "src")
    with pytest.raises(UserError, match="activation_function='relu'"):
        cw.model_config_from_hf({**cw.hf_config(MODEL), "activation_function": "relu"}, "src")
    with pytest.raises(UserError, match="lacks or garbles 'n_embd'"):
        cw.model_config_from_hf({k: v for k, v in cw.hf_config(MODEL).items() if k != "n_embd"}, "src")


def test_vocabulary_that_does_not_match_the_config(tmp_path):
    hf = hf_model()
    hf.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "vocab_size": 64}))
    with pytest.raises(UserError, match=r"wte.weight has shape \(100, 32\) but .* needs \(64, 32\)") as err:
        cw.load_hf(tmp_path / "hf")
    one_line(err)


def test_missing_extra_and_misshapen_tensors():
    weights = random_weights(MODEL)
    with pytest.raises(UserError, match=r"lacks 1 of the 28 tensors.*h.1.ln_2.bias"):
        cw.check_weights({k: v for k, v in weights.items() if k != "transformer.h.1.ln_2.bias"}, MODEL, "src")
    with pytest.raises(UserError, match=r"holds 1 tensors .*transformer.h.2.ln_1.weight"):
        cw.check_weights({**weights, "transformer.h.2.ln_1.weight": np.ones(32)}, MODEL, "src")
    transposed = {**weights, "transformer.h.0.mlp.c_fc.weight": weights["transformer.h.0.mlp.c_fc.weight"].T}
    with pytest.raises(UserError, match=r"c_fc.weight has shape \(128, 32\) but .* needs \(32, 128\)"):
        cw.check_weights(transposed, MODEL, "src")


def test_untied_head_is_refused():
    state = {**random_weights(MODEL), "lm_head.weight": np.zeros((100, 32), np.float32)}
    with pytest.raises(UserError, match="untied"):
        cw.canonicalize(state, "src")
    tied = cw.canonicalize({**state, "lm_head.weight": state["transformer.wte.weight"]}, "src")
    assert "lm_head.weight" not in tied


def test_save_checks_before_writing_and_refuses_to_overwrite(tmp_path):
    weights = random_weights(MODEL)
    bad = {**weights, "transformer.wpe.weight": np.zeros((8, 32), np.float32)}
    with pytest.raises(UserError, match="wpe.weight has shape"):
        cw.save_hf(bad, MODEL, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    cw.save_hf(weights, MODEL, tmp_path / "out")
    with pytest.raises(UserError, match="already exists"):
        cw.save_hf(weights, MODEL, tmp_path / "out")
    cw.save_hf(random_weights(MODEL, seed=1), MODEL, tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    _, reread = cw.load_hf(tmp_path / "out")
    np.testing.assert_array_equal(reread["transformer.wte.weight"], random_weights(MODEL, 1)["transformer.wte.weight"])


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    import safetensors.numpy

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", fail)
    with pytest.raises(OSError):
        cw.save_hf(random_weights(MODEL), MODEL, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_reads_sharded_pytorch_model_bin(tmp_path):
    """transformers 4.x's sharded form: pytorch_model.bin.index.json naming the shard of every tensor."""
    hf = hf_model()
    state = hf.state_dict()
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    (tmp_path / "hf").mkdir()
    for shard, keys in shards.items():
        torch.save({k: state[k] for k in keys}, tmp_path / "hf" / shard)
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (tmp_path / "hf" / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (tmp_path / "hf" / "config.json").write_text(hf.config.to_json_string())
    _, weights = cw.load_hf(tmp_path / "hf", read_torch_file=read_state_dict_file)
    same = [np.array_equal(weights[k], v.numpy()) for k, v in state.items() if k != "lm_head.weight"]
    assert len(same) == 28 and all(same)
    (tmp_path / "hf" / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(UserError, match="names the shard pytorch_model-00002-of-00002.bin, which is missing"):
        cw.load_hf(tmp_path / "hf", read_torch_file=read_state_dict_file)
