"""llm.c model files: a file written here by hand in the order llm.c's train_gpt2.py documents (write_model,
write_tensors) is read, converted through every form and written back byte for byte, in fp32 and bf16."""

from pathlib import Path

import numpy as np
import pytest
import torch

import gpt2_formats
from gpt2_common import weights as cw
from gpt2_common.config import Config, ModelConfig
from gpt2_common.errors import UserError
from script_module import load_script

MODEL = ModelConfig(n_layer=2, n_head=3, n_embd=24, block_size=11, vocab_size=130)  # pads to 256 rows in llm.c
# write_tensors' order (llm.c, train_gpt2.py): wte, wpe, then each of these over all layers, then ln_f
PER_LAYER = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
             "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
             "mlp.c_proj.weight", "mlp.c_proj.bias")


convert = load_script("convert")


def torch_named_parameters(seed: int = 0) -> dict[str, torch.Tensor]:
    """What llm.c's write_model gets from model.named_parameters(): nn.Linear weights [out, in]."""
    rng = np.random.default_rng(seed)
    c, params = MODEL.n_embd, {}
    params["transformer.wte.weight"] = rng.standard_normal((MODEL.vocab_size, c))
    params["transformer.wpe.weight"] = rng.standard_normal((MODEL.block_size, c))
    shapes = {"ln_1.weight": (c,), "ln_1.bias": (c,), "attn.c_attn.weight": (3 * c, c), "attn.c_attn.bias": (3 * c,),
              "attn.c_proj.weight": (c, c), "attn.c_proj.bias": (c,), "ln_2.weight": (c,), "ln_2.bias": (c,),
              "mlp.c_fc.weight": (4 * c, c), "mlp.c_fc.bias": (4 * c,), "mlp.c_proj.weight": (c, 4 * c),
              "mlp.c_proj.bias": (c,)}
    for i in range(MODEL.n_layer):
        params.update({f"transformer.h.{i}.{k}": rng.standard_normal(s) for k, s in shapes.items()})
    params["transformer.ln_f.weight"] = rng.standard_normal(c)
    params["transformer.ln_f.bias"] = rng.standard_normal(c)
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in params.items()}


def write_llmc_by_hand(path: Path, params: dict[str, torch.Tensor], dtype: str) -> None:
    """llm.c's write_model, as its train_gpt2.py documents it: the header, the vocabulary padded to a multiple of
    128 with zero rows, then the tensors in write_tensors' order, all in one dtype (bf16 by torch's rounding)."""
    header = torch.zeros(256, dtype=torch.int32)
    wte = params["transformer.wte.weight"]
    padded_rows = -(-wte.shape[0] // 128) * 128
    header[:8] = torch.tensor([20240326, {"float32": 3, "bfloat16": 5}[dtype], MODEL.block_size, MODEL.vocab_size,
                               MODEL.n_layer, MODEL.n_head, MODEL.n_embd, padded_rows])
    params = {**params, "transformer.wte.weight": torch.cat([wte, torch.zeros(padded_rows - wte.shape[0],
                                                                              wte.shape[1])])}
    order = ["transformer.wte.weight", "transformer.wpe.weight"]
    order += [f"transformer.h.{i}.{kind}" for kind in PER_LAYER for i in range(MODEL.n_layer)]
    order += ["transformer.ln_f.weight", "transformer.ln_f.bias"]
    with open(path, "wb") as f:
        f.write(header.numpy().tobytes())
        for name in order:
            t = params[name].to(torch.float32 if dtype == "float32" else torch.bfloat16)
            f.write((t if dtype == "float32" else t.view(torch.int16)).numpy().tobytes())


@pytest.mark.parametrize("dtype,flag", [("float32", "fp32"), ("bfloat16", "bf16")])
def test_an_llmc_file_converts_in_and_out_byte_identical(tmp_path, dtype, flag):
    params = torch_named_parameters()
    write_llmc_by_hand(tmp_path / "model.bin", params, dtype)
    assert gpt2_formats.detect(tmp_path / "model.bin") == "llmc"
    config, weights = gpt2_formats.read_canonical(tmp_path / "model.bin")
    assert config.model == ModelConfig(**{**MODEL.__dict__, "activation": "gelu_tanh"})
    for name, value in params.items():  # canonical: Conv1D [in, out], the vocabulary unpadded
        value = value.to(torch.float32 if dtype == "float32" else torch.bfloat16).float().numpy()
        np.testing.assert_array_equal(weights[name], value.T if cw.is_linear_weight(name) else value, err_msg=name)

    # straight back, and the long way round through every other form
    convert.main([str(tmp_path / "model.bin"), str(tmp_path / "back.bin"), "--to", "llmc", "--dtype", flag])
    assert (tmp_path / "back.bin").read_bytes() == (tmp_path / "model.bin").read_bytes()
    convert.main([str(tmp_path / "model.bin"), str(tmp_path / "hf"), "--to", "hf"])
    convert.main([str(tmp_path / "hf"), str(tmp_path / "jax"), "--to", "jax"])
    convert.main([str(tmp_path / "jax"), str(tmp_path / "t.pt"), "--to", "torch"])
    convert.main([str(tmp_path / "t.pt"), str(tmp_path / "again.bin"), "--to", "llmc", "--dtype", flag])
    assert (tmp_path / "again.bin").read_bytes() == (tmp_path / "model.bin").read_bytes()


def test_a_header_that_claims_more_than_the_file_holds_is_refused_at_once(tmp_path):
    write_llmc_by_hand(tmp_path / "model.bin", torch_named_parameters(), "float32")
    data = bytearray((tmp_path / "model.bin").read_bytes())
    data[16:20] = np.array([10**7], "<i4").tobytes()  # n_layer
    (tmp_path / "huge.bin").write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"holds \d+ bytes, but the GPT-2 its header describes \(10000000 layers"):
        gpt2_formats.read_canonical(tmp_path / "huge.bin")
    (tmp_path / "short.bin").write_bytes((tmp_path / "model.bin").read_bytes()[:-4])
    with pytest.raises(UserError, match="the file is damaged or cut short"):
        gpt2_formats.read_canonical(tmp_path / "short.bin")
    data[4:8] = np.array([1], "<i4").tobytes()
    (tmp_path / "old.bin").write_bytes(bytes(data))
    with pytest.raises(UserError, match="version 1; this reads versions 3 \\(fp32\\) and 5 \\(bf16\\)"):
        gpt2_formats.read_canonical(tmp_path / "old.bin")


def test_dtype_is_for_llmc_only(tmp_path):
    write_llmc_by_hand(tmp_path / "model.bin", torch_named_parameters(), "float32")
    with pytest.raises(UserError, match="--dtype bf16 is for --to llmc"):
        convert.main([str(tmp_path / "model.bin"), str(tmp_path / "hf"), "--to", "hf", "--dtype", "bf16"])
    assert not (tmp_path / "hf").exists()


def test_a_gpt2_vocabulary_pads_to_llmc_s_50304(tmp_path):
    model = ModelConfig(n_layer=1, n_head=1, n_embd=8, block_size=4, vocab_size=50257)
    rng = np.random.default_rng(0)
    weights = {k: rng.standard_normal(s).astype(np.float32) for k, s in cw.canonical_shapes(model).items()}
    gpt2_formats.write(weights, Config(model=model), tmp_path / "g.bin", "llmc")
    header = np.fromfile(tmp_path / "g.bin", "<i4", count=8)
    assert header.tolist() == [20240326, 3, 4, 50257, 1, 1, 8, 50304]
