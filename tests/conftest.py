"""Fixtures shared by the unit tests."""

import pytest


@pytest.fixture
def torch_one_thread():
    """Tiny torch models run fastest on one thread, and on a busy two-core machine two threads wait for each other at
    every op (a 100x slowdown seen on the CI box); subprocesses run with OMP_NUM_THREADS=1, the same kernels."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def hub_repos(tmp_path_factory):
    """The fake Hub on 127.0.0.1 (tests/fake_hub.py), started once a session, serving the repositories of
    tests/hub_repos.py. Tests that count requests take `len(hub_repos.hub.log)` before they start."""
    from fake_hub import FakeHub
    from hub_repos import build

    hub = FakeHub().start()
    try:
        yield build(hub, tmp_path_factory.mktemp("hub_repos"))
    finally:
        hub.stop()


@pytest.fixture
def hub_home(hub_repos, tmp_path, monkeypatch):
    """huggingface_hub in this process pointed at the fake Hub, with a fresh HF_HOME (the test's hf_home/), and
    HellaSwag's base URL at the fake Hub's copy; returns HF_HOME. Name lookups cached per process are cleared."""
    from fake_hub import use_in_process

    from gpt2_common import hub

    home = tmp_path / "hf_home"
    use_in_process(monkeypatch, hub_repos.hub.url, home)
    monkeypatch.setenv("GPT2_HELLASWAG_BASE_URL", hub_repos.hellaswag_base)
    hub.weights_folder.cache_clear()
    yield home
    hub.weights_folder.cache_clear()
