"""scripts/convert.py: every direction between JAX, PyTorch and Hugging Face, and bad input refused in one line with
nothing written."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gpt2_formats
from gpt2_formats import init_weights
from gpt2_common import weights as cw
from gpt2_common.config import Config, ModelConfig
from gpt2_common.errors import UserError
from gpt2_jax import weights as jw
from gpt2_jax.checkpoint import load_checkpoint_params
from gpt2_torch import weights as tw
from gpt2_torch.checkpoint import load_checkpoint_model
from gpt2_torch.model import GPT as TorchGPT
from script_module import load_script

def jax_init_weights(path, model):
    """--init-from as the JAX trainer reads it: any form, through gpt2_formats, as params."""
    return jw.from_canonical(init_weights(path, model), model)


def torch_init_weights(path, model):
    """--init-from as the PyTorch trainer reads it: any form, through gpt2_formats, as a state dict."""
    return tw.from_canonical(init_weights(path, model), model)


ROOT = Path(__file__).resolve().parent.parent
MODEL = ModelConfig(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=100)


convert = load_script("convert")


def random_weights(seed: int = 0) -> cw.Weights:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in cw.canonical_shapes(MODEL).items()}


def assert_same(a: cw.Weights, b: cw.Weights) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_round_trip_through_every_form_is_exact(tmp_path):
    start = random_weights()
    cw.save_hf(start, MODEL, tmp_path / "hf")
    convert.main([str(tmp_path / "hf"), str(tmp_path / "a.pt"), "--to", "torch"])
    convert.main([str(tmp_path / "a.pt"), str(tmp_path / "jax"), "--to", "jax"])
    convert.main([str(tmp_path / "jax"), str(tmp_path / "b.pt"), "--to", "torch"])
    convert.main([str(tmp_path / "b.pt"), str(tmp_path / "jax2"), "--to", "jax"])
    convert.main([str(tmp_path / "jax2"), str(tmp_path / "hf2"), "--to", "hf"])
    model, end = cw.load_hf(tmp_path / "hf2")
    assert model == ModelConfig(**{**MODEL.__dict__, "dropout": 0.0})
    assert_same(end, start)

    # what the trainers' loaders and --init-from read
    config, state = load_checkpoint_model(tmp_path / "b.pt")
    TorchGPT(config.model).load_state_dict(state)  # strict
    config, params = load_checkpoint_params(tmp_path / "jax")
    assert config.model == model and params["wte"]["embedding"].shape == (128, 32)
    assert_same(jw.to_canonical(jax_init_weights(tmp_path / "b.pt", MODEL), MODEL), start)
    assert_same(tw.to_canonical(torch_init_weights(tmp_path / "jax", MODEL), MODEL), start)


def test_a_trainer_run_directory_is_a_source(tmp_path):
    """A run directory's checkpoints/ (newest step) is found from the run directory itself."""
    start = random_weights()
    cw.save_hf(start, MODEL, tmp_path / "hf")
    convert.main([str(tmp_path / "hf"), str(tmp_path / "run" / "checkpoints" / "step_00000007.pt"), "--to", "torch"])
    assert gpt2_formats.detect(tmp_path / "run") == "torch"
    convert.main([str(tmp_path / "run"), str(tmp_path / "out"), "--to", "hf"])
    assert_same(cw.load_hf(tmp_path / "out")[1], start)


# --- bad input ------------------------------------------------------------------------------------------------------

def refused(tmp_path, argv, match):
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(UserError, match=match) as err:
        convert.main(argv)
    assert "\n" not in str(err.value)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, "something was written"


def test_a_directory_with_no_config(tmp_path):
    cw.save_hf(random_weights(), MODEL, tmp_path / "hf")
    (tmp_path / "hf" / "config.json").unlink()
    refused(tmp_path, [str(tmp_path / "hf"), str(tmp_path / "out"), "--to", "jax"],
            "has model.safetensors but no config.json")


