"""gpt2_formats: the one detector of a source's form, its refusals, and the layering it keeps (gpt2_common and the
detector import no framework; each framework is imported only for its own form)."""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gpt2_formats
from gpt2_common import weights as cw
from gpt2_common.config import Config, ModelConfig, from_dict
from gpt2_common.errors import UserError
from gpt2_torch.checkpoint import write_weights as write_torch

ROOT = Path(__file__).resolve().parent.parent
MODEL = ModelConfig(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=100)


def random_weights(model: ModelConfig = MODEL, seed: int = 0) -> cw.Weights:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in cw.canonical_shapes(model).items()}


def test_detect_names_each_form(tmp_path):
    cw.save_hf(random_weights(), MODEL, tmp_path / "hf")
    assert gpt2_formats.detect(tmp_path / "hf") == "hf"
    write_torch(random_weights(), Config(model=MODEL), tmp_path / "run" / "checkpoints" / "step_00000010.pt")
    for path in ("run", "run/checkpoints", "run/checkpoints/step_00000010.pt"):
        assert gpt2_formats.detect(tmp_path / path) == "torch", path
    for part in ("state", "meta"):
        (tmp_path / "jrun" / "checkpoints" / "20" / part).mkdir(parents=True)
    for path in ("jrun", "jrun/checkpoints", "jrun/checkpoints/20"):
        assert gpt2_formats.detect(tmp_path / path) == "jax", path
    (tmp_path / "out").mkdir()
    torch.save({"model": {}, "model_args": {}}, tmp_path / "out" / "ckpt.pt")
    assert gpt2_formats.detect(tmp_path / "out") == gpt2_formats.detect(tmp_path / "out" / "ckpt.pt") == "nanogpt"
    torch.save({"transformer.wte.weight": torch.zeros(100, 32), "transformer.h.0.attn.c_attn.weight":
                torch.zeros(96, 32)}, tmp_path / "bare.pth")
    assert gpt2_formats.detect(tmp_path / "bare.pth") == "nanogpt"
    (tmp_path / "m.bin").write_bytes(np.array([20240326, 3], "<i4").tobytes())
    assert gpt2_formats.detect(tmp_path / "m.bin") == "llmc"


def test_detect_refuses_in_one_line_naming_what_it_found(tmp_path):
    def refused(path, match):
        with pytest.raises(UserError, match=match) as err:
            gpt2_formats.detect(tmp_path / path)
        assert "\n" not in str(err.value)
        return str(err.value)

    refused("nothing", "does not exist")
    (tmp_path / "empty").mkdir()
    line = refused("empty", r"is not a weights source this reads \(found: nothing\)")
    assert line.endswith(f"it reads {gpt2_formats.READS}")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    (tmp_path / "notes" / "sub").mkdir()
    refused("notes", r"found: a.txt, sub/\); it reads a JAX run")
    (tmp_path / "w.dat").write_bytes(b"\x01\x02\x03\x04\x05")
    refused("w.dat", r"file of unknown format \(5 bytes starting 01 02 03 04\); it reads .*llm.c model .bin")
    (tmp_path / "shard.bin").write_bytes(np.array([20240520, 1, 0], "<i4").tobytes())
    refused("shard.bin", "is an llm.c token shard .* not a model")
    torch.save({"weights": torch.zeros(3), "step": 4}, tmp_path / "other.pt")
    refused("other.pt", r"PyTorch file holding a dict of step, weights: not a gpt2_torch checkpoint")
    hf_layout = {"transformer.wte.weight": torch.zeros(100, 32), "transformer.h.0.attn.c_attn.weight":
                 torch.zeros(32, 96)}
    torch.save(hf_layout, tmp_path / "pytorch_model.bin")
    refused("pytorch_model.bin", "Hugging Face GPT-2 state dict .* without its config.json")
    (tmp_path / "mixed" / "checkpoints" / "3" / "state").mkdir(parents=True)
    (tmp_path / "mixed" / "checkpoints" / "3" / "meta").mkdir()
    (tmp_path / "mixed" / "checkpoints" / "step_00000003.pt").write_bytes(b"")
    refused("mixed", r"checkpoints of more than one form \(torch, jax\)")


