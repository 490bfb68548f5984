import json

import numpy as np
import pytest

from gpt2_common.config import load_config
from gpt2_common.data import IGNORE_INDEX
from gpt2_common.errors import UserError
from gpt2_common.instruct import InstructLoader, build_rows, encode_example, format_prompt, read_records
from gpt2_common.loaders import open_loaders
from gpt2_common.tokenizer import EOT_TOKEN, get_tokenizer

RECORDS = [
    {"instruction": "Give a color.", "input": "", "output": "Blue."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hi.", "output": "Hi there!"},
]


def test_template_matches_alpaca():
    assert format_prompt("Do it.").endswith("### Instruction:\nDo it.\n\n### Response:\n")
    assert "### Input:\nctx\n\n### Response:\n" in format_prompt("Do it.", "ctx")


def test_only_the_response_and_eot_are_learned():
    tokens, learn = encode_example(RECORDS[1])
    enc = get_tokenizer()
    prompt_len = len(enc.encode_ordinary(format_prompt("Add the numbers.", "2 and 3")))
    assert not learn[:prompt_len].any() and learn[prompt_len:].all()
    assert enc.decode(tokens[learn].tolist()) == "5<|endoftext|>"


@pytest.mark.parametrize("pack", [True, False])
def test_targets_hide_the_prompt(pack):
    inputs, targets = build_rows(RECORDS * 4, 48, pack)
    assert inputs.shape[1] == targets.shape[1] == 48
    learned = targets[targets != IGNORE_INDEX]
    text = get_tokenizer().decode(learned.tolist())
    assert "Instruction" not in text and "Blue." in text and "Hi there!" in text
    if not pack:  # padded rows: the first example's row, target by target
        tokens, learn = encode_example(RECORDS[0])
        expected = np.where(learn[1:], tokens[1:], IGNORE_INDEX)
        np.testing.assert_array_equal(targets[0, :len(expected)], expected)
        assert (targets[0, len(expected):] == IGNORE_INDEX).all() and (inputs[0, len(tokens):] == EOT_TOKEN).all()


def test_json_array_and_jsonl(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(RECORDS, indent=2))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS))
    assert read_records(tmp_path / "a.json") == read_records(tmp_path / "a.jsonl") == RECORDS


@pytest.mark.parametrize("text,words", [
    ('{"instruction": "x", "output": "y"}\n{"instruction": "x"}\n', r"a.jsonl:2: the record has no string 'output'"),
    ('{"instruction": "x", "output": "y"}\n\nnot json\n', r"a.jsonl:3: not valid JSON"),
    ('[1]\n', r"a.jsonl:1: a record must be a JSON object"),
])
def test_malformed_records_name_their_line(tmp_path, text, words):
    path = tmp_path / "a.jsonl"
    path.write_text(text)
    with pytest.raises(UserError, match=words):
        read_records(path)


def test_malformed_record_in_json_array_names_its_line(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[\n  {"instruction": "x", "output": "y"},\n  {"instruction": "x",\n   "input": ""}\n]\n')
    with pytest.raises(UserError, match=r"a.json:3: the record has no string 'output'"):
        read_records(path)


def test_loader_from_config_holds_out_validation(tmp_path):
    path = tmp_path / "alpaca.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS * 100))
    config = load_config("tiny", [f'data.train="{path}"', 'data.val=""', 'data.format="alpaca"', "data.pack=false",
                                  "train.micro_batch_size=4", "train.batch_size=8"])
    train, val = open_loaders(config)
    assert isinstance(train, InstructLoader) and train.batches_per_epoch == 294 // 4  # 6 of 300 held out
    x, y = val.batch(0)
    assert x.shape == y.shape == (4, 64)
    np.testing.assert_array_equal(val.batch(0)[1], y)  # validation batches are fixed


def test_too_few_held_out_records_say_it_is_the_validation_split(tmp_path):
    path = tmp_path / "alpaca.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS * 10))
    config = load_config("tiny", [f'data.train="{path}"', 'data.val=""', 'data.format="alpaca"', "data.pack=false",
                                  "train.micro_batch_size=4", "train.batch_size=8"])
    with pytest.raises(UserError, match="validation data from the last 1 records held out of data.train"):
        open_loaders(config)
