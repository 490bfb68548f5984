"""scripts/serve.py: its app, built as the script builds it, served by uvicorn on 127.0.0.1 (a free port) in this
process, one server for the module; driven over HTTP, with the real `openai` client, and in a real headless browser
(Debian's chromium through playwright). Where a test needs the decode loop to hold still (a full queue, a client
that leaves mid-stream), a stand-in model whose steps the test releases one by one makes it deterministic."""

import asyncio
import importlib.util
import json
import shutil
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from gpt2_common.batching import Batcher
from gpt2_common.errors import UserError
from gpt2_common.openai_api import Limits
from gpt2_common.server import build_server
from gpt2_common.tokenizer import get_tokenizer

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "ROMEO:\nBut soft, what light"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
openai = pytest.importorskip("openai", reason="the openai client is a test dependency: pip install '.[test]'")


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "scripts" / f"{name}.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """An ASGI app served by uvicorn in a thread of this process, at self.url; behind serve.py's host check when
    `host_check` (it needs the port)."""

    def __init__(self, app, host_check: bool = False):
        import uvicorn

        from gpt2_common.webapp import only_served_hosts

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = only_served_hosts(app, "127.0.0.1", self.port) if host_check else app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            assert self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)

    def close(self):
        self.server.should_exit = True
        self.thread.join()


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
def served(checkpoint):
    """serve.py's app for the tiny checkpoint (JAX), as `serve.py --checkpoint ... --max-batch 4` builds it, behind
    its host check."""
    serve = load_script("serve")
    args = serve.build_parser().parse_args(["--checkpoint", str(checkpoint), "--max-batch", "4", "--max-tokens",
                                            "64"])
    app, name, limits = serve.build(args)
    assert name == "tiny_hf" and limits.max_batch == 4
    served = Served(app, host_check=True)
    yield served, app
    served.close()


@pytest.fixture(scope="module")
def server(served):
    return served[0].url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=600)


def sample_py(checkpoint, max_new_tokens, prompt=PROMPT, *flags):
    """scripts/sample.py's completions (the prompt cut off), greedy unless flags say otherwise, run in this process
    as its command line would run it."""
    sample = load_script("sample")
    args = sample.build_parser().parse_args(["--checkpoint", str(checkpoint), "--framework", "jax", "--prompt",
                                             prompt, "--temperature", "0", "--top-k", "0", "--max-new-tokens",
                                             str(max_new_tokens), *flags])
    texts = list(sample.completions(args))
    assert all(text.startswith(prompt) for text in texts)
    return [text[len(prompt):] for text in texts]


# --- OpenAI's completions API, with the openai client ----------------------------------------------------------------

def test_models_lists_the_checkpoint(client):
    assert [m.id for m in client.models.list().data] == ["tiny_hf"]
    assert client.models.retrieve("tiny_hf").id == "tiny_hf"


def test_a_greedy_completion_is_sample_py_s_streamed_or_not(client, checkpoint):
    expected = sample_py(checkpoint, 12)[0]
    whole = client.completions.create(model="tiny_hf", prompt=PROMPT, max_tokens=12, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].text == expected
    assert whole.choices[0].finish_reason == "length" and whole.choices[0].index == 0
    prompt_tokens = len(get_tokenizer().encode_ordinary(PROMPT))
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == \
        (prompt_tokens, 12, prompt_tokens + 12)
    chunks = list(client.completions.create(model="tiny_hf", prompt=PROMPT, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "text_completion" for c in chunks) and chunks[-1].usage.completion_tokens == 12
    pieces = [c.choices[0] for c in chunks if c.choices]
    assert "".join(p.text for p in pieces) == expected and len(pieces) > 5  # token by token
    assert [p.finish_reason for p in pieces][-1] == "length" and {p.finish_reason for p in pieces[:-1]} == {None}


def test_n_choices_and_lists_of_prompts_draw_as_sample_py_s_samples(client, checkpoint):
    """Choice i of a seeded request draws what sample.py's sample i draws with that seed (each row its own key),
    whatever else shares its batch."""
    expected = sample_py(checkpoint, 10, PROMPT, "--temperature", "1", "--seed", "7", "--num-samples", "2")
    assert expected[0] != expected[1]
    out = client.completions.create(model="tiny_hf", prompt=[PROMPT, "JULIET:"], n=2, max_tokens=10, temperature=1,
                                    seed=7)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.text for c in out.choices[:2]] == expected
    assert out.usage.completion_tokens == 40
    assert out.usage.prompt_tokens == len(get_tokenizer().encode_ordinary(PROMPT + "JULIET:"))


def test_a_stop_string_ends_the_completion_before_it(client):
    text = client.completions.create(model="tiny_hf", prompt=PROMPT, max_tokens=20, temperature=0).choices[0].text
    stop = text[6:9]
    cut = text[:text.index(stop)]
    for stream in (False, True):
        out = client.completions.create(model="tiny_hf", prompt=PROMPT, max_tokens=20, temperature=0,
                                        stop=[stop, "never"], stream=stream)
        choices = [c.choices[0] for c in out if c.choices] if stream else out.choices
        assert "".join(c.text for c in choices) == cut and choices[-1].finish_reason == "stop"


@pytest.mark.parametrize("fields, status, message", [
    ({"model": "gpt-4"}, 404, "the model 'gpt-4' does not exist; this server serves 'tiny_hf'"),
    ({"logprobs": 3}, 400, "logprobs is not supported by this server (it would change the completion); leave it out"),
    ({"best_of": 2}, 400, "best_of is not supported by this server"),
    ({"suffix": "x"}, 400, "suffix is not supported by this server"),
    ({"max_tokens": 65}, 400, "max_tokens must be in [1, 64], got 65"),
    ({"temperature": -1}, 400, "temperature must be in [0.0, 2.0], got -1"),
    ({"seed": 2**40}, 400, "seed must be in [0, 4294967295], got 1099511627776"),
    ({"n": 3, "prompt": ["a", "b"]}, 400, "2 prompt(s) x n=3 is 6 completions, more than this server decodes at once "
                                          "(4, serve.py --max-batch)"),
    ({"prompt": "x" * (2 << 20)}, 413, "the request body is larger than this server's limit of 1048576 bytes"),
    ({"prompt": " word" * 40}, 400, "the prompt is 40 tokens, longer than this model's context of 32; shorten it"),
])
def test_bad_requests_get_openai_s_error_shape(client, fields, status, message):
    body = {"model": "tiny_hf", "prompt": "hi", **fields}
    with pytest.raises(openai.APIStatusError) as error:
        client.completions.create(**{k: body.pop(k) for k in ("model", "prompt")}, extra_body=body)
    assert error.value.status_code == status and error.value.body["message"].startswith(message)
    assert set(error.value.body) == {"message", "type", "param", "code"}


def test_fields_openai_defines_or_a_client_adds_are_ignored(client):
    out = client.completions.create(model="tiny_hf", prompt="hi", max_tokens=2, temperature=0, user="me",
                                    extra_body={"something_new": 1, "presence_penalty": 0})
    assert out.usage.completion_tokens == 2


# --- the decode loop: a full queue, a client that leaves, the API key; with a stand-in model -------------------------

THE = 262  # ' the'


class GatedBatch:
    """A stand-in RowBatch: each step waits until the test releases it; rows draw ' the'."""

    def __init__(self, gate, prompts):
        self.gate, self.rows, self.freed, self.named = gate, list(range(len(prompts))), [], len(prompts)
        gate.batches.append(self)

    def add(self, prompts, sampling):
        names = list(range(self.named, self.named + len(prompts)))
        self.rows, self.named = self.rows + names, self.named + len(prompts)
        return names

    def step(self):
        assert self.gate.acquire(timeout=600), "the test never released a step"
        self.gate.steps += 1
        return [THE] * len(self.rows)

    def free(self, rows):
        self.freed += list(rows)
        self.rows = [r for r in self.rows if r not in rows]


class Gate(threading.Semaphore):
    def __init__(self):
        super().__init__(0)
        self.batches, self.steps = [], 0


def wait_until(condition, what):
    for _ in range(60_000):  # counted, not timed: each wait is short, and a busy machine only takes longer
        if condition():
            return
        time.sleep(0.01)
    pytest.fail(f"never: {what}")


@pytest.fixture
def gated():
    gate = Gate()
    batcher = Batcher(lambda prompts, sampling: GatedBatch(gate, prompts), max_batch=4, max_queue=2)
    limits = Limits(max_batch=4, max_queue=2, max_tokens=100_000)
    app = Served(build_server(batcher, model_id="fake", block_size=32, vocab_size=50257, limits=limits,
                              api_key="sesame"))
    yield gate, batcher, app
    gate.release(10**6)
    app.close()


def test_requests_join_a_running_batch_where_there_is_room_and_past_the_queue_bound_get_429(gated):
    gate, batcher, app = gated
    client = openai.OpenAI(base_url=app.url + "/v1", api_key="sesame", max_retries=0, timeout=600)
    results = {}

    def ask(name, n, max_tokens):
        out = client.completions.create(model="fake", prompt="hi", n=n, max_tokens=max_tokens)
        results[name] = [c.text for c in out.choices]

    def start(name, n, max_tokens):
        thread = threading.Thread(target=ask, args=(name, n, max_tokens))
        thread.start()
        return thread

    threads = [start("first", 2, 3)]
    wait_until(lambda: batcher.decoding == 2, "the first request decodes")
    gate.release()  # its first token
    threads.append(start("joins", 2, 2))
    wait_until(lambda: len(batcher.waiting) == 1, "the second request waits for the step to end")
    gate.release()  # the first's second token; then the second request joins: its 2 rows and the 2 fit the 4
    wait_until(lambda: batcher.decoding == 4, "the second request joins the running batch")
    threads += [start("waits", 1, 1), start("waits too", 1, 1)]  # no room: they wait
    wait_until(lambda: len(batcher.waiting) == 2, "two requests wait")
    with pytest.raises(openai.RateLimitError) as refused:
        client.completions.create(model="fake", prompt="hi", max_tokens=2)
    assert refused.value.response.headers["retry-after"] == "1"
    assert refused.value.body["message"].startswith("the server is busy: 2 requests are waiting")
    gate.release(2)  # the first ends, the two waiting join in its place; then all the others end
    for thread in threads:
        thread.join()
    assert results == {"first": [" the the the"] * 2, "joins": [" the the"] * 2, "waits": [" the"],
                       "waits too": [" the"]}
    assert len(gate.batches) == 1 and gate.batches[0].named == 6 and gate.steps == 4


@pytest.mark.parametrize("path", ["/v1/completions", "/generate"])
def test_a_client_that_leaves_frees_its_row(gated, path):
    gate, batcher, app = gated
    if path == "/generate":
        query = urllib.parse.urlencode({"prompt": "hi", "max_new_tokens": 1024, "temperature": 0})
        request = urllib.request.Request(f"{app.url}/generate?{query}", headers={"Authorization": "Bearer sesame"})
        response = urllib.request.urlopen(request, timeout=600)
        gate.release()
        assert response.readline().startswith(b'data: {"text"')
    else:
        client = openai.OpenAI(base_url=app.url + "/v1", api_key="sesame", max_retries=0, timeout=600)
        response = client.completions.create(model="fake", prompt="hi", max_tokens=50_000, stream=True)
        gate.release()
        assert next(iter(response)).choices[0].text == " the"
    response.close()  # the Stop button, a closed tab, a killed client
    for _ in range(1000):  # far fewer steps than the tokens asked for: the row is freed, the batch over
        if batcher.idle():
            break
        taken = gate.steps
        gate.release()
        wait_until(lambda: gate.steps > taken or batcher.idle(), "the step is taken")
    assert batcher.idle() and gate.batches[0].freed == [0] and gate.steps < 1000


def test_with_a_key_only_requests_that_carry_it_are_answered(gated):
    gate, batcher, app = gated
    gate.release(10**6)
    wrong = openai.OpenAI(base_url=app.url + "/v1", api_key="wrong", max_retries=0, timeout=600)
    with pytest.raises(openai.AuthenticationError) as refused:
        wrong.models.list()
    assert refused.value.body["code"] == "invalid_api_key"
    for path in ("/v1/models", "/generate?prompt=hi"):  # no key at all
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(app.url + path, timeout=600)
        assert refused.value.code == 401 and refused.value.headers["WWW-Authenticate"] == "Bearer"
    client = openai.OpenAI(base_url=app.url + "/v1", api_key="sesame", max_retries=0, timeout=600)
    assert client.completions.create(model="fake", prompt="hi", max_tokens=1).choices[0].text == " the"
    with urllib.request.urlopen(app.url + "/", timeout=600) as page:  # the page asks for the key itself
        assert 'id="api_key"' in page.read().decode()


def test_a_request_past_its_time_limit_is_stopped(gated):
    gate, batcher, app = gated
    batcher_limits = Limits(max_batch=4, max_queue=2, max_tokens=100, timeout=0.5)
    quick = Served(build_server(batcher, model_id="fake", block_size=32, vocab_size=50257, limits=batcher_limits))
    try:
        client = openai.OpenAI(base_url=quick.url + "/v1", api_key="x", max_retries=0, timeout=600)
        with pytest.raises(openai.APIStatusError) as stopped:  # no step is released: it can only run out of time
            client.completions.create(model="fake", prompt="hi", max_tokens=5)
        assert stopped.value.status_code == 503 and stopped.value.body["code"] == "timeout"
    finally:
        gate.release(10**6)
        quick.close()


def test_serve_py_refuses_the_network_without_a_key_and_bad_limits(capsys, monkeypatch):
    serve = load_script("serve")
    monkeypatch.delenv("GPT2_API_KEY", raising=False)
    for flags, message in (
        (["--host", "0.0.0.0"], "--host 0.0.0.0 opens the server to the network: give --api-key KEY (or set "
                                "GPT2_API_KEY) so that only clients with the key are answered, or keep --host "
                                "127.0.0.1"),
        (["--max-batch", "0"], "--max-batch 0 is out of range; it must be in [1, 65536]"),
        (["--max-tokens", "99999999999"], "--max-tokens 99999999999 is out of range; it must be in [1, 1000000]"),
    ):
        with pytest.raises(UserError) as refused:
            serve.check_args(serve.build_parser().parse_args(["--checkpoint", "x", *flags]))
        assert str(refused.value) == message
    monkeypatch.setenv("GPT2_API_KEY", "k")
    serve.check_args(serve.build_parser().parse_args(["--checkpoint", "x", "--host", "0.0.0.0"]))


# --- the page and its /generate stream -------------------------------------------------------------------------------

def events(url, **query):
    with urllib.request.urlopen(url + "/generate?" + urllib.parse.urlencode(query), timeout=600) as response:
        body = response.read().decode()
    return [json.loads(chunk[len("data: "):]) for chunk in body.split("\n\n") if chunk.startswith("data: ")]


def completion(url, **query):
    return "".join(e.get("text", "") for e in events(url, **query))


def test_bad_input_is_answered_and_the_server_keeps_serving(server):
    assert events(server, prompt="   ") == [{"error": "the prompt is empty: type some text to continue"}]
    assert events(server, prompt="x", top_p="2")[0]["error"] == "top_p must be between 0.01 and 1.0, got 2.0"
    assert "must be a whole number" in events(server, prompt="x", max_new_tokens="many")[0]["error"]
    assert events(server, prompt="x", max_new_tokens="65")[0]["error"] == "max_new_tokens must be between 1 and 64, " \
                                                                          "got 65"  # serve.py --max-tokens 64
    long = events(server, prompt=" word" * 100, max_new_tokens=3, temperature=0)
    assert long[0] == {"notice": "the prompt is 100 tokens; it is cut to the last 32 (the model's context)"}
    assert long[-1] == {"done": True}


def test_requests_at_once_each_come_back_whole(server):
    results = [None] * 3

    def ask(i):
        results[i] = completion(server, prompt=PROMPT, max_new_tokens=8, temperature=0)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert results[0] == results[1] == results[2] and results[0]


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
    assert shown == sample_py(checkpoint, 20)[0]
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


# --- hostile input (issue 19, item 9): the app itself, called as uvicorn calls it, with models that misbehave ----

class ListBatch:
    """A stand-in RowBatch that draws tokens 300, 301, ... a step each 20 ms, as a small model might (or fails at its
    second step)."""

    def __init__(self, prompts, fail=False):
        self.rows, self.fail, self.steps = list(range(len(prompts))), fail, 0

    def add(self, prompts, sampling):
        names = list(range(max(self.rows, default=-1) + 1, max(self.rows, default=-1) + 1 + len(prompts)))
        self.rows += names
        return names

    def step(self):
        time.sleep(0.02)
        self.steps += 1
        if self.fail and self.steps == 2:
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return [299 + self.steps] * len(self.rows)

    def free(self, rows):
        self.rows = [r for r in self.rows if r not in rows]


def fake_app(fail=False, title="GPT-2"):
    batcher = Batcher(lambda prompts, sampling: ListBatch(prompts, fail), max_batch=4, max_queue=4)
    return build_server(batcher, model_id="fake", block_size=32, vocab_size=50257, title=title), batcher


def asgi_get(app, path, query="", host="127.0.0.1:8000", leave_after_events=None):
    """(status, body) of a GET, sent to the ASGI app directly; the client leaves once `leave_after_events` pieces of
    the body have been sent (counted, not timed: a busy machine changes when, not what)."""
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

    asyncio.run(run())
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body").decode()


def test_the_checkpoint_name_is_escaped_in_the_page():
    status, body = asgi_get(fake_app(title="<script>alert(1)</script>")[0], "/")
    assert status == 200 and "<script>alert" not in body
    assert body.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 2  # <title> and <h1>


def test_a_client_leaving_mid_stream_is_quiet_and_frees_the_model():
    app, batcher = fake_app()
    status, body = asgi_get(app, "/generate", "prompt=hi&max_new_tokens=1000", leave_after_events=1)
    assert status == 200 and body.startswith('data: {"text"') and '"done"' not in body
    wait_until(batcher.idle, "the row is freed")
    status, body = asgi_get(app, "/generate", "prompt=hi&max_new_tokens=3")  # the model is free again
    assert body.endswith('data: {"done": true}\n\n') and body.count('"text"') == 3


def test_a_failing_generation_sends_an_error_event(capsys):
    status, body = asgi_get(fake_app(fail=True)[0], "/generate", "prompt=hi")
    assert status == 200
    assert body.endswith('data: {"error": "generation failed: RuntimeError: probability tensor contains either '
                         '`inf`, `nan` or element < 0"}\n\n')
    assert "warning: generation failed: RuntimeError" in capsys.readouterr().err
    assert asgi_get(fake_app()[0], "/generate", "prompt=hi&temperature=1e-45")[1] == \
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
    from gpt2_common.webapp import only_served_hosts

    status, body = asgi_get(only_served_hosts(fake_app()[0], bound, 8000), "/health", host=host)
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
