"""A local page to try a trained model: a prompt box, the sampling controls, and the completion streamed token by
token as server-sent events (`/generate`). Its requests go to the decode loop (gpt2_common.batching) as the OpenAI
API's do, and are decoded together with them.
"""

from __future__ import annotations

import asyncio
import html
import ipaddress
import json
import socket
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from gpt2_common.batching import Job, QueueFull, Row, Sampling
from gpt2_common.openai_api import ClientGone, Limits, as_api_error, next_event
from gpt2_common.tokenizer import get_tokenizer

MAX_NEW_TOKENS = 1024  # the page's own bound; the server's --max-tokens may set a lower one
MIN_TEMPERATURE = 1e-6  # as scripts/sample.py: below it, logits / temperature overflows float32


@dataclass(frozen=True)
class SampleOptions:
    max_new_tokens: int = 100
    temperature: float = 0.8
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int = 0


def parse_options(query, max_new_tokens: int = MAX_NEW_TOKENS) -> SampleOptions:
    """Reads and checks the controls; a ValueError's message is shown on the page as it is."""
    def number(name, kind, default, low, high):
        raw = query.get(name, "")
        try:
            value = kind(raw) if raw != "" else default
        except ValueError:
            raise ValueError(f"{name} must be a {'whole ' if kind is int else ''}number, got '{raw}'") from None
        if not low <= value <= high:
            raise ValueError(f"{name} must be between {low} and {high}, got {value}")
        return value

    temperature = number("temperature", float, 0.8, 0.0, 5.0)
    if 0 < temperature < MIN_TEMPERATURE:
        raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {temperature}")
    return SampleOptions(
        max_new_tokens=number("max_new_tokens", int, min(100, max_new_tokens), 1, max_new_tokens),
        temperature=temperature,
        top_k=number("top_k", int, 0, 0, 50257),
        top_p=number("top_p", float, 1.0, 0.01, 1.0),
        seed=number("seed", int, 0, 0, 2**31 - 1),
    )


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def page_routes(batcher, block_size: int, title: str = "GPT-2", limits: Limits = Limits(),
                needs_key: bool = False) -> list[Route]:
    """The page, its /generate stream and /health. `needs_key`: the page asks for the API key and sends it."""
    tokenizer = get_tokenizer()
    max_new_tokens = min(MAX_NEW_TOKENS, limits.max_tokens)
    key_field = '<label>API key <input id="api_key" type="password"></label>' if needs_key else ""

    async def page(request: Request):
        return HTMLResponse(PAGE.replace("{{title}}", html.escape(title)).replace("{{block_size}}", str(block_size))
                            .replace("{{max_new_tokens}}", str(max_new_tokens)).replace("{{key_field}}", key_field))

    async def generate(request: Request):
        prompt = request.query_params.get("prompt", "")
        try:
            if not prompt.strip():
                raise ValueError("the prompt is empty: type some text to continue")
            options = parse_options(request.query_params, max_new_tokens)
            tokens = tokenizer.encode_ordinary(prompt)
            sampling = Sampling(options.temperature, options.top_k, options.top_p, options.seed)
            job = Job([Row(tokens[-block_size:], sampling, options.max_new_tokens)], asyncio.get_running_loop(),
                      limits.timeout)
            batcher.submit(job)
        except (ValueError, QueueFull) as err:
            message = str(err) if isinstance(err, ValueError) else f"the server is busy: {err}; try again in a moment"

            async def refuse():
                yield _event({"error": message})
            return StreamingResponse(refuse(), media_type="text/event-stream")

        async def events():
            try:
                if len(tokens) > block_size:
                    yield _event({"notice": f"the prompt is {len(tokens)} tokens; it is cut to the last {block_size} "
                                            f"(the model's context)"})
                while True:
                    event = await next_event(job, request)
                    if event[0] == "error":
                        yield _event({"error": str(as_api_error(event[1]))})
                        return
                    if event[0] == "finish":
                        break
                    yield _event({"text": event[2]})
            except ClientGone:
                return
            finally:
                job.cancel()  # the client left (or all is sent): its row is freed
            yield _event({"done": True})

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def health(request: Request):
        return JSONResponse({"ok": True, "block_size": block_size, "decoding": batcher.decoding,
                             "waiting": len(batcher.waiting)})

    return [Route("/", page), Route("/generate", generate), Route("/health", health)]


