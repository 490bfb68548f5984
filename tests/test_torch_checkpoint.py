"""Checkpoint files of the PyTorch trainer: naming, atomic writes, keeping the last N, RNG state, and
load_checkpoint_model for the converter and the sampler."""

import random

import numpy as np
import pytest
import torch

from gpt2_common.config import Config, ModelConfig, dumps_toml
from gpt2_common.errors import UserError
from gpt2_torch.checkpoint import (capture_rng_state, checkpoint_path, latest_checkpoint, list_checkpoints,
                                   load_checkpoint, load_checkpoint_model, restore_rng_state, save_checkpoint)
from gpt2_torch.model import GPT

CONFIG = Config(name="ckpt", model=ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=8, vocab_size=100))


def save_model(run_dir, step, keep=10):
    torch.manual_seed(step)
    model = GPT(CONFIG.model)
    save_checkpoint({"step": step, "model": model.state_dict(), "config": dumps_toml(CONFIG)},
                    checkpoint_path(run_dir / "checkpoints", step), keep)
    return model


def test_keeps_the_newest_checkpoints_and_leaves_no_temporary_files(tmp_path):
    for step in (5, 10, 100, 1000):
        save_model(tmp_path, step, keep=2)
    directory = tmp_path / "checkpoints"
    assert sorted(p.name for p in directory.iterdir()) == ["step_00000100.pt", "step_00000100.pt.sha256",
                                                           "step_00001000.pt", "step_00001000.pt.sha256"]
    assert latest_checkpoint(directory).name == "step_00001000.pt"
    assert list_checkpoints(tmp_path / "missing") == [] and latest_checkpoint(tmp_path / "missing") is None


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path):
    save_model(tmp_path, 1)
    with pytest.raises(Exception):
        save_checkpoint({"unpicklable": lambda: 0}, checkpoint_path(tmp_path / "checkpoints", 2), keep=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001.pt",
                                                                            "step_00000001.pt.sha256"]
    assert load_checkpoint(tmp_path / "checkpoints" / "step_00000001.pt")["step"] == 1


@pytest.mark.parametrize("where", ["run_dir", "checkpoints", "file"])
def test_load_checkpoint_model_from_a_run_dir_checkpoints_dir_or_file(tmp_path, where):
    save_model(tmp_path, 1)
    newest = save_model(tmp_path, 2)
    path = {"run_dir": tmp_path, "checkpoints": tmp_path / "checkpoints",
            "file": tmp_path / "checkpoints" / "step_00000002.pt"}[where]
    config, state = load_checkpoint_model(path)
    assert config == CONFIG
    model = GPT(config.model)
    model.load_state_dict(state)
    for name, tensor in newest.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert model.lm_head.weight is model.transformer.wte.weight


def test_unusable_checkpoints_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint_model(tmp_path / "nowhere")
    with pytest.raises(UserError, match="no step_XXXXXXXX.pt checkpoints"):
        load_checkpoint_model(tmp_path)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load_checkpoint_model(tmp_path / "bad.pt")
    torch.save({"model": {}}, tmp_path / "other.pt")  # e.g. a nanoGPT ckpt.pt
    with pytest.raises(UserError, match="not a gpt2_torch checkpoint"):
        load_checkpoint_model(tmp_path / "other.pt")


def test_rng_states_survive_a_checkpoint(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3), np.random.standard_normal()  # a cached gaussian too
    save_checkpoint({"rng": [capture_rng_state()]}, tmp_path / "step_00000001.pt", keep=1)
    expected = torch.rand(3), np.random.standard_normal(3), random.random()
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    restore_rng_state(load_checkpoint(tmp_path / "step_00000001.pt")["rng"][0])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.standard_normal(3), expected[1]) and random.random() == expected[2]