def test_a_pickle_that_needs_more_than_tensors_is_refused_naming_what(tmp_path):
    """weights_only=True: a file that would run code (here a numpy scalar, a global) is not read, and the line
    says what is in the way."""
    torch.save({"model": {}, "model_args": {"n_layer": np.int64(2)}}, tmp_path / "ckpt.pt")
    with pytest.raises(UserError, match=r"holds more than tensors and plain values \(.*numpy.*\)"):
        gpt2_formats.read_canonical(tmp_path / "ckpt.pt")


def _imports_after(code: str) -> set[str]:
    probe = code + "\nimport sys; print(' '.join(m for m in ('torch', 'jax', 'flax', 'orbax') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True)
    return set(done.stdout.split())


def test_gpt2_common_and_the_detector_import_no_framework(tmp_path):
    cw.save_hf(random_weights(), MODEL, tmp_path / "hf")
    (tmp_path / "jax" / "checkpoints" / "1" / "state").mkdir(parents=True)
    (tmp_path / "jax" / "checkpoints" / "1" / "meta").mkdir()
    code = f"""
import gpt2_common.weights, gpt2_common.llmc, gpt2_common.nanogpt, gpt2_common.tokenizer, gpt2_common.faults
import gpt2_common.train_state, gpt2_formats, gpt2_formats.runs
assert gpt2_formats.detect({str(tmp_path / 'hf')!r}) == 'hf'
assert gpt2_formats.detect({str(tmp_path / 'jax')!r}) == 'jax'
gpt2_formats.check_framework({str(tmp_path / 'jax' / 'checkpoints')!r}, 'jax')
gpt2_formats.read_canonical({str(tmp_path / 'hf')!r})
"""
    assert _imports_after(code) == set()


def test_reading_one_framework_s_form_imports_only_that_framework(tmp_path):
    write_torch(random_weights(), Config(model=MODEL), tmp_path / "a.pt")
    assert _imports_after(f"import gpt2_formats; gpt2_formats.read_canonical({str(tmp_path / 'a.pt')!r})") == {"torch"}


def test_jax_checkpoint_and_weights_do_not_import_each_other():
    def imported(path: Path) -> set[str]:
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        return names

    assert "gpt2_jax.checkpoint" not in imported(ROOT / "gpt2_jax" / "weights.py")
    assert "gpt2_torch.checkpoint" not in imported(ROOT / "gpt2_torch" / "weights.py")
    frameworks = ("gpt2_jax", "gpt2_torch", "gpt2_formats", "torch", "jax", "flax", "optax", "orbax", "chex")
    for module in sorted((ROOT / "gpt2_common").glob("*.py")):  # docs/architecture.md's first rule
        assert not {m for m in imported(module) if m.split(".")[0] in frameworks}, module
        text = module.read_text()
        # as the rule's grep reads it, comments and docstrings included, and no import by name at run time
        assert not re.search(r"(import|from) +(torch|jax|flax)", text), module
        assert "import_module" not in text and "__import__" not in text, module


def test_check_framework_keeps_a_run_directory_to_one_trainer(tmp_path):
    (tmp_path / "checkpoints" / "4").mkdir(parents=True)
    gpt2_formats.check_framework(tmp_path / "checkpoints", "jax")
    with pytest.raises(UserError, match=r"holds JAX checkpoints \(4\), which this trainer cannot resume"):
        gpt2_formats.check_framework(tmp_path / "checkpoints", "torch")
    (tmp_path / "t" / "step_00000002.pt").parent.mkdir()
    (tmp_path / "t" / "step_00000002.pt").write_bytes(b"")
    with pytest.raises(UserError, match=r"holds PyTorch checkpoints \(step_00000002.pt\)"):
        gpt2_formats.check_framework(tmp_path / "t", "jax")


