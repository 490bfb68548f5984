"""Input that used to end in a traceback, or to be accepted though it cannot be right (issue 19, items 6 and 7): each
is now one line "error: ..." and exit status 2, or a warning and a skipped line where skipping loses nothing."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from gpt2_common.config import load_config
from gpt2_common.data import write_shard
from gpt2_common.errors import UserError, run_cli
from gpt2_common.evaluation import read_hellaswag
from gpt2_common.metrics import read_metrics, trim_metrics
from script_module import load_script

REPO = Path(__file__).resolve().parent.parent

CONFIG = """name = "hostile"
[model]
n_layer = 1
n_head = 2
n_embd = 32
block_size = 16
vocab_size = 100
[train]
batch_size = 4
micro_batch_size = 4
max_steps = 1
warmup_steps = 0
eval_interval = 0
eval_steps = 1
precision = "fp32"
[data]
train = "{train}"
val = "{val}"
"""


@pytest.fixture
def config_file(tmp_path):
    rng = np.random.default_rng(0)
    write_shard(tmp_path / "train.bin", rng.integers(0, 100, 2000))
    write_shard(tmp_path / "val.bin", rng.integers(0, 100, 500))
    path = tmp_path / "c.toml"
    path.write_text(CONFIG.format(train=tmp_path / "train.bin", val=tmp_path / "val.bin"))
    return path


def one_line(capsys, main) -> str:
    """What run_cli prints for `main`: exactly one line on stderr, exit status 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: ")
    return err[len("error: "):].rstrip("\n")


SETTINGS = [  # --set value -> the line (the valid range in it)
    ("train.seed=-1", "train.seed=-1 is out of range; it must be in [0, 4294967295]"),
    ("train.seed=4294967296", "train.seed=4294967296 is out of range; it must be in [0, 4294967295]"),
    ("train.lr=-0.001", "train.lr=-0.001 is out of range; it must be in [0, inf)"),
    ("train.lr=nan", "train.lr=nan is out of range; it must be in [0, inf)"),
    ("train.min_lr=-1e-5", "train.min_lr=-1e-05 is out of range; it must be in [0, inf)"),
    ("train.beta1=1", "train.beta1=1.0 is out of range; it must be in [0, 1)"),
    ("train.beta2=-0.1", "train.beta2=-0.1 is out of range; it must be in [0, 1)"),
    ("train.eps=0", "train.eps=0.0 is out of range; it must be in (0, inf)"),
    ("train.grad_clip=-1", "train.grad_clip=-1.0 is out of range; it must be in [0, inf)"),
    ("train.weight_decay=-0.1", "train.weight_decay=-0.1 is out of range; it must be in [0, inf)"),
    # integers that would wrap around in int32 where they are used (issue 32): TOML reads any size
    ("train.max_steps=99999999999999999999999",
     "train.max_steps=99999999999999999999999 is out of range; it must be in [1, 2147483647]"),
    ("train.eval_interval=2147483648", "train.eval_interval=2147483648 is out of range; it must be in [0, 2147483647]"),
    ("model.vocab_size=4294967296", "model.vocab_size=4294967296 is out of range; it must be in [1, 2147483647]"),
    ("mesh.data=9223372036854775808", "mesh.data=9223372036854775808 is out of range; it must be in [-1, 2147483647]"),
]


@pytest.mark.parametrize("setting, message", SETTINGS, ids=[s for s, _ in SETTINGS])
def test_values_that_cannot_be_right_are_refused(config_file, tmp_path, capsys, setting, message):
    from gpt2_torch.train import main

    argv = ["--config", str(config_file), "--run-dir", str(tmp_path / "run"), "--set", setting]
    assert one_line(capsys, lambda: main(argv)) == message
    assert not (tmp_path / "run").exists()


def test_the_edges_of_the_ranges_are_accepted(config_file):
    config = load_config(str(config_file), ["train.seed=0", "train.lr=0", "train.min_lr=0", "train.beta1=0",
                                            "train.beta2=0.999999", "train.eps=1e-30", "train.grad_clip=0",
                                            "train.weight_decay=0"])
    assert config.train.lr == 0 and config.train.beta2 == 0.999999
    assert load_config(str(config_file), [f"train.seed={2**32 - 1}"]).train.seed == 2**32 - 1
    assert load_config(str(config_file), [f"train.max_steps={2**31 - 1}"]).train.max_steps == 2**31 - 1


def test_a_config_file_that_is_not_utf8(config_file, tmp_path, capsys):
    from gpt2_torch.train import main

    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(config_file.read_bytes().replace(b'name = "hostile"', 'name = "café"'.encode("latin-1")))
    argv = ["--config", str(latin1), "--run-dir", str(tmp_path / "run")]
    assert one_line(capsys, lambda: main(argv)) == \
        f"config '{latin1}' is not UTF-8 text (byte 11 is 0xe9); save it as UTF-8"