def test_an_unknown_format(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\x00" * 16)
    refused(tmp_path, [str(tmp_path / "weights.bin"), str(tmp_path / "out.pt"), "--to", "torch"],
            "file of unknown format")
    (tmp_path / "broken.pt").write_bytes(b"PK\x03\x04 but no zip after it")
    refused(tmp_path, [str(tmp_path / "broken.pt"), str(tmp_path / "out"), "--to", "hf"],
            "cannot read .* as a PyTorch file")


def test_a_checkpoint_whose_tensors_do_not_match_its_config(tmp_path):
    """A torch checkpoint saved with a config of another shape: caught before anything is written."""
    from gpt2_torch.checkpoint import save_checkpoint
    from gpt2_common.config import dumps_toml

    state = tw.from_canonical(random_weights(), MODEL)
    other = Config(model=ModelConfig(**{**MODEL.__dict__, "n_embd": 64}))
    save_checkpoint({"model": state, "config": dumps_toml(other)}, tmp_path / "x.pt", keep=1)
    refused(tmp_path, [str(tmp_path / "x.pt"), str(tmp_path / "out"), "--to", "jax"],
            r"wte.weight has shape \(100, 32\) but a GPT-2 with n_layer=2, n_embd=64")


def test_a_vocabulary_that_does_not_fit(tmp_path):
    cw.save_hf(random_weights(), MODEL, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "vocab_size": 64}))
    refused(tmp_path, [str(tmp_path / "hf"), str(tmp_path / "out.pt"), "--to", "torch"],
            r"wte.weight has shape \(100, 32\) .* vocab_size=64 needs \(64, 32\)")


def test_init_from_weights_of_another_shape(tmp_path):
    cw.save_hf(random_weights(), MODEL, tmp_path / "hf")
    bigger = ModelConfig(**{**MODEL.__dict__, "n_layer": 4})
    with pytest.raises(UserError, match=r"--init-from .* is a different GPT-2 than the config: set model.n_layer=2"):
        torch_init_weights(tmp_path / "hf", bigger)
    smaller_vocab = ModelConfig(**{**MODEL.__dict__, "vocab_size": 50})
    with pytest.raises(UserError, match=r"100-token vocabulary does not fit the config's embedding of 64 rows"):
        jax_init_weights(tmp_path / "hf", smaller_vocab)


def test_an_existing_destination_is_left_alone(tmp_path):
    cw.save_hf(random_weights(), MODEL, tmp_path / "hf")
    (tmp_path / "out.pt").write_text("mine")
    refused(tmp_path, [str(tmp_path / "hf"), str(tmp_path / "out.pt"), "--to", "torch"], "already exists")
    assert (tmp_path / "out.pt").read_text() == "mine"


def test_a_destination_under_a_file_or_where_no_file_can_be_made(tmp_path):
    """Issue 32: a destination under a file raised FileExistsError, one under /proc FileNotFoundError (tracebacks);
    both are one line now, before the source is read."""
    cw.save_hf(random_weights(), MODEL, tmp_path / "hf")
    (tmp_path / "notes.md").write_text("mine")
    refused(tmp_path, [str(tmp_path / "hf"), str(tmp_path / "notes.md" / "out"), "--to", "hf"],
            f"^cannot write '{tmp_path / 'notes.md' / 'out'}': '{tmp_path / 'notes.md'}' is a file, not a folder; "
            "choose another destination$")
    refused(tmp_path, [str(tmp_path / "hf"), "/proc/gpt2_hf", "--to", "hf"],
            "^cannot write '/proc/gpt2_hf': '/proc' does not take new files; choose another destination$")