def only_served_hosts(app, host: str, port: int):
    """`app`, answering only requests whose Host header names it as it is served: 127.0.0.1, localhost or `host`,
    with `port`; any other gets 421. Against DNS rebinding: a page on another site whose name is made to resolve to
    127.0.0.1 reaches the server, but with its own name in the Host header. Bound to every address (0.0.0.0, ::),
    the server also answers to the machine's name and to any IP address (a literal address cannot be rebound)."""
    wildcard = host in ("0.0.0.0", "::")
    names = {"127.0.0.1", "localhost"} | ({socket.gethostname().lower(), socket.getfqdn().lower()} if wildcard
                                          else {_host_name(host)})

    def served(value: str) -> bool:
        name, value_port = _split_host(value.strip().lower())
        if value_port != str(port) and not (value_port == "" and port == 80):
            return False
        return name in names or (wildcard and _is_address(name.strip("[]")))

    async def guarded(scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            value = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
            if not served(value):
                shown = " or ".join(sorted(f"{name}:{port}" for name in names)) + \
                    (f" or any IP address of this machine, port {port}" if wildcard else "")
                response = PlainTextResponse(f"this server answers only as {shown}; Host '{value}' refused\n",
                                             status_code=421)
                await response(scope, receive, send)
                return
        await app(scope, receive, send)

    return guarded


def _host_name(host: str) -> str:
    """The address the server binds, as a Host header writes it: IPv6 in brackets, names in lower case."""
    return f"[{host}]" if _is_address(host) and ":" in host else host.lower()


def _split_host(value: str) -> tuple[str, str]:
    """'localhost:8000' -> ('localhost', '8000'); '[::1]:8000' -> ('[::1]', '8000'); no port -> (name, '')."""
    if value.startswith("["):
        close = value.find("]")
        return value[:close + 1], value[close + 2:] if value[close + 1:close + 2] == ":" else ""
    name, _, port = value.partition(":")
    return name, port


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{title}}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font: 15px/1.5 system-ui, sans-serif; max-width: 860px; margin: 2em auto; padding: 0 1em; color: #222; }
 h1 { font-size: 1.3em; } textarea { width: 100%; height: 7em; font: 14px monospace; box-sizing: border-box; }
 .controls { display: flex; flex-wrap: wrap; gap: .8em 1.2em; margin: .8em 0; align-items: end; }
 label { display: flex; flex-direction: column; font-size: .85em; color: #555; }
 input { width: 7em; font: inherit; } button { font: inherit; padding: .4em 1.4em; }
 #output { white-space: pre-wrap; font: 14px monospace; background: #f6f6f3; border: 1px solid #ddd;
           padding: 1em; min-height: 8em; } #output .prompt { color: #777; }
 #message { min-height: 1.4em; color: #a33; } #message.notice { color: #775f00; }
</style></head>
<body>
<h1>{{title}}</h1>
<textarea id="prompt" placeholder="Type a prompt (the model's context is {{block_size}} tokens)"></textarea>
<div class="controls">
 <label>max new tokens <input id="max_new_tokens" type="number" value="100" min="1" max="{{max_new_tokens}}"></label>
 <label>temperature <input id="temperature" type="number" value="0.8" step="0.1" min="0" max="5"></label>
 <label>top-k (0: off) <input id="top_k" type="number" value="0" min="0"></label>
 <label>top-p <input id="top_p" type="number" value="1.0" step="0.05" min="0.01" max="1"></label>
 <label>seed <input id="seed" type="number" value="0" min="0"></label>
 {{key_field}}
 <button id="generate">Generate</button> <button id="stop" disabled>Stop</button>
</div>
<div id="message"></div>
<div id="output"></div>
<script>
const $ = (id) => document.getElementById(id);
let controller = null;
function show(text, kind) { $("message").textContent = text; $("message").className = kind || ""; }
async function generate() {
  const params = new URLSearchParams({prompt: $("prompt").value});
  for (const name of ["max_new_tokens", "temperature", "top_k", "top_p", "seed"]) params.set(name, $(name).value);
  show(""); $("output").innerHTML = "";
  const prompt = document.createElement("span"); prompt.className = "prompt"; prompt.textContent = $("prompt").value;
  const completion = document.createElement("span"); completion.id = "completion";
  $("output").append(prompt, completion);
  controller = new AbortController(); $("generate").disabled = true; $("stop").disabled = false;
  try {
    const key = $("api_key") ? $("api_key").value : "";
    const response = await fetch("/generate?" + params,
                                 {signal: controller.signal, headers: key ? {Authorization: "Bearer " + key} : {}});
    if (!response.ok) { show((await response.json()).error.message); prompt.remove(); throw {name: "AbortError"}; }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\\n\\n")) >= 0) {
        const event = JSON.parse(buffer.slice(6, end)); buffer = buffer.slice(end + 2);
        if (event.text !== undefined) {
          completion.textContent += event.text;
          $("output").dataset.events = Number($("output").dataset.events || 0) + 1;  // pieces shown, for tests
        }
        if (event.notice) show(event.notice, "notice");
        if (event.error) { show(event.error); prompt.remove(); }
        if (event.done) $("output").dataset.done = "true";
      }
    }
  } catch (err) { if (err.name !== "AbortError") show("connection lost: " + err); }
  $("generate").disabled = false; $("stop").disabled = true;
}
$("generate").addEventListener("click", generate);
$("stop").addEventListener("click", () => controller && controller.abort());
</script>
</body></html>
"""
