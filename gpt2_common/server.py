"""serve.py's application: the page (gpt2_common.webapp) and OpenAI's completions API (gpt2_common.openai_api) over
one decode loop (gpt2_common.batching), behind an API key when one is set. The host check against DNS rebinding
(webapp.only_served_hosts) goes around all of it, in scripts/serve.py."""

from __future__ import annotations

import hmac
import ipaddress

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gpt2_common.batching import Batcher
from gpt2_common.openai_api import ApiError, Limits, completion_routes, error_response
from gpt2_common.webapp import page_routes

GUARDED = ("/v1/", "/generate")  # what needs the key; the page itself and /health do not (the page asks for it)


def build_server(batcher: Batcher, *, model_id: str, block_size: int, vocab_size: int, title: str = "GPT-2",
                 limits: Limits = Limits(), api_key: str | None = None) -> Starlette:
    async def unknown(request: Request):
        return error_response(ApiError(404, f"there is no {request.url.path} here; this server answers "
                                       "/v1/models and /v1/completions", code="unknown_url"))

    routes = (page_routes(batcher, block_size, title, limits, needs_key=bool(api_key))
              + completion_routes(batcher, model_id, block_size, vocab_size, limits)
              + [Route("/v1/{rest:path}", unknown, methods=["GET", "POST"])])
    app = Starlette(routes=routes)
    return require_key(app, api_key) if api_key else app


def require_key(app, key: str):
    """`app`, answering /v1/* and /generate only to requests that carry `Authorization: Bearer KEY`: 401 for the
    others, in OpenAI's shape. The comparison takes the same time whatever the key sent."""
    expected = key.encode()

    async def guarded(scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] == "http" and (path.startswith(GUARDED[0]) or path == GUARDED[1] or path == "/v1"):
            header = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, given = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), expected):
                response = JSONResponse({"error": {
                    "message": "this server needs its API key: send the header 'Authorization: Bearer KEY' (the key "
                               "serve.py was started with, --api-key or GPT2_API_KEY)",
                    "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}},
                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await app(scope, receive, send)

    return guarded


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server on this machine (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
