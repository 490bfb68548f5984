"""scripts/serve.py end to end: a real server process on a free port with a tiny checkpoint, driven over HTTP and in
a real headless browser (Debian's chromium through playwright)."""

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
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
    deadline = time.time() + 600  # loading and compiling the model, on a machine that may be busy
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
        pytest.fail("serve.py did not come up in 600 s")
    yield url
    process.terminate()
    process.wait(timeout=600)


def events(url, **query):
    with urllib.request.urlopen(url + "/generate?" + urllib.parse.urlencode(query), timeout=600) as response:
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
        {"prompt": PROMPT, "max_new_tokens": 1000, "temperature": 1.0}), timeout=600)
    request.readline()  # the first token arrived; now leave
    request.close()
    results = [None, None]

    def ask(i):
        results[i] = completion(server, prompt=PROMPT, max_new_tokens=8, temperature=0)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
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
        page.wait_for_selector("#output[data-done='true']", timeout=600_000)
        shown = page.inner_text("#completion")
        pieces = int(page.get_attribute("#output", "data-events"))
        page.screenshot(path=str(tmp_path / "page.png"))
        browser.close()
    assert shown == sample_py(checkpoint, 20)
    assert pieces >= 10  # the page added the text event by event (one per token here), not all at once


def http_chunks(url: str, path: str) -> tuple[dict[str, str], list[bytes]]:
    """(headers, body chunks) of a GET, read off the socket as sent: http.client and urllib join the chunks of a
    chunked response, and the chunks are what shows whether the server sent each piece as soon as it had it."""
    address = urllib.parse.urlsplit(url)
    with socket.create_connection((address.hostname, address.port), timeout=600) as connection:
        connection.sendall(f"GET {path} HTTP/1.1\r\nHost: {address.netloc}\r\nConnection: close\r\n\r\n".encode())
        stream = connection.makefile("rb")
        assert stream.readline().split()[1] == b"200"
        headers = {}
        while (line := stream.readline().strip()):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        chunks = []
        while size := int(stream.readline().split(b";")[0], 16):
            chunks.append(stream.read(size))
            stream.readline()  # the CRLF after each chunk
    return headers, chunks


def test_tokens_are_sent_as_they_are_generated(server):
    """Each token goes out in a chunk of its own as it is drawn (a server that buffered the completion would send
    it in one piece, or with a Content-Length): the structure of the response, not the clock, shows the streaming."""
    query = {"prompt": PROMPT, "max_new_tokens": 40, "temperature": 1.0, "seed": 1}
    headers, chunks = http_chunks(server, "/generate?" + urllib.parse.urlencode(query))
    assert headers["transfer-encoding"] == "chunked" and headers["content-type"].startswith("text/event-stream")
    assert all(chunk.startswith(b"data: ") and chunk.endswith(b"\n\n") and chunk.count(b"data: ") == 1
               for chunk in chunks), chunks[:3]
    events = [json.loads(chunk[len(b"data: "):]) for chunk in chunks]
    assert events[-1] == {"done": True} and all("text" in e for e in events[:-1])
    assert len(events) > 20  # one event a token (a character split over tokens waits for its last byte)


# --- hostile input (issue 19, item 9): the app itself, called as uvicorn calls it, with streams that misbehave ----

def asgi_get(app, path, query="", host="127.0.0.1:8000", leave_after_events=None):
    """(status, body) of a GET, sent to the ASGI app directly; the client leaves once `leave_after_events` pieces of
    the body have been sent (counted, not timed: a busy machine changes when, not what)."""
    import asyncio

    from gpt2_common import webapp

    sent, asked = [], []

    async def receive():
        if not asked:
            asked.append(True)
            return {"type": "http.request", "body": b"", "more_body": False}
        while True:  # waits first, as a disconnect does: Request.is_disconnected's poll never sees one
            await asyncio.sleep(0.01)
            if leave_after_events is not None and sum(bool(m.get("body")) for m in sent) >= leave_after_events:
                return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    async def run():
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query.encode(),
                 "root_path": "", "headers": [(b"host", host.encode())], "client": ("127.0.0.1", 50000),
                 "server": ("127.0.0.1", 8000)}
        await app(scope, receive, send)
        # A step still running when the client left ends, and its generator closes and frees the model: the
        # generation worker is one thread, so a no-op submitted after the step runs once that is done.
        await asyncio.wrap_future(webapp._WORKER.submit(lambda: None))
        await asyncio.sleep(0)  # the model's release, which the step's end scheduled on this loop

    asyncio.run(run())
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body").decode()


