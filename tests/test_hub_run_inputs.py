"""What a run names instead of pointing at: HellaSwag's val file (--hellaswag val, data.hellaswag = "val"), Alpaca by
name (data.train = "hf:tatsu-lab/alpaca") and --init-from hf:gpt2, against the loopback Hub and file server of
tests/fake_hub.py; then both trainers on all three at once."""

import numpy as np
import pytest

from gpt2_common import hellaswag_file
from gpt2_common.config import load_config
from gpt2_common.errors import UserError
from gpt2_common.evaluation import read_hellaswag
from gpt2_common.instruct import read_records
from gpt2_common.loaders import open_loaders
from hub_repos import ALPACA, GPT2, HELLASWAG, HELLASWAG_PATH


def git_sha1(data: bytes) -> str:
    import hashlib

    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@pytest.fixture
def fixture_hellaswag(hub_repos, monkeypatch):
    """`val` as the fake server's copy: its own SHA-1 stands in for the real file's."""
    monkeypatch.setitem(hellaswag_file.SPLITS, "val", ("hellaswag_val.jsonl", git_sha1(hub_repos.hellaswag)))


def hellaswag_requests(hub_repos, since):
    return [r for r in hub_repos.hub.requests(since) if r.path == HELLASWAG_PATH]


def test_hellaswag_val_is_fetched_once_checked_and_read(hub_repos, hub_home, fixture_hellaswag):
    since = len(hub_repos.hub.log)
    examples = read_hellaswag("val")
    assert [ex.label for ex in examples] == [label for _, _, label in HELLASWAG]
    cached = hub_home / "assets" / "gpt2-jax-torch" / "hellaswag"
    assert [p.name for p in cached.iterdir()] == ["hellaswag_val.jsonl"]
    read_hellaswag("val")
    assert len(hellaswag_requests(hub_repos, since)) == 1


def test_a_hellaswag_file_that_does_not_match_its_checksum_is_not_kept(hub_repos, hub_home):
    with pytest.raises(UserError, match=r"^HellaSwag's val file from http://127.0.0.1:\d+/rowanz/hellaswag/master/data/"
                       r"hellaswag_val.jsonl does not match its checksum \(git SHA-1 \w{12}\.\.\., expected "
                       r"0f5ee25d7221\.\.\.\); nothing was kept: check GPT2_HELLASWAG_BASE_URL or the network and run "
                       r"again$"):
        read_hellaswag("val")
    assert list((hub_home / "assets" / "gpt2-jax-torch" / "hellaswag").iterdir()) == []


def test_hellaswag_cannot_be_downloaded_in_one_line(hub_repos, hub_home, monkeypatch, tmp_path):
    monkeypatch.setenv("GPT2_HELLASWAG_BASE_URL", hub_repos.hub.url + "/nowhere")
    with pytest.raises(UserError, match=r"^cannot download HellaSwag from .*/nowhere/hellaswag_val.jsonl: the server "
                       r"answered 404; check GPT2_HELLASWAG_BASE_URL, or give a local file \(--hellaswag "
                       r"path/to/hellaswag_val.jsonl\)$"):
        read_hellaswag("val")
    monkeypatch.setenv("GPT2_HELLASWAG_BASE_URL", "http://127.0.0.1:9")
    with pytest.raises(UserError, match=r"^cannot download HellaSwag from http://127.0.0.1:9/hellaswag_val.jsonl \(.*"
                       r"refused\); check the network"):
        read_hellaswag("val")
    local = tmp_path / "val"  # a local file keeps working (a path, not the name)
    local.write_bytes(hub_repos.hellaswag)
    assert len(read_hellaswag(str(local))) == 3


def test_alpaca_by_name_gives_the_rows_of_the_same_records_from_a_local_file(hub_repos, hub_home, tmp_path):
    local = tmp_path / "alpaca_data.json"
    local.write_bytes(hub_repos.files["alpaca records"]["records.json"])
    assert read_records(f"hf:{ALPACA}") == read_records(local)
    loaders = {}
    for source in (f"hf:{ALPACA}", str(local)):
        config = load_config("alpaca", [f"data.train={source}", "model.n_layer=2", "model.n_head=4", "model.n_embd=64",
                                        "model.block_size=64", "train.micro_batch_size=4", "train.batch_size=4"])
        loaders[source] = open_loaders(config, progress=False)
    (train_a, val_a), (train_b, val_b) = loaders.values()
    for a, b in ((train_a, train_b), (val_a, val_b)):
        np.testing.assert_array_equal(a.batch(0)[0], b.batch(0)[0])
        np.testing.assert_array_equal(a.batch(0)[1], b.batch(0)[1])


def test_a_hub_dataset_as_token_shards_says_to_prepare_it_first():
    with pytest.raises(UserError, match=r"^data.train = 'hf:HuggingFaceFW/fineweb-edu' names a Hub dataset; make token "
                       r"shards of it first \(python scripts/prepare_data.py --source hf:HuggingFaceFW/fineweb-edu "
                       r"--name CONFIG --out DIR\) and set data.train to DIR's train_\*.bin$"):
        load_config("tiny", ["data.train=hf:HuggingFaceFW/fineweb-edu"])


# JAX's run takes 25 s where PyTorch's takes 10: what differs is the backend's own init, covered for JAX by the README
# test's --init-from runs; the names are read in gpt2_common and gpt2_formats, the same for both.
@pytest.mark.parametrize("framework", ["torch", pytest.param("jax", marks=pytest.mark.slow)])
def test_a_trainer_starts_from_hf_gpt2_on_alpaca_by_name_scoring_hellaswag_val(hub_repos, hub_home,
                                                                                fixture_hellaswag, tmp_path,
                                                                                framework, monkeypatch):
    """One step at lr 0: the checkpoint holds exactly the Hub's weights (--init-from hf:gpt2 read them as the local
    directory would), the step trained on Alpaca's records by name, and the evaluation scored HellaSwag's val."""
    import importlib

    import gpt2_formats
    from gpt2_common.metrics import read_metrics

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    config = load_config("alpaca", [f"data.train=hf:{ALPACA}", "data.hellaswag=val", "model.n_layer=2",
                                    "model.n_head=4", "model.n_embd=64", "model.block_size=64", "train.batch_size=8",
                                    "train.micro_batch_size=8", "train.max_steps=1", "train.warmup_steps=0",
                                    "train.lr=0.0", "train.min_lr=0.0", "train.eval_interval=1", "train.eval_steps=1",
                                    "train.precision=fp32", "train.save_interval=1"])
    train = importlib.import_module(f"gpt2_{framework}.train").train
    end = train(config, tmp_path / "run", init_from="hf:gpt2", sample_tokens=0, log=lambda line: None)
    assert end is not None
    records = read_metrics(tmp_path / "run")
    assert any("hellaswag_acc" in r for r in records) and any("loss" in r for r in records)
    _, trained = gpt2_formats.read_canonical(tmp_path / "run")
    _, hub_weights = gpt2_formats.read_canonical(f"hf:{GPT2}")
    for key, value in hub_weights.items():
        np.testing.assert_array_equal(trained[key], value, err_msg=key)