# --- config and activation ------------------------------------------------------------------------------------------

def test_activation_is_a_checked_config_key():
    assert from_dict({"model": {"activation": "gelu"}}).model.activation == "gelu"
    assert ModelConfig().activation == "gelu_tanh"
    with pytest.raises(UserError, match="model.activation' is 'relu'; choose one of gelu_tanh, gelu"):
        from_dict({"model": {"activation": "relu"}})


def test_activation_travels_through_config_json():
    for ours, theirs in (("gelu_tanh", "gelu_new"), ("gelu", "gelu")):
        model = ModelConfig(n_layer=1, n_head=1, n_embd=8, block_size=4, vocab_size=10, activation=ours)
        assert cw.hf_config(model)["activation_function"] == theirs
        assert cw.model_config_from_hf(cw.hf_config(model), "x") == model
    tanh = cw.model_config_from_hf({**cw.hf_config(MODEL), "activation_function": "gelu_pytorch_tanh"}, "x")
    assert tanh.activation == "gelu_tanh"


def test_init_from_weights_of_the_other_activation_names_the_key_to_set(tmp_path):
    exact = ModelConfig(**{**MODEL.__dict__, "activation": "gelu"})
    cw.save_hf(random_weights(), exact, tmp_path / "hf")
    with pytest.raises(UserError, match=r"set model.activation=gelu \(e.g. with --set\)"):
        gpt2_formats.init_weights(tmp_path / "hf", MODEL)
    assert gpt2_formats.init_weights(tmp_path / "hf", exact).keys() == random_weights().keys()


# --- files that claim more than they hold ---------------------------------------------------------------------------

def test_a_config_json_claiming_ten_million_layers_is_refused_before_allocating(tmp_path):
    """convert.py on a config.json with n_layer = 10**7: the config is checked against the tensors in the file,
    before anything of the claimed size exists (tracemalloc's peak stays at the file's own size)."""
    import tracemalloc

    cw.save_hf(random_weights(), MODEL, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "n_layer": 10**7}))
    tracemalloc.start()
    try:
        with pytest.raises(UserError, match=r"lacks 119999976 of the 120000004 tensors .* n_layer=10000000"):
            gpt2_formats.read_canonical(tmp_path / "hf")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20, f"{peak / 2**20:.0f} MiB allocated for a 0.1 MB model"


def test_nanogpt_s_padded_gpt2_vocabulary_reads_as_gpt2_s(tmp_path, capsys):
    """nanoGPT pads GPT-2's 50257 tokens to 50304 rows; read here they are GPT-2's vocabulary again, padded and masked
    as this project pads it, so the 50257 tokens' logits are nanoGPT's."""
    model = ModelConfig(n_layer=1, n_head=2, n_embd=8, block_size=4, vocab_size=50257, activation="gelu")
    weights = random_weights(model)
    rows = np.random.default_rng(1).standard_normal((50304 - 50257, 8)).astype(np.float32)
    state = {k: torch.from_numpy(v.T.copy() if cw.is_linear_weight(k) else v) for k, v in weights.items()}
    state["transformer.wte.weight"] = torch.from_numpy(np.concatenate([weights["transformer.wte.weight"], rows]))
    state["lm_head.weight"] = state["transformer.wte.weight"]
    args = dict(n_layer=1, n_head=2, n_embd=8, block_size=4, bias=True, vocab_size=50304, dropout=0.0)
    torch.save({"model": state, "model_args": args, "iter_num": 3}, tmp_path / "ckpt.pt")
    config, read = gpt2_formats.read_canonical(tmp_path / "ckpt.pt")
    assert config.model == model
    for name, value in weights.items():
        np.testing.assert_array_equal(read[name], value, err_msg=name)
    assert "50304-row embedding is GPT-2's 50257 tokens padded" in capsys.readouterr().err