# convert.py --to hf, killed by SIGKILL while safetensors writes the weights
KILLED_MID_WRITE = """
import os, runpy, sys
import safetensors.numpy
def half_then_killed(tensors, path, metadata=None):
    open(path, "wb").write(b"half")
    os.kill(os.getpid(), 9)
safetensors.numpy.save_file = half_then_killed
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
# any writer that goes through gpt2_common.files.partial, killed mid-write
KILLED_IN_PARTIAL = """
import os, sys
from gpt2_common.files import partial
tmp = partial(sys.argv[1], directory=sys.argv[2] == "dir").__enter__()
(tmp / "half" if tmp.is_dir() else tmp).write_bytes(b"half a file")
os.kill(os.getpid(), 9)
"""


@pytest.mark.parametrize("to, name", [("hf", "out_hf"), ("jax", "out_jax"), ("torch", "out.pt"), ("llmc", "out.bin")])
def test_a_conversion_killed_mid_write_leaves_what_the_next_one_removes(tmp_path, capsys, to, name):
    """Issue 32: a conversion killed mid-write left a hidden temporary folder that no later run removed. The next
    conversion to the same destination now removes it (its writer's lock died with it), and never one that another
    process is still writing."""
    from gpt2_common.files import partial

    cw.save_hf(random_weights(), MODEL, tmp_path / "hf")
    dst = tmp_path / name
    if to == "hf":  # the issue's own case, through the script
        killed = [KILLED_MID_WRITE, str(ROOT / "scripts" / "convert.py"), str(tmp_path / "hf"), str(dst), "--to", to]
    else:
        killed = [KILLED_IN_PARTIAL, str(dst), "file" if "." in name else "dir"]
    with partial(dst, directory="." not in name) as busy:  # another writer of it, at work throughout
        subprocess.run([sys.executable, "-c", *killed], check=False, capture_output=True)
        [left] = [p for p in tmp_path.iterdir() if p.name.startswith(f".{name}.") and p != busy]
        assert left.name.endswith(".partial") and busy.exists()
        capsys.readouterr()
        convert.main([str(tmp_path / "hf"), str(dst), "--to", to])
        assert f"warning: removing {left}, left by a write of {dst} that did not finish" in capsys.readouterr().err
        assert not left.exists() and busy.exists() and dst.exists()
    written = [name, f"{name}.sha256"] if to == "torch" else [name]  # a .pt carries its checksum file
    assert sorted(p.name for p in tmp_path.iterdir() if p != busy) == sorted(["hf", *written])


def test_a_nanogpt_folder_killed_mid_write_does_not_block_the_same_command(tmp_path, monkeypatch, capsys):
    """--to nanogpt into a folder (nanoGPT's out_dir, holding ckpt.pt): the folder itself is written under a partial
    beside it. Before, the folder was made first and only ckpt.pt went through a partial inside it, so a kill mid-write
    left a folder that the same command then refused as "already exists". Here torch.save is stopped half way, and
    the clean-up that a SIGKILL would skip is skipped."""
    from gpt2_common import files

    class Killed(BaseException):
        pass

    def half_then_killed(obj, f, *args, **kwargs):
        f.write(b"half")
        raise Killed

    cw.save_hf(random_weights(), MODEL, tmp_path / "hf")
    command = [str(tmp_path / "hf"), str(tmp_path / "nanogpt_out"), "--to", "nanogpt"]
    with monkeypatch.context() as kill:
        kill.setattr(files, "_remove", lambda path: None)
        kill.setattr(torch, "save", half_then_killed)
        with pytest.raises(Killed):
            convert.main(command)
    [left] = [p for p in tmp_path.iterdir() if p.name != "hf"]
    capsys.readouterr()
    convert.main(command)  # the same command again (it said "'nanogpt_out/ckpt.pt' already exists")
    assert left.name.startswith(".nanogpt_out.") and left.name.endswith(".partial")
    assert f"warning: removing {left}, left by a write of {tmp_path / 'nanogpt_out'}" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "nanogpt_out"]
    assert [p.name for p in (tmp_path / "nanogpt_out").iterdir()] == ["ckpt.pt"]
    assert_same(gpt2_formats.read_canonical(tmp_path / "nanogpt_out")[1], cw.load_hf(tmp_path / "hf")[1])


def test_a_torch_destination_must_be_a_pt_file(tmp_path):
    cw.save_hf(random_weights(), MODEL, tmp_path / "hf")
    refused(tmp_path, [str(tmp_path / "hf"), str(tmp_path / "out"), "--to", "torch"], r"name the destination like")


def test_the_command_line_prints_one_error_line_and_exits_2(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert.py"), str(tmp_path / "missing"),
                             str(tmp_path / "out"), "--to", "hf"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: '{tmp_path / 'missing'}' does not exist"]
    assert not (tmp_path / "out").exists()


def test_torch_state_dicts_round_trip_through_torch_save(tmp_path):
    """The .pt written is read back with weights_only=True (no code runs at load) by the trainer's loader."""
    cw.save_hf(random_weights(), MODEL, tmp_path / "hf")
    convert.main([str(tmp_path / "hf"), str(tmp_path / "x.pt"), "--to", "torch"])
    raw = torch.load(tmp_path / "x.pt", weights_only=True)
    assert set(raw) == {"format", "model", "config"}


def test_step_is_for_run_conversions(tmp_path):
    cw.save_hf(random_weights(), MODEL, tmp_path / "hf")
    refused(tmp_path, [str(tmp_path / "hf"), str(tmp_path / "out"), "--to", "hf", "--step", "3"],
            r"^--step is for --to jax-run\|torch-run; to convert the weights of one checkpoint, give its step folder "
            r"or \.pt file as the source$")
