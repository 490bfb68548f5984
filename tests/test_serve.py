"""scripts/serve.py end to end: a real server process on a free port with a tiny checkpoint, driven over HTTP and in
a real headless browser (Debian's chromium through playwright)."""

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "ROMEO:\nBut soft, what light"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny randomly initialised GPT-2 (the real vocabulary) written as a Hugging Face directory."""
    import torch

    from gpt2_common.config import ModelConfig
    from gpt2_common.weights import save_hf
    from gpt2_torch.model import GPT
    from gpt2_torch.weights import to_canonical

    model_config = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=32)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("serve") / "tiny_hf"
    save_hf(to_canonical(GPT(model_config).state_dict(), model_config), model_config, path)
    return path


@pytest.fixture(scope="module")
def server(checkpoint):
    port = free_port()
    process = subprocess.Popen([sys.executable, str(ROOT / "scripts/serve.py"), "--checkpoint", str(checkpoint),
                                "--framework", "jax", "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(f"serve.py exited: {process.stdout.read()}")
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        process.kill()
        pytest.fail("serve.py did not come up in 240 s")
    yield url
    process.terminate()
    process.wait(timeout=30)


def events(url, **query):
    with urllib.request.urlopen(url + "/generate?" + urllib.parse.urlencode(query), timeout=120) as response:
        body = response.read().decode()
    return [json.loads(chunk[len("data: "):]) for chunk in body.split("\n\n") if chunk.startswith("data: ")]


def completion(url, **query):
    return "".join(e.get("text", "") for e in events(url, **query))


def sample_py(checkpoint, max_new_tokens):
    out = subprocess.run([sys.executable, str(ROOT / "scripts/sample.py"), "--checkpoint", str(checkpoint),
                          "--framework", "jax", "--prompt", PROMPT, "--temperature", "0", "--top-k", "0",
                          "--max-new-tokens", str(max_new_tokens)], capture_output=True, text=True, check=True)
    text = out.stdout.split("\n---------------\n")[0]
    assert text.startswith(PROMPT)
    return text[len(PROMPT):]


def test_bad_input_is_answered_and_the_server_keeps_serving(server):
    assert events(server, prompt="   ") == [{"error": "the prompt is empty: type some text to continue"}]
    assert events(server, prompt="x", top_p="2")[0]["error"] == "top_p must be between 0.01 and 1.0, got 2.0"
    assert "must be a whole number" in events(server, prompt="x", max_new_tokens="many")[0]["error"]
    long = events(server, prompt=" word" * 100, max_new_tokens=3, temperature=0)
    assert long[0] == {"notice": "the prompt is 100 tokens; it is cut to the last 32 (the model's context)"}
    assert long[-1] == {"done": True}


def test_disconnect_midstream_then_two_requests_at_once(server):
    request = urllib.request.urlopen(server + "/generate?" + urllib.parse.urlencode(
        {"prompt": PROMPT, "max_new_tokens": 1000, "temperature": 1.0}), timeout=60)
    request.readline()  # the first token arrived; now leave
    request.close()
    results = [None, None]

    def ask(i):
        results[i] = completion(server, prompt=PROMPT, max_new_tokens=8, temperature=0)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results[0] == results[1] and results[0]  # served in turn, both whole


def test_seeded_sampling_is_reproducible(server):
    a = completion(server, prompt=PROMPT, max_new_tokens=12, temperature=1.0, seed=7)
    b = completion(server, prompt=PROMPT, max_new_tokens=12, temperature=1.0, seed=7)
    assert a == b


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_page_streams_the_greedy_completion_of_sample_py(server, checkpoint, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page()
        page.goto(server)
        page.fill("#prompt", PROMPT)
        page.fill("#temperature", "0")
        page.fill("#max_new_tokens", "20")
        page.click("#generate")
        page.wait_for_selector("#output[data-done='true']", timeout=120_000)
        shown = page.inner_text("#completion")
        pieces = int(page.get_attribute("#output", "data-events"))
        page.screenshot(path=str(tmp_path / "page.png"))
        browser.close()
    assert shown == sample_py(checkpoint, 20)
    assert pieces >= 10  # the page added the text event by event (one per token here), not all at once


def test_tokens_are_sent_as_they_are_generated(server):
    start = time.perf_counter()
    arrivals = []
    query = {"prompt": PROMPT, "max_new_tokens": 200, "temperature": 1.0, "seed": 1}
    with urllib.request.urlopen(server + "/generate?" + urllib.parse.urlencode(query), timeout=120) as response:
        for line in response:
            if line.startswith(b"data: "):
                arrivals.append(time.perf_counter() - start)
    assert len(arrivals) > 20
    assert arrivals[0] < 0.5 * arrivals[-1]  # the first token did not wait for the last
