"""OpenAI's completions API over the decode loop (gpt2_common.batching): `GET /v1/models`, `GET /v1/models/{id}` and
`POST /v1/completions` in OpenAI's shapes, so that the tools that speak to vLLM, llama.cpp's server or OpenAI itself
(the `openai` client among them) speak to this server.

What changes results and is not done here (logprobs, best_of, suffix, penalties, logit_bias) is refused with a 400
that says so; other fields OpenAI defines or a client adds are ignored, as OpenAI's server ignores them. `top_k` is
taken as an extension, as vLLM takes it. Errors are OpenAI's `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from gpt2_common.batching import Job, QueueFull, Row, Sampling, TooLong
from gpt2_common.config import SEED_MAX
from gpt2_common.tokenizer import EOT_TOKEN, get_tokenizer

MIN_TEMPERATURE = 1e-6  # as scripts/sample.py: below it, logits / temperature overflows float32
MAX_STOP = 4  # stop strings a request may give, as OpenAI allows
REFUSED = {  # field -> the value that leaves results as they are
    "logprobs": None, "best_of": 1, "suffix": None, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None,
}


@dataclass(frozen=True)
class Limits:
    """What one request may ask (serve.py's flags)."""

    max_batch: int = 16  # rows decoded together; a request's prompts x n must fit one batch
    max_queue: int = 64  # requests waiting for a batch, past which 429
    max_tokens: int = 1024  # max_tokens a request may ask for
    timeout: float = 300.0  # seconds a request may wait and run
    max_body: int = 1 << 20  # bytes of a request's body, past which 413


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.param, self.code, self.kind, self.headers = status, param, code, kind, headers


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse({"error": {"message": str(err), "type": err.kind, "param": err.param, "code": err.code}},
                        status_code=err.status, headers=err.headers)


def error_event(err: Exception) -> str:
    """An error after a stream has begun, as OpenAI sends one (the openai client raises it)."""
    api = err if isinstance(err, ApiError) else as_api_error(err)
    return _event({"error": {"message": str(api), "type": api.kind, "param": api.param, "code": api.code}})


def as_api_error(err: Exception) -> ApiError:
    if isinstance(err, TooLong):
        return ApiError(503, f"the request was stopped: {err}; ask for fewer max_tokens or try again later",
                        code="timeout", kind="server_error", headers={"Retry-After": "1"})
    lines = str(err).strip().splitlines()
    return ApiError(500, f"generation failed: {type(err).__name__}" + (f": {lines[0][:300]}" if lines else ""),
                    kind="server_error")


def _event(payload) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object, read no further than `limit` bytes."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body is larger than this server's limit of {limit} bytes",
                           code="request_too_large")
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ApiError(400, f"the body is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise ApiError(400, "the body must be a JSON object of the request's fields")
    return value


def _number(body: dict, name: str, kind, default, low, high, low_open: bool = False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise ApiError(400, f"{name} must be {'a number' if kind is float else 'an integer'}, got {json.dumps(value)}",
                       param=name)
    if not (low < value if low_open else low <= value) or not value <= high:
        raise ApiError(400, f"{name} must be in {'(' if low_open else '['}{low}, {high}], got {value}", param=name)
    return kind(value)


def _prompts(body: dict, block_size: int, vocab_size: int) -> list[list[int]]:
    """The prompts as token ids: a string, a list of strings, a list of token ids or a list of those."""
    prompt = body.get("prompt")
    tokenizer = get_tokenizer()
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt or not all(isinstance(p, (str, list)) for p in prompt):
        raise ApiError(400, "prompt must be a string, a list of strings, or token ids (a list of integers, or a list "
                       "of such lists)", param="prompt")
    prompts = []
    for p in prompt:
        if isinstance(p, str):
            tokens = tokenizer.encode_ordinary(p)
        elif all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in p):
            tokens = list(p)
        else:
            raise ApiError(400, f"a prompt of token ids must hold integers in [0, {vocab_size - 1}]", param="prompt")
        if not tokens:  # as GPT-2 starts a text: from <|endoftext|>
            if vocab_size <= EOT_TOKEN:
                raise ApiError(400, "the prompt is empty; this model has no <|endoftext|> to start from",
                               param="prompt")
            tokens = [EOT_TOKEN]
        if max(tokens) >= vocab_size:
            raise ApiError(400, f"the prompt's GPT-2 tokens go up to id {max(tokens)}, but this model's vocabulary "
                           f"has only {vocab_size} tokens", param="prompt")
        if len(tokens) > block_size:
            raise ApiError(400, f"the prompt is {len(tokens)} tokens, longer than this model's context of "
                           f"{block_size}; shorten it", param="prompt", code="context_length_exceeded")
        prompts.append(tokens)
    return prompts


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP:
        raise ApiError(400, f"stop must be a non-empty string or a list of up to {MAX_STOP} of them", param="stop")
    return tuple(stop)


@dataclass
class Asked:
    prompts: list[list[int]]
    rows: list[Row]
    stream: bool
    echo: bool
    include_usage: bool


def parse(body: dict, model_id: str, block_size: int, vocab_size: int, limits: Limits) -> Asked:
    """The rows of a completions request, every field checked; ApiError names the first that is wrong."""
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "model is required: the id /v1/models lists", param="model")
    if model != model_id:
        raise ApiError(404, f"the model '{model}' does not exist; this server serves '{model_id}'", param="model",
                       code="model_not_found")
    for name, neutral in REFUSED.items():
        if body.get(name) not in (None, neutral):
            raise ApiError(400, f"{name} is not supported by this server (it would change the completion); leave "
                           "it out", param=name)
    prompts = _prompts(body, block_size, vocab_size)
    max_tokens = _number(body, "max_tokens", int, 16, 1, limits.max_tokens)
    temperature = _number(body, "temperature", float, 1.0, 0.0, 2.0)
    if 0 < temperature < MIN_TEMPERATURE:
        raise ApiError(400, f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {temperature}",
                       param="temperature")
    top_p = _number(body, "top_p", float, 1.0, 0.0, 1.0, low_open=True)
    top_k = _number(body, "top_k", int, 0, 0, vocab_size)  # an extension, as vLLM's; -1 would be OpenAI-style off
    n = _number(body, "n", int, 1, 1, limits.max_batch)
    if len(prompts) * n > limits.max_batch:
        raise ApiError(400, f"{len(prompts)} prompt(s) x n={n} is {len(prompts) * n} completions, more than this "
                       f"server decodes at once ({limits.max_batch}, serve.py --max-batch)", param="n")
    seed = _number(body, "seed", int, None, 0, SEED_MAX)
    seed = secrets.randbelow(SEED_MAX + 1) if seed is None else seed
    stop = _stop(body)
    stream = body.get("stream") is True
    options = body.get("stream_options") or {}
    rows = [Row(prompt, Sampling(temperature, top_k, top_p, seed, sample), max_tokens, stop)
            for prompt in prompts for sample in range(n)]
    return Asked(prompts, rows, stream, body.get("echo") is True,
                    isinstance(options, dict) and options.get("include_usage") is True)


