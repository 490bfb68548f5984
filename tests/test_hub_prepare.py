"""Data by name (prepare_data.py --source hf:REPO --name CONFIG), against the loopback Hub of tests/fake_hub.py and
in this process (huggingface_hub's constants pointed at it): the shards are those of the same files prepared from
disk; a second run offline makes no request; a run cut off mid-file or refused with 503s resumes, fetching only the
files it had not tokenized; --max-tokens, --delete-downloads, the disk check and the configs' names."""

import json
from pathlib import Path

import numpy as np
import pytest

from gpt2_common import prepare_hub
from gpt2_common.errors import UserError
from gpt2_common.prepare import documents_for, prepare
from gpt2_common.prepare_hub import prepare_named
from hub_repos import FINEWEB, FINEWEB_SAMPLE, NO_CARD, NO_CARD_FILES, WIKITEXT

FINEWEB_NAME = f"hf:{FINEWEB}"
SETTINGS = dict(config="sample-10BT", shard_tokens=20_000, val_fraction=0.05, workers=1, progress=False)


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.bin"))}


@pytest.fixture(scope="module")
def reference(hub_repos, tmp_path_factory) -> dict[str, bytes]:
    """sample-10BT's three files prepared as local files, in the order the Hub lists them."""
    root = tmp_path_factory.mktemp("fineweb_local")
    paths = hub_repos.write(FINEWEB, FINEWEB_SAMPLE, root)
    prepare(documents_for([str(p) for p in paths]), root / "out", val_fraction=0.05, shard_tokens=20_000, workers=1,
            progress=False)
    return shard_bytes(root / "out")


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch):
    """huggingface_hub waits (1 s, 2 s, ... 8 s) between its retries; the faults here are the server's own."""
    import huggingface_hub.file_download
    import huggingface_hub.utils._http

    monkeypatch.setattr(huggingface_hub.utils._http.time, "sleep", lambda seconds: None)
    monkeypatch.setattr(huggingface_hub.file_download.time, "sleep", lambda seconds: None)


def test_named_prepare_writes_the_shards_of_the_same_local_files_and_records_the_commit(hub_repos, hub_home,
                                                                                       reference, tmp_path):
    hub = hub_repos.hub
    since = len(hub.log)
    result = prepare_named(FINEWEB_NAME, tmp_path / "out", **{**SETTINGS, "workers": 2})
    assert shard_bytes(tmp_path / "out") == reference
    assert len(reference) > 3  # shards span the files: the writer's state crossed file boundaries
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["source"] == f"hf:{FINEWEB}@{hub_repos.commits[FINEWEB]}"
    assert (meta["name"], meta["split"]) == ("sample-10BT", "train")
    assert meta["train_tokens"] + meta["val_tokens"] == result.train_tokens + result.val_tokens
    assert hub.fetched(since) == ["README.md", *FINEWEB_SAMPLE]  # only the card and the config's files

    # the same command again: already done, nothing fetched
    since = len(hub.log)
    prepare_named(FINEWEB_NAME, tmp_path / "out", **SETTINGS)
    assert hub.fetched(since) == []


def test_offline_from_the_cache_gives_the_same_bytes_and_makes_no_request(hub_repos, hub_home, reference, tmp_path,
                                                                          monkeypatch):
    from fake_hub import use_in_process

    prepare_named(FINEWEB_NAME, tmp_path / "online", **SETTINGS)
    since = len(hub_repos.hub.log)
    use_in_process(monkeypatch, "http://127.0.0.1:9", hub_home, offline=True)  # a port nothing listens on
    prepare_named(FINEWEB_NAME, tmp_path / "offline", **SETTINGS)
    assert shard_bytes(tmp_path / "offline") == reference
    assert hub_repos.hub.requests(since) == []


