"""Weights by name (hf:gpt2, hf:OWNER/REPO[@REVISION]) through gpt2_formats, against the loopback Hub of
tests/fake_hub.py: the same weights as the local directory, only config.json and the safetensors fetched, a bare
word never sent to the network, and every failure of the Hub as one line that says what to do; a name where a
script writes is refused."""

import errno
import inspect
import os
import shutil
import sys

import numpy as np
import pytest

import gpt2_formats
from gpt2_common import hub
from gpt2_common.cli import check_weights_arg, path_arg, train_parser
from gpt2_common.config import ModelConfig
from gpt2_common.errors import UserError
from hub_repos import GPT2
from script_module import load_script

TINY_GPT2 = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=64)  # the fake Hub's openai-community/gpt2


def local_copy(hub_repos, tmp_path):
    folder = tmp_path / "gpt2_local"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes(hub_repos.files[GPT2][name])
    return folder


def test_a_hub_name_reads_the_weights_of_the_local_directory(hub_repos, hub_home, tmp_path):
    since = len(hub_repos.hub.log)
    assert gpt2_formats.detect("hf:gpt2") == "hf"
    by_name = gpt2_formats.init_weights("hf:gpt2", TINY_GPT2)
    local = gpt2_formats.init_weights(local_copy(hub_repos, tmp_path), TINY_GPT2)
    assert by_name.keys() == local.keys()
    for key in local:
        np.testing.assert_array_equal(by_name[key], local[key], err_msg=key)
    assert sorted(hub_repos.hub.fetched(since)) == ["config.json", "model.safetensors"]  # not the other copies
    config, _ = gpt2_formats.read_canonical("hf:gpt2")
    assert config.name == "gpt2" and config.model.n_layer == 2
    assert (hub_home / "hub" / "models--openai-community--gpt2").is_dir()  # the user's own Hugging Face cache

    # at a commit, from the cache: no request at all
    hub.weights_folder.cache_clear()
    since = len(hub_repos.hub.log)
    gpt2_formats.read_canonical(f"hf:{GPT2}@{hub_repos.commits[GPT2]}")
    assert hub_repos.hub.requests(since) == []