def test_a_shard_with_a_negative_token_id(config_file, tmp_path, capsys):
    """An int64 .npy: check_vocab looked at the maximum only; PyTorch then raised IndexError, JAX diverged. (Ids
    are checked in the batches that read them: every eighth is negative here, so the first batch meets one.)"""
    from gpt2_torch.train import main

    tokens = np.random.default_rng(0).integers(0, 100, 2000)
    tokens[::8] = -7
    np.save(tmp_path / "neg.npy", tokens)
    argv = ["--config", str(config_file), "--run-dir", str(tmp_path / "run"), "--set",
            f"data.train={tmp_path / 'neg.npy'}"]
    assert one_line(capsys, lambda: main(argv)) == \
        f"shard '{tmp_path / 'neg.npy'}' holds token id -7; token ids are 0 or more: it is not a token shard " \
        "(prepare it with scripts/prepare_data.py)"


GOOD = {"ctx": "A man is sitting on a roof. he", "endings": ["a", "b", "c", "d"], "label": 1}
HELLASWAG = [  # the second line of the file -> the line
    (json.dumps({**GOOD, "endings": [1, 2, 3, 4]}),
     "h.jsonl:2: a HellaSwag record's endings are a list of 4 strings, got [1, 2, 3, 4]"),
    (json.dumps({**GOOD, "endings": "abcd"}), "h.jsonl:2: a HellaSwag record's endings are a list of 4 strings, got "
                                              '"abcd"'),
    (json.dumps({**GOOD, "endings": ["a", "b", "c"]}),
     "h.jsonl:2: a HellaSwag record's endings are a list of 4 strings, got [\"a\", \"b\", \"c\"]"),
    (json.dumps({**GOOD, "ctx": None}), "h.jsonl:2: a HellaSwag record's ctx is text, got null"),
    (json.dumps({**GOOD, "label": 4}), "h.jsonl:2: a HellaSwag record's label is an integer in 0..3, got 4"),
    (json.dumps({**GOOD, "label": 1.5}), "h.jsonl:2: a HellaSwag record's label is an integer in 0..3, got 1.5"),
    (json.dumps({**GOOD, "label": True}), "h.jsonl:2: a HellaSwag record's label is an integer in 0..3, got true"),
    (json.dumps({**GOOD, "label": "x"}), "h.jsonl:2: a HellaSwag record's label is an integer in 0..3, got \"x\""),
    ("[1, 2]", "h.jsonl:2: not a HellaSwag record (needs ctx, endings, label)"),
]


@pytest.mark.parametrize("line, message", HELLASWAG)
def test_hellaswag_records_that_are_not(tmp_path, line, message):
    path = tmp_path / "h.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + line + "\n")
    with pytest.raises(UserError) as err:
        read_hellaswag(path)
    assert str(err.value) == f"{tmp_path}/{message}"


def test_hellaswag_bytes_that_are_not_utf8_and_labels_as_strings(tmp_path):
    path = tmp_path / "h.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + json.dumps(GOOD).encode().replace(b"roof", b"r\xf6of"))
    with pytest.raises(UserError) as err:
        read_hellaswag(path)
    assert str(err.value) == f"{path}:2: not UTF-8 text (byte 33 of the line is 0xf6); HellaSwag's JSONL is UTF-8"
    path.write_text(json.dumps({**GOOD, "label": "3"}) + "\n")  # Hugging Face's copy writes labels as strings
    assert read_hellaswag(path)[0].label == 3


def test_a_malformed_metrics_line_is_skipped_with_a_warning_not_a_blocked_resume(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    lines = [b'{"step": 1, "loss": 4.0}', b'{"step": "x"}', b'{"step": 2, "loss": 3.\xff}', b"[1, 2]",
             b'{"step": 2, "loss": 3.5}', b'{"step": 3, "loss": 3.0}', b'{"step": 4, "lo']
    path.write_bytes(b"\n".join(lines))  # the last line torn by a kill
    capsys.readouterr()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    err = capsys.readouterr().err
    assert f"warning: skipping line 2 of {path}: its step is \"x\", not a number" in err
    assert f"warning: skipping line 3 of {path}: bytes that are not UTF-8" in err
    assert f"warning: skipping line 4 of {path}: not a JSON object" in err
    assert trim_metrics(tmp_path, 2) == 5  # the bad lines, step 3 and the torn one
    err = capsys.readouterr().err
    assert f"warning: dropping line 2 of {path}: its step is \"x\", not a number" in err
    assert "line 7" not in err  # a torn last line is what a kill leaves: dropped quietly, as before
    assert path.read_text() == '{"step": 1, "loss": 4.0}\n{"step": 2, "loss": 3.5}\n'


@pytest.mark.parametrize("value, shown", [("nan", "nan"), ("inf", "inf"), ("1e-45", "1e-45"), ("-1", "-1.0")])
def test_sample_temperature_that_cannot_be_sampled(tmp_path, capsys, value, shown):
    """JAX drew a padded id (and failed to decode it), PyTorch raised, for nan, inf and 1e-45."""
    main = load_script("sample").main

    argv = ["--checkpoint", str(tmp_path), "--prompt", "x", "--temperature", value]
    assert one_line(capsys, lambda: main(argv)) == \
        f"--temperature must be 0 (greedy) or a finite number of at least 1e-06, got {shown}"
    assert math.isnan(float(value)) or float(value) != 0
