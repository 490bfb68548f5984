#!/usr/bin/env python
"""Serve a trained model: a page to try it in the browser, and OpenAI's completions API for the tools and clients
that speak it. Requests that arrive together are decoded together, in batches; each client gets its own stream.

  python scripts/serve.py --checkpoint runs/shakespeare --framework jax   # then open http://127.0.0.1:8000

From Python, with the openai package (pip install openai):

  import openai
  client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")  # or the --api-key
  print(client.completions.create(model="shakespeare", prompt="ROMEO:", max_tokens=40).choices[0].text)

The model's id is the checkpoint's folder name (--model-name), as /v1/models lists it. The server listens on
127.0.0.1 only; to open it to the network, --host 0.0.0.0 with --api-key KEY (or GPT2_API_KEY in the environment):
then /v1/* and /generate answer only requests that carry 'Authorization: Bearer KEY'.
"""

import argparse
import importlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpt2_common.cli import add_checkpoint_arguments  # noqa: E402
from gpt2_common.errors import UserError, as_typed, run_cli  # noqa: E402
from gpt2_common.startup import imports_without_gc  # noqa: E402

DEFAULT_MAX_BATCH = 64  # rows decoded together at most, unless --max-batch says otherwise (memory may say fewer)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    add_checkpoint_arguments(parser, "samples")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind; 127.0.0.1 keeps the server local; "
                        "any other needs --api-key (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: faster where the "
                        "hardware computes in bfloat16, not token-identical to fp32 (default: %(default)s)")
    parser.add_argument("--api-key", default=os.environ.get("GPT2_API_KEY") or None, metavar="KEY",
                        help="answer /v1/* and /generate only with 'Authorization: Bearer KEY' (default: "
                        "$GPT2_API_KEY; none)")
    parser.add_argument("--model-name", default=None, help="the model's id in the API (default: the checkpoint's "
                        "folder name)")
    parser.add_argument("--max-batch", type=int, default=None, help="completions decoded together at most "
                        f"(default: as many as fit half the free memory, at most {DEFAULT_MAX_BATCH})")
    parser.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a batch; more are "
                        "answered 429 with Retry-After (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=1024, help="the most tokens a request may ask for "
                        "(default: %(default)s)")
    parser.add_argument("--request-timeout", type=float, default=300.0, metavar="SECONDS", help="the longest a "
                        "request may wait and run; then it is stopped with an error (default: %(default)s)")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """What can be wrong before the model is read."""
    from gpt2_common.limits import MAX_NEW_TOKENS
    from gpt2_common.server import is_loopback

    if not is_loopback(args.host) and not args.api_key:
        raise UserError(f"--host {args.host} opens the server to the network: give --api-key KEY (or set "
                        "GPT2_API_KEY) so that only clients with the key are answered, or keep --host 127.0.0.1")
    for flag, value, low, high in (("--port", args.port, 1, 65535), ("--max-batch", args.max_batch, 1, 1 << 16),
                                   ("--max-queue", args.max_queue, 0, 1 << 20),
                                   ("--max-tokens", args.max_tokens, 1, MAX_NEW_TOKENS)):
        if value is not None and not low <= value <= high:
            raise UserError(f"{flag} {value} is out of range; it must be in [{low}, {high}]")
    if not 0 < args.request_timeout < float("inf"):
        raise UserError(f"--request-timeout must be a number of seconds above 0, got {args.request_timeout}")


def max_batch(args: argparse.Namespace, model, precision: str) -> int:
    """--max-batch, or as many rows as fit half the free memory (a power of two: JAX pads a batch to one), at most
    DEFAULT_MAX_BATCH; one line if even one row, or the rows asked for, do not fit."""
    from gpt2_common.limits import decode_row_bytes, rows_that_fit, shown_bytes

    row = decode_row_bytes(model, precision, args.max_tokens, slides=True)
    fit = rows_that_fit(row, model, precision)
    asked = args.max_batch or DEFAULT_MAX_BATCH
    padded = 1 << (asked - 1).bit_length()
    if fit >= padded:
        return asked
    if args.max_batch or fit < 1:
        raise UserError(f"{'--max-batch ' + str(asked) if args.max_batch else 'one completion'} needs "
                        f"{shown_bytes(row * padded if args.max_batch else row)} for its cache and buffers (each of "
                        f"up to --max-tokens {args.max_tokens}), more than half the memory free now; "
                        f"{'at most ' + str(1 << (fit.bit_length() - 1)) + ' fit' if fit else 'lower --max-tokens'}")
    return 1 << (fit.bit_length() - 1)


def build(args: argparse.Namespace):
    """The server's app for a checkpoint of any form (JAX, PyTorch or Hugging Face), sampled by --framework in
    --precision. JAX compiles a batch of one here (prompt and completion within 64 tokens); other batch sizes and
    longer spans compile on first use."""
    from gpt2_common.batching import Batcher, Sampling
    from gpt2_common.openai_api import Limits
    from gpt2_common.server import build_server
    from gpt2_formats import read_canonical

    check_args(args)
    config, weights = read_canonical(args.checkpoint)
    limits = Limits(max_batch=max_batch(args, config.model, args.precision), max_queue=args.max_queue,
                    max_tokens=args.max_tokens, timeout=args.request_timeout)
    with imports_without_gc():
        framework = importlib.import_module(f"gpt2_{args.framework}.serving")
    start = framework.make_decoder(config, weights, precision=args.precision)
    warm = start([[0]], [Sampling(temperature=0.0)])  # compile now, not on the first request
    warm.step(), warm.step()
    name = args.model_name or Path(args.checkpoint).name
    return build_server(Batcher(start, limits.max_batch, limits.max_queue), model_id=name,
                        block_size=config.model.block_size, vocab_size=config.model.vocab_size,
                        title=f"GPT-2 · {name} · {args.framework}", limits=limits, api_key=args.api_key), name, limits


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    app, name, limits = build(args)

    import uvicorn

    from gpt2_common.webapp import only_served_hosts

    # only requests addressed to this server by name (127.0.0.1, localhost, --host) are answered: no DNS rebinding
    app = only_served_hosts(app, args.host, args.port)
    url = f"http://{args.host}:{args.port}"
    print(f"serving {as_typed(args.checkpoint)} ({args.framework}) at {url}", flush=True)
    print(f"  the page: {url}/   the OpenAI API: {url}/v1 (model '{name}'), up to {limits.max_batch} completions "
          f"decoded together, {limits.max_queue} requests waiting", flush=True)
    if args.api_key:
        print("  /v1/* and /generate need the API key: 'Authorization: Bearer KEY'", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