def test_a_repository_without_a_card_prepares_offline_from_the_cache(hub_repos, hub_home, tmp_path, monkeypatch,
                                                                      caplog):
    """No README.md: the card's configs are inferred from the files' names (their train split here), and the same
    command offline, into a new --out and into the finished one, reads the cache alone: the same shards, no
    request; and huggingface_hub's warning that no file matched README.md is not passed on."""
    from fake_hub import use_in_process

    name, settings = f"hf:{NO_CARD}", {**SETTINGS, "config": None}
    since = len(hub_repos.hub.log)
    prepare_named(name, tmp_path / "online", **settings)
    assert hub_repos.hub.fetched(since) == NO_CARD_FILES[:2]  # the train split; there is no card to fetch
    online = shard_bytes(tmp_path / "online")
    since = len(hub_repos.hub.log)
    use_in_process(monkeypatch, "http://127.0.0.1:9", hub_home, offline=True)  # a port nothing listens on
    for out in ("offline", "online"):
        prepare_named(name, tmp_path / out, **settings)
        assert shard_bytes(tmp_path / out) == online, out
    assert hub_repos.hub.requests(since) == []
    assert "No files matched" not in caplog.text


@pytest.mark.parametrize("fault", ["cut", "503"])
def test_an_interrupted_run_resumes_fetching_only_what_it_had_not_tokenized(hub_repos, hub_home, reference, tmp_path,
                                                                           fault):
    """A connection cut for good in the middle of the second file, or a Hub that answers 503 for it: one line, the
    first file's documents recorded; the same command again fetches the second and third files only, pinned to the
    commit of the first run even though main has moved since, and writes the shards an uninterrupted run writes."""
    hub, second = hub_repos.hub, FINEWEB_SAMPLE[1]
    if fault == "cut":
        hub.cut(second, at=len(hub_repos.files[FINEWEB][second]) // 2)
    else:
        hub.fail(second, 503)
    try:
        with pytest.raises(UserError) as err:
            prepare_named(FINEWEB_NAME, tmp_path / "out", **SETTINGS)
    finally:
        hub.heal()
    line = str(err.value)
    assert "\n" not in line
    assert ("ended early" in line or "cannot reach" in line) if fault == "cut" else "answered 503" in line, line
    assert ("ended early" in line or "cannot reach" in line) if fault == "cut" else "answered 503" in line
    assert prepare_hub.read_progress(tmp_path / "out")[0]["done"] == 1
    old = hub_repos.commits[FINEWEB]
    repo = hub.repos[("dataset", FINEWEB)]
    hub.add_commit("dataset", FINEWEB, {**hub_repos.files[FINEWEB], FINEWEB_SAMPLE[0]: b"changed since"})
    try:
        since = len(hub.log)
        prepare_named(FINEWEB_NAME, tmp_path / "out", **SETTINGS)
    finally:
        repo.refs["main"] = old
    assert hub.fetched(since) == FINEWEB_SAMPLE[1:]
    assert shard_bytes(tmp_path / "out") == reference
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["source"] == f"{FINEWEB_NAME}@{old}"


def test_max_tokens_stops_early_and_downloads_only_what_it_reads(hub_repos, hub_home, reference, tmp_path):
    since = len(hub_repos.hub.log)
    result = prepare_named(FINEWEB_NAME, tmp_path / "out", max_tokens=5_000, **SETTINGS)
    assert 5_000 <= result.train_tokens + result.val_tokens < 6_000  # one document past the limit at most
    assert hub_repos.hub.fetched(since) == ["README.md", FINEWEB_SAMPLE[0]]
    tokens = np.concatenate([np.frombuffer(b[1024:], np.uint16) for b in shard_bytes(tmp_path / "out").values()])
    assert tokens.size == result.train_tokens + result.val_tokens
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["max_tokens"] == 5_000


def test_delete_downloads_leaves_the_shards_and_no_download(hub_repos, hub_home, reference, tmp_path):
    prepare_named(FINEWEB_NAME, tmp_path / "out", delete_downloads=True, **SETTINGS)
    assert shard_bytes(tmp_path / "out") == reference
    cached = [p.name for p in hub_home.rglob("*.parquet")]
    assert cached == []


def test_a_disk_too_small_is_refused_before_anything_downloads(hub_repos, hub_home, tmp_path, monkeypatch):
    class Usage:
        free = 10_000

    monkeypatch.setattr(prepare_hub.shutil, "disk_usage", lambda path: Usage)
    since = len(hub_repos.hub.log)
    with pytest.raises(UserError, match=r"^not enough disk space for hf:.*sample-10BT/train\): it needs about "
                       r"[\d.]+ KB \([\d.]+ KB to download into .*hf_home/hub, about [\d.]+ KB of shards in .*out "
                       r"\(estimated\)\) and there is 10.0 KB free; free space, pass --delete-downloads \(downloads "
                       r"then take [\d.]+ KB\), or pass --max-tokens N for a smaller sample$"):
        prepare_named(FINEWEB_NAME, tmp_path / "out", **SETTINGS)
    assert [f for f in hub_repos.hub.fetched(since) if f.endswith(".parquet")] == []


def test_configs_and_splits_that_do_not_exist_are_named_with_those_that_do(hub_repos, hub_home, tmp_path):
    with pytest.raises(UserError, match=r"^hf:HuggingFaceFW/fineweb-edu has no config 'sample-1BT'; its configs: "
                       r"default, sample-10BT, sample-100BT, CC-MAIN-2024-10$"):
        prepare_named(FINEWEB_NAME, tmp_path / "a", **{**SETTINGS, "config": "sample-1BT"})
    with pytest.raises(UserError, match=r"^config 'wikitext-2-raw-v1' of hf:Salesforce/wikitext has no split "
                       r"'validation'; its splits: test, train \(choose one with --split\)$"):
        prepare_named(f"hf:{WIKITEXT}", tmp_path / "b", **{**SETTINGS, "config": "wikitext-2-raw-v1",
                                                           "split": "validation"})
    result = prepare_named(f"hf:{WIKITEXT}", tmp_path / "c", **{**SETTINGS, "config": "wikitext-103-raw-v1",
                                                                "split": "test"})
    assert result.documents == 30  # the rows that hold text; the empty ones are no documents


def test_a_run_with_other_settings_is_refused_and_keeps_the_folder(hub_repos, hub_home, tmp_path):
    prepare_named(FINEWEB_NAME, tmp_path / "out", max_tokens=5_000, **SETTINGS)
    before = shard_bytes(tmp_path / "out")
    with pytest.raises(UserError, match=r"holds a preparation of hf:HuggingFaceFW/fineweb-edu@\w+ with other settings "
                       r"\(max_tokens: 5000 -> None\); run its own command to finish it, or give another --out"):
        prepare_named(FINEWEB_NAME, tmp_path / "out", **SETTINGS)
    assert shard_bytes(tmp_path / "out") == before


def test_a_disk_that_fills_up_mid_run_is_one_line_and_the_run_resumes(hub_repos, hub_home, reference, tmp_path,
                                                                      monkeypatch):
    import errno
    import os

    from gpt2_common import shards

    real, calls = shards.write_shard, []

    def fills_up(path, tokens):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, tokens)

    monkeypatch.setattr(shards, "write_shard", fills_up)
    with pytest.raises(UserError, match=r"^no space left on the device for the shard '.*out/train_000001.bin' \(its "
                       r"temporary file is removed\); free space and run the same command again$"):
        prepare_named(FINEWEB_NAME, tmp_path / "out", **SETTINGS)
    monkeypatch.setattr(shards, "write_shard", real)
    prepare_named(FINEWEB_NAME, tmp_path / "out", **SETTINGS)
    assert shard_bytes(tmp_path / "out") == reference


@pytest.mark.parametrize("args,message", [
    (["--source", "hf:HuggingFaceFW/fineweb-edu", "more.txt"], "--source hf:HuggingFaceFW/fineweb-edu names a whole "
     "Hub dataset; prepare it alone (other inputs into another --out)"),
    (["--source", "notes.txt", "--name", "sample-10BT"], "--name is for a Hub dataset (--source hf:OWNER/REPO); local "
     "files are read as they are"),
    (["--source", "notes.txt", "--max-tokens", "0"], "--max-tokens must be at least 1, got 0"),
])
def test_prepare_data_refuses_flags_that_cannot_work_together(tmp_path, args, message):
    import importlib.util

    spec = importlib.util.spec_from_file_location("prepare_data", Path(__file__).parent.parent / "scripts" /
                                                  "prepare_data.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(UserError) as err:
        script.main([*args, "--out", str(tmp_path / "out")])
    assert str(err.value) == message