def completion_routes(batcher, model_id: str, block_size: int, vocab_size: int, limits: Limits) -> list[Route]:
    created = int(time.time())
    model_card = {"id": model_id, "object": "model", "created": created, "owned_by": "gpt2-jax-torch"}
    tokenizer = get_tokenizer()

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [model_card]})

    async def model(request: Request):
        if request.path_params["model"] != model_id:
            return error_response(ApiError(404, f"the model '{request.path_params['model']}' does not exist; this "
                                           f"server serves '{model_id}'", param="model", code="model_not_found"))
        return JSONResponse(model_card)

    async def completions(request: Request):
        try:
            asked = parse(await read_json(request, limits.max_body), model_id, block_size, vocab_size, limits)
            job = Job(asked.rows, asyncio.get_running_loop(), limits.timeout)
            try:
                batcher.submit(job)
            except QueueFull as err:
                raise ApiError(429, f"the server is busy: {err} (serve.py --max-queue); retry in a moment",
                               code="rate_limit_exceeded", kind="rate_limit_error", headers={"Retry-After": "1"})
        except ApiError as err:
            return error_response(err)
        n = len(asked.rows) // len(asked.prompts)
        head = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
                "model": model_id}
        echoed = [tokenizer.decode(asked.prompts[i // n]) if asked.echo else "" for i in range(len(asked.rows))]

        def usage():
            prompt, drawn = sum(map(len, asked.prompts)), sum(row.tokens for row in asked.rows)
            return {"prompt_tokens": prompt, "completion_tokens": drawn, "total_tokens": prompt + drawn}

        def choice(index, text, reason):
            return {"text": text, "index": index, "logprobs": None, "finish_reason": reason}

        if asked.stream:
            async def chunks():
                try:
                    for index, text in enumerate(echoed):
                        if text:
                            yield _event({**head, "choices": [choice(index, text, None)]})
                    finished, failed = 0, False
                    while finished < len(asked.rows) and not failed:
                        # what has come since the last write goes out in one: a client that falls behind (or n
                        # choices a step) costs one write, not one an event
                        events = [await next_event(job, request)]
                        while not job.events.empty():
                            events.append(job.events.get_nowait())
                        sent = []
                        for event in events:
                            if event[0] == "error":
                                sent.append(error_event(event[1]))
                                failed = True
                                break
                            finished += event[0] == "finish"
                            text, reason = (event[2], None) if event[0] == "text" else ("", event[2])
                            sent.append(_event({**head, "choices": [choice(event[1], text, reason)]}))
                        yield "".join(sent)
                    if not failed and asked.include_usage:
                        yield _event({**head, "choices": [], "usage": usage()})
                    yield "data: [DONE]\n\n"
                except ClientGone:
                    pass
                finally:
                    job.cancel()  # the client left (or it is all sent): free the rows

            return StreamingResponse(chunks(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        texts, reasons = list(echoed), [None] * len(asked.rows)
        try:
            while None in reasons:
                event = await next_event(job, request)
                if event[0] == "error":
                    return error_response(as_api_error(event[1]))
                if event[0] == "text":
                    texts[event[1]] += event[2]
                else:
                    reasons[event[1]] = event[2]
        except ClientGone:
            return JSONResponse({}, status_code=499)  # no one reads it
        finally:
            job.cancel()
        return JSONResponse({**head, "choices": [choice(i, t, r) for i, (t, r) in enumerate(zip(texts, reasons))],
                             "usage": usage()})

    return [Route("/v1/models", models), Route("/v1/models/{model:path}", model),
            Route("/v1/completions", completions, methods=["POST"])]


class ClientGone(Exception):
    pass


async def next_event(job: Job, request: Request, poll: float = 0.5):
    """The job's next event; ClientGone once the client has left; a TooLong error once its time is up, even while
    it waits for a batch that has not begun."""
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), timeout=poll)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancel()
                raise ClientGone() from None
            if job.expired():
                job.cancel()
                return ("error", TooLong(f"it waited and ran longer than this server's limit of {job.timeout:g} s "
                                         "a request"))
