import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpt2_common.config import load_config
from gpt2_common.data import find_shards, read_shard
from gpt2_common.errors import UserError
from gpt2_common.loaders import data_paths
from gpt2_common.prepare import documents_for, prepare, shakespeare_markdown_to_text
from gpt2_common.tokenizer import EOT_TOKEN, decode

ROOT = Path(__file__).resolve().parent.parent


def all_tokens(out_dir):
    return np.concatenate([read_shard(p) for p in find_shards(str(out_dir))])


def test_markdown_play_becomes_plain_speeches():
    text = shakespeare_markdown_to_text(
        "# Macbeth\n\n## ACT I\n\n_Thunder. Enter three Witches_\n\n**First Witch**  \nWhen shall we three meet again  \n"
        "In thunder?\n\n**ALL**  \nFair is foul.\n"
    )
    assert "First Witch:\nWhen shall we three meet again\nIn thunder?" in text
    assert "ALL:\nFair is foul." in text
    assert "**" not in text and "#" not in text and "Thunder. Enter three Witches" in text


def test_text_files_jsonl_and_parquet_become_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "second"}) + "\n\n" + json.dumps({"text": "third"}) + "\n")
    pq.write_table(pa.table({"text": ["fourth", "fifth"], "id": [1, 2]}), tmp_path / "c.parquet")
    prepare(documents_for([str(tmp_path / "*")]), tmp_path / "out", val_fraction=0.0, workers=2, progress=False)
    tokens = all_tokens(tmp_path / "out")
    docs = [decode(d) for d in np.split(tokens, np.where(tokens == EOT_TOKEN)[0] + 1)[:-1]]
    assert docs == ["first document<|endoftext|>", "second<|endoftext|>", "third<|endoftext|>",
                    "fourth<|endoftext|>", "fifth<|endoftext|>"]
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["documents"] == 5 and meta["train_tokens"] == tokens.size


def test_shards_split_and_val_holds_out_whole_documents(tmp_path):
    docs = [f"document number {i} " * 20 for i in range(40)]
    result = prepare(docs, tmp_path, val_fraction=0.2, shard_tokens=500, workers=1, progress=False)
    train, val = find_shards(str(tmp_path / "train_*.bin")), find_shards(str(tmp_path / "val_*.bin"))
    assert len(train) > 1 and all(read_shard(p).size <= 500 for p in train)
    assert 0.15 < result.val_tokens / (result.train_tokens + result.val_tokens) < 0.25
    val_tokens = np.concatenate([read_shard(p) for p in val])
    assert val_tokens[-1] == EOT_TOKEN  # whole documents only
    # Parallel and serial tokenization write the same shards.
    prepare(docs, tmp_path / "serial", val_fraction=0.2, shard_tokens=500, workers=2, progress=False)
    np.testing.assert_array_equal(all_tokens(tmp_path / "serial"), all_tokens(tmp_path))


@pytest.mark.parametrize("content,words", [
    (b"", "is empty"),
    (b"\xff\xfe\x00bad", "is not UTF-8"),
])
def test_bad_text_files(tmp_path, content, words):
    (tmp_path / "x.txt").write_bytes(content)
    with pytest.raises(UserError, match=words):
        prepare(documents_for([str(tmp_path / "x.txt")]), tmp_path / "out", workers=1, progress=False)


def test_bad_jsonl_names_the_line(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n{not json}\n')
    with pytest.raises(UserError, match=r"x.jsonl:2: not valid JSON"):
        prepare(documents_for([str(tmp_path / "x.jsonl")]), tmp_path / "out", workers=1, progress=False)
    (tmp_path / "y.jsonl").write_text('{"body": "ok"}\n')
    with pytest.raises(UserError, match=r"y.jsonl:1: no string field 'text'"):
        prepare(documents_for([str(tmp_path / "y.jsonl")]), tmp_path / "out", workers=1, progress=False)


def test_script_reports_missing_input_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts/prepare_data.py"), "--source",
                             str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: input '{tmp_path / 'missing.txt'}' does not exist"


def test_embedded_shakespeare(tmp_path):
    result = prepare(documents_for(["shakespeare"]), tmp_path, val_fraction=0.1, workers=1, progress=False)
    assert result.documents >= 36 and result.train_tokens > 1_000_000
    text = decode(read_shard(find_shards(str(tmp_path / "train_*.bin"))[0])[:4000])
    assert ":\n" in text and "**" not in text


def test_the_first_run_of_a_preset_on_the_embedded_corpus_prepares_it_as_the_readme_command_does(tmp_path,
                                                                                                  monkeypatch):
    """`make train` in a fresh clone: the shakespeare preset's shards do not exist yet, so the first run prepares
    them into data/shakespeare, the same files byte for byte as the README's prepare_data.py command writes, and
    leaves no staging folder behind; the next run finds them and prepares nothing."""
    subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_data.py"), "--source", "shakespeare", "--out",
                    "typed"], cwd=tmp_path, check=True, capture_output=True)
    monkeypatch.chdir(tmp_path)
    config = load_config("shakespeare")
    train, val = data_paths(config, progress=False)
    assert [p.name for p in train + val] == ["train_000000.bin", "val_000000.bin"]
    home, typed = tmp_path / "data" / "shakespeare", tmp_path / "typed"
    assert sorted(p.name for p in home.iterdir()) == sorted(p.name for p in typed.iterdir())
    for path in typed.iterdir():
        assert (home / path.name).read_bytes() == path.read_bytes(), path.name
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["shakespeare"]
    written = {p.name: p.stat().st_mtime_ns for p in home.iterdir()}
    data_paths(config, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in home.iterdir()} == written
