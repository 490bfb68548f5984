import argparse

import pytest

from gpt2_common.cli import add_config_arguments
from gpt2_common.config import CONFIG_DIR, check_divides, dumps_toml, load_config, loads_toml
from gpt2_common.errors import UserError

PRESETS = ["tiny", "shakespeare", "small", "medium", "large", "xl", "alpaca"]


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_and_round_trip_through_toml(name):
    config = load_config(name)
    assert config.name == name
    assert loads_toml(dumps_toml(config)) == config


def test_small_is_gpt2_124m_with_its_recipe():
    from gpt2_common.flops import num_params

    c = load_config("small")
    assert (c.model.n_layer, c.model.n_head, c.model.n_embd, c.model.block_size) == (12, 12, 768, 1024)
    assert c.model.padded_vocab_size == 50304 and c.model.vocab_size == 50257
    assert c.train.batch_size * c.model.block_size == 524288  # ~0.5M tokens a step
    assert (c.train.lr, c.train.min_lr, c.train.weight_decay, c.train.grad_clip) == (6e-4, 6e-5, 0.1, 1.0)
    assert 124e6 < num_params(c.model) < 125e6


@pytest.mark.parametrize("name,params", [("medium", 350e6), ("large", 774e6), ("xl", 1558e6)])
def test_larger_presets_have_gpt2_sizes(name, params):
    from gpt2_common.flops import num_params

    assert abs(num_params(load_config(name).model) - params) / params < 0.03


def test_overrides_are_typed_and_applied():
    c = load_config("tiny", ["train.lr=3e-4", "model.n_layer=6", "train.precision=bf16", "logging.wandb=true"])
    assert c.train.lr == 3e-4 and c.model.n_layer == 6 and c.train.precision == "bf16" and c.logging.wandb is True


def test_int_accepted_for_float():
    assert load_config("tiny", ["train.lr=1"]).train.lr == 1.0


def test_yaml_config(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model:\n  n_layer: 3\n  n_head: 2\n  n_embd: 32\ntrain:\n  lr: 0.001\n  min_lr: 0.0001\n")
    c = load_config(str(path))
    assert c.name == "mine" and c.model.n_layer == 3 and c.train.lr == 1e-3


@pytest.mark.parametrize("override,words", [
    (["train.lerning_rate=1"], "did you mean 'train.min_lr'"),
    (["train.lrr=1"], "did you mean 'train.lr'"),
    (["modle.n_layer=2"], "did you mean 'model.n_layer'"),
    (["model.n_layer=two"], "must be an integer"),
    (["model.n_layer=2.5"], "must be an integer"),
    (["train.compile=1"], "must be true or false"),
    (["model.n_embd=100", "model.n_head=3"], "not divisible by model.n_head=3"),
    (["train.batch_size=10", "train.micro_batch_size=4"], "not a multiple of train.micro_batch_size"),
    (["train.precision=fp8"], "choose one of fp32, bf16, fp16"),
    (["train.min_lr=1.0"], "above train.lr"),
    (["mesh.fsdp=-1"], "one of them may be -1"),
    (["nonsense"], "must look like section.key=value"),
])
def test_config_errors_say_what_to_change(override, words):
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace(".", r"\.")):
        load_config("tiny", override)


def test_unknown_preset_and_missing_file():
    with pytest.raises(UserError, match="did you mean 'small'"):
        load_config("smal")
    with pytest.raises(UserError, match="does not exist"):
        load_config("/no/such/config.toml")


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[model]\nn_layers = 2\n")
    with pytest.raises(UserError, match="did you mean 'model.n_layer'"):
        load_config(str(path))


def test_batch_must_divide_over_devices():
    check_divides(16, 8)
    with pytest.raises(UserError, match="does not divide over 8"):
        check_divides(12, 8)


def test_every_preset_file_is_a_toml_preset_listed_in_the_readme_and_the_help():
    assert {p.stem for p in CONFIG_DIR.glob("*.toml")} == set(PRESETS)
    readme = (CONFIG_DIR.parent / "README.md").read_text()
    table = readme.split("### Configs", 1)[1].split("\n\n", 2)[1]
    for name in PRESETS:
        assert f"`{name}`" in table, f"preset {name} is missing from the README's presets table"
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    help_text = " ".join(parser.format_help().split())
    assert all(name in help_text for name in PRESETS), help_text