def slow_stream(tokens, options):
    for i in range(options.max_new_tokens):
        time.sleep(0.05)
        yield 300 + i


def failing_stream(tokens, options):
    yield 300
    raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")


def test_the_checkpoint_name_is_escaped_in_the_page():
    from gpt2_common.webapp import build_app

    status, body = asgi_get(build_app(slow_stream, 32, title="<script>alert(1)</script>"), "/")
    assert status == 200 and "<script>alert" not in body
    assert body.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 2  # <title> and <h1>


def test_a_client_leaving_mid_stream_is_quiet_and_frees_the_model():
    """The Stop button: the request is cancelled while a worker thread runs a step; closing the generator then
    raised "ValueError: generator already executing" (logged by uvicorn at every Stop)."""
    from gpt2_common.webapp import build_app

    app = build_app(slow_stream, 32)
    status, body = asgi_get(app, "/generate", "prompt=hi&max_new_tokens=1000", leave_after_events=1)
    assert status == 200 and body.startswith('data: {"text"') and '"done"' not in body
    status, body = asgi_get(app, "/generate", "prompt=hi&max_new_tokens=3")  # the model is free again
    assert body.endswith('data: {"done": true}\n\n') and body.count('"text"') == 3


def test_a_failing_generation_sends_an_error_event(capsys):
    from gpt2_common.webapp import build_app

    status, body = asgi_get(build_app(failing_stream, 32), "/generate", "prompt=hi")
    assert status == 200
    assert body.endswith('data: {"error": "generation failed: RuntimeError: probability tensor contains either '
                         '`inf`, `nan` or element < 0"}\n\n')
    assert "warning: generation failed: RuntimeError" in capsys.readouterr().err
    assert asgi_get(build_app(failing_stream, 32), "/generate", "prompt=hi&temperature=1e-45")[1] == \
        'data: {"error": "temperature must be 0 (greedy) or at least 1e-06, got 1e-45"}\n\n'


@pytest.mark.parametrize("bound, host, answered", [
    ("127.0.0.1", "127.0.0.1:8000", True), ("127.0.0.1", "localhost:8000", True),
    ("127.0.0.1", "LOCALHOST:8000", True), ("127.0.0.1", "evil.example:8000", False),
    ("127.0.0.1", "127.0.0.1:9000", False), ("127.0.0.1", "127.0.0.1", False), ("127.0.0.1", "", False),
    ("127.0.0.1", "127.0.0.1.nip.io:8000", False), ("::1", "[::1]:8000", True), ("::1", "evil.example:8000", False),
    ("0.0.0.0", "192.168.1.5:8000", True), ("0.0.0.0", "[fe80::1]:8000", True),
    ("0.0.0.0", "evil.example:8000", False), ("0.0.0.0", "192.168.1.5:80", False),
])
def test_only_the_host_it_is_served_under_is_answered(bound, host, answered):
    """Against DNS rebinding: another site's page whose name resolves to 127.0.0.1 sends its own name as Host."""
    from gpt2_common.webapp import build_app, only_served_hosts

    status, body = asgi_get(only_served_hosts(build_app(slow_stream, 32), bound, 8000), "/health", host=host)
    if answered:
        assert status == 200 and json.loads(body)["ok"]
    else:
        assert status == 421 and body.startswith("this server answers only as 127.0.0.1:8000 or ")
        assert f"Host '{host}' refused" in body


def test_the_server_refuses_a_rebound_host(server):
    port = urllib.parse.urlsplit(server).port
    for host, status in ((f"localhost:{port}", 200), (f"evil.example:{port}", 421)):
        request = urllib.request.Request(server + "/health", headers={"Host": host})
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                assert response.status == status
        except urllib.error.HTTPError as err:
            assert err.code == status
            assert err.read().decode().startswith(f"this server answers only as 127.0.0.1:{port} or ")