def test_a_bare_word_is_a_local_path_never_the_network(hub_repos, hub_home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    since = len(hub_repos.hub.log)
    assert path_arg("hf:gpt2") == "hf:gpt2" and path_arg("gpt2") == str(tmp_path / "gpt2")
    with pytest.raises(UserError, match=r"^'.*/gpt2' does not exist \(OpenAI's GPT-2 on the Hugging Face Hub is "
                       r"hf:gpt2\)$"):
        gpt2_formats.read_canonical(path_arg("gpt2"))
    with pytest.raises(UserError, match=r"^--init-from '.*gpt2-xl' does not exist; give a checkpoint, run directory "
                       r"or Hugging Face directory \(OpenAI's GPT-2 on the Hugging Face Hub is hf:gpt2-xl\)$"):
        check_weights_arg("--init-from", path_arg("gpt2-xl"))
    shutil.copytree(local_copy(hub_repos, tmp_path), tmp_path / "gpt2")  # a local folder named like the Hub's
    config, _ = gpt2_formats.read_canonical(path_arg("gpt2"))
    assert config.name == "gpt2"
    assert hub_repos.hub.requests(since) == []


def test_hf_token_reads_a_private_repository(hub_repos, hub_home, monkeypatch):
    hub_repos.hub.add_commit("model", "someone/private-gpt2", hub_repos.files[GPT2], access="token:hf_secret")
    with pytest.raises(UserError, match="or it is private: check the name, or set HF_TOKEN"):
        hub.weights_folder("hf:someone/private-gpt2")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert (hub.weights_folder("hf:someone/private-gpt2") / "model.safetensors").is_file()


@pytest.fixture
def errors_repos(hub_repos):
    files = hub_repos.files[GPT2]
    hub_repos.hub.add_commit("model", "someone/gated-gpt2", files, access="gated")
    hub_repos.hub.add_commit("model", "someone/forbidden-gpt2", files, access="forbidden")
    hub_repos.hub.add_commit("model", "someone/pickled-gpt2", {"config.json": files["config.json"],
                                                              "pytorch_model.bin": b"\0" * 2048})
    yield hub_repos.hub
    hub_repos.hub.heal()


ERRORS = [
    ("malformed name", "hf:a/b/c", None,
     r"'hf:a/b/c' is not a Hub name; write hf:OWNER/REPO or hf:OWNER/REPO@REVISION \(a branch, tag or commit\), or "
     r"hf:gpt2, hf:gpt2-medium, hf:gpt2-large, hf:gpt2-xl for OpenAI's GPT-2s"),
    ("repository not found", "hf:nobody/nothing", None,
     r"hf:nobody/nothing: no model repository nobody/nothing on the Hub \(http://127.0.0.1:\d+\), or it is private: "
     r"check the name, or set HF_TOKEN to an access token that can read it"),
    ("revision not found", "hf:gpt2@v9", None,
     r"hf:gpt2@v9: the model repository openai-community/gpt2 has no revision 'v9'; give one of its branches, tags "
     r"or commits \(http://127.0.0.1:\d+/openai-community/gpt2\)"),
    ("file not found", "hf:gpt2", ("fail", "model.safetensors", 404, "EntryNotFound"),
     r"hf:gpt2: the model repository openai-community/gpt2 has no file 'model.safetensors' at that revision"),
    ("gated", "hf:someone/gated-gpt2", None,
     r"hf:someone/gated-gpt2 is gated: accept its conditions at http://127.0.0.1:\d+/someone/gated-gpt2 and set "
     r"HF_TOKEN to an access token of that account"),
    ("forbidden", "hf:someone/forbidden-gpt2", None,
     r"the Hub refused hf:someone/forbidden-gpt2 \(403 Forbidden\): set HF_TOKEN to an access token with read access "
     r"to the model repository someone/forbidden-gpt2"),
    ("server down", "hf:gpt2", ("fail", "model.safetensors", 503, None),
     r"the Hub answered 503 for hf:gpt2 and kept answering so; try again later \(what is already downloaded is kept\)"),
    ("checksum", "hf:gpt2", ("corrupt", "model.safetensors"),
     r"hf:gpt2: 'model.safetensors' does not match its checksum \(SHA-256 \w{12}\.\.\., expected \w{12}\.\.\.\); it "
     r"was deleted: run the same command again to download it again"),
    ("no safetensors", "hf:someone/pickled-gpt2", None,
     r"hf:someone/pickled-gpt2: the repository someone/pickled-gpt2 has no safetensors weights \(fetched: "
     r"config.json\); this reads a GPT-2 saved as config.json and model.safetensors"),
]


@pytest.mark.parametrize("case,name,fault,message", ERRORS, ids=[e[0] for e in ERRORS])
def test_each_failure_of_the_hub_is_one_line(errors_repos, hub_home, monkeypatch, case, name, fault, message):
    import huggingface_hub.utils._http

    monkeypatch.setattr(huggingface_hub.utils._http.time, "sleep", lambda seconds: None)
    if fault:
        getattr(errors_repos, fault[0])(*fault[1:])
    with pytest.raises(UserError) as err:
        gpt2_formats.read_canonical(name)
    assert "\n" not in str(err.value)
    assert __import__("re").fullmatch(message, str(err.value)), str(err.value)
    if case == "checksum":  # nothing of it is kept, and the next run downloads it again
        assert not list(hub_home.rglob("model.safetensors"))
        errors_repos.heal()
        hub.weights_folder.cache_clear()
        gpt2_formats.read_canonical(name)


def test_no_network_and_offline_say_what_works(hub_repos, hub_home, monkeypatch):
    from fake_hub import use_in_process

    use_in_process(monkeypatch, "http://127.0.0.1:9", hub_home)  # nothing listens there
    with pytest.raises(UserError, match=r"^cannot reach the Hub at http://127.0.0.1:9 \(ConnectionRefusedError: .*\) "
                       r"and "
                       r"hf:gpt2 "
                       r"is not \(all\) in the Hugging Face cache \(.*hf_home/hub\); check the network \(HF_ENDPOINT "
                       r"for a mirror\)\. Once its files are cached, HF_HUB_OFFLINE=1 reads them without the network$"):
        gpt2_formats.read_canonical("hf:gpt2")
    use_in_process(monkeypatch, "http://127.0.0.1:9", hub_home, offline=True)
    with pytest.raises(UserError, match=r"^HF_HUB_OFFLINE=1 and hf:gpt2 is not \(all\) in the Hugging Face cache "
                       r"\(.*hf_home/hub\); run once without HF_HUB_OFFLINE to download it$"):
        gpt2_formats.read_canonical("hf:gpt2")


def test_a_full_disk_is_one_line(hub_repos, hub_home, monkeypatch):
    import huggingface_hub.file_download

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(huggingface_hub.file_download, "http_get", full)
    with pytest.raises(UserError, match=r"^no space left on the device while downloading hf:gpt2 into .*hf_home/hub: "
                       r"free space there, or point HF_HOME at a larger disk$"):
        gpt2_formats.read_canonical("hf:gpt2")


@pytest.mark.parametrize("script, argv, what", [
    ("prepare_data", ["--source", "shakespeare", "--out", "hf:me/shakespeare"], "--out"),
    ("convert", ["hf:gpt2", "hf:me/gpt2", "--to", "hf"], "the destination"),
    ("plot", ["runs/x", "--out", "hf:me/plot.png"], "--out"),
    ("bench", ["--json", "hf:me/bench.json"], "--json"),
    ("collectives", ["--json", "hf:me/collectives.json"], "--json"),
    ("profile_step", ["--trace-dir", "hf:me/trace"], "--trace-dir"),
    ("train_jax", ["--run-dir", "hf:me/run"], "--run-dir"),  # both trainers' flags (gpt2_common.cli.train_parser)
])
def test_an_output_named_like_a_hub_name_is_refused_in_one_line(script, argv, what, tmp_path, monkeypatch):
    """hf: names are sources; one given where a script writes made a folder literally called `hf:me` (path_arg
    passes names through)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])
    message = f"^{what} '{argv[-1] if script != 'convert' else argv[1]}' is a Hugging Face Hub name, and hf: names " \
              "are sources only; give a local path to write to$"
    with pytest.raises(UserError, match=message):
        if script == "train_jax":
            train_parser("the trainers' flags").parse_args(argv)
        else:
            main = load_script(script).main
            main(argv) if inspect.signature(main).parameters else main()
    assert list(tmp_path.iterdir()) == []


def test_names_import_huggingface_hub_only_when_given_and_never_a_framework(hub_repos, tmp_path):
    """A script answers bad input before it imports a framework, and a path costs no import of huggingface_hub."""
    import subprocess
    import sys

    from fake_hub import environ

    local = local_copy(hub_repos, tmp_path)
    code = (f"import sys, gpt2_formats, gpt2_common.cli\n"
            f"assert gpt2_formats.detect({str(local)!r}) == 'hf'\n"
            "assert 'huggingface_hub' not in sys.modules, 'a path imported huggingface_hub'\n"
            "gpt2_formats.read_canonical('hf:gpt2')\n"
            "assert 'huggingface_hub' in sys.modules\n"
            "print(sorted(m for m in ('jax', 'torch', 'flax') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, **environ(hub_repos.hub, tmp_path / "h")},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
