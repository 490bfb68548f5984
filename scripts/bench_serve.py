#!/usr/bin/env python
"""scripts/serve.py under load: aggregate tokens/s of its OpenAI API at 1, 4 and 16 concurrent clients (each sending
streamed completions one after another), and the time to each request's first token. The server is started as a user
starts it; every concurrency is first run twice unmeasured (JAX compiles each batch size and span on first use),
then the concurrencies take turns for --repeats rounds, so that each figure's neighbours ran on the same machine at
the same time; the ratios to one client are the result.

  python scripts/bench_serve.py --checkpoint runs/shakespeare --framework jax --clients 1,4,16
"""

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def completion(connection: http.client.HTTPConnection, body: dict) -> tuple[int, float]:
    """(completion tokens, seconds to the first text) of one completion, on a kept-alive connection as the openai
    client keeps one; not streamed, to the whole answer."""
    start, first, tokens = time.perf_counter(), None, None
    connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    with connection.getresponse() as response:
        if response.status != 200:
            raise RuntimeError(f"{response.status}: {response.read()[:300]}")
        if not body["stream"]:
            return json.loads(response.read())["usage"]["completion_tokens"], time.perf_counter() - start
        for line in response:
            # parsed only where it matters (the first text, the usage, an error): 16 clients parsing every token
            # took CPU from the server they measure, on the same two cores
            if not line.startswith(b"data: {") or (first is not None and b'"usage"' not in line and
                                                   b'"error"' not in line):
                continue
            chunk = json.loads(line[len(b"data: "):])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return tokens, first if first is not None else time.perf_counter() - start


def load(base: str, model: str, clients: int, requests: int, args, seed: int) -> dict:
    """`clients` threads, each sending `requests` completions one after another: aggregate tokens/s over the wall
    time, and the median time to first token."""
    results, errors = [], []

    def client(i):
        connection = http.client.HTTPConnection(urllib.parse.urlsplit(base).netloc, timeout=600)
        try:
            for r in range(requests):
                body = {"model": model, "prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": 0.8,
                        "seed": seed + 1000 * i + r, "stream": not args.whole,
                        "stream_options": {"include_usage": True}}
                results.append(completion(connection, body))
        except Exception as err:  # noqa: BLE001 - reported below, with the others
            errors.append(err)
        finally:
            connection.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if errors:
        raise SystemExit(f"a request failed: {errors[0]}")
    tokens = sum(t for t, _ in results)
    return {"clients": clients, "tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
            "first_token_ms": 1000 * statistics.median(f for _, f in results)}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--framework", choices=("jax", "torch"), default="jax")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--prompt", default="ROMEO: What light through yonder window breaks?")
    parser.add_argument("--clients", default="1,4,16", help="concurrencies, comma-separated (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=64, help="of each completion (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=4, help="completions each client sends one after another "
                        "in a round (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every concurrency (default: %(default)s)")
    parser.add_argument("--whole", action="store_true", help="ask for whole completions, not streamed ones (the "
                        "time to first token is then the time to the answer)")
    parser.add_argument("--json", default=None, help="write the rounds here")
    parser.add_argument("--server-log", default=None, help="write the server's output here (with JAX_LOG_COMPILES=1 "
                        "in the environment: what it compiles, and when)")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.clients.split(",")]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    server = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "serve.py"), "--checkpoint", args.checkpoint,
                               "--framework", args.framework, "--precision", args.precision, "--port", str(port),
                               "--max-batch", str(max(levels)), "--max-queue", str(max(levels))],
                              stdout=open(args.server_log, "w") if args.server_log else subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        while True:
            try:
                urllib.request.urlopen(base + "/health", timeout=5).read()
                break
            except OSError:
                if server.poll() is not None:
                    raise SystemExit(server.stdout.read() if server.stdout else f"serve.py exited: {args.server_log}")
                time.sleep(0.2)
        ready = time.perf_counter() - start
        model = json.loads(urllib.request.urlopen(base + "/v1/models", timeout=60).read())["data"][0]["id"]
        for _ in range(2):  # compiles, unmeasured: each batch size, span and the sizes a batch shrinks to
            for clients in levels:
                load(base, model, clients, args.requests, args, seed=0)
        print(f"-- measured from here ({time.strftime('%H:%M:%S')})", file=open(args.server_log, "a"), flush=True) \
            if args.server_log else None
        rounds = [[load(base, model, clients, args.requests, args, seed=1 + r) for clients in levels]
                  for r in range(args.repeats)]
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(f"{args.framework} {args.precision}: server ready in {ready:.1f} s; {args.requests} "
          f"{'whole' if args.whole else 'streamed'} completion(s) of {args.max_tokens} tokens per client per round, "
          f"{args.repeats} rounds (load {os.getloadavg()[0]:.1f})")
    for i, clients in enumerate(levels):
        rates = [r[i]["tokens_per_s"] for r in rounds]
        ratios = [r[i]["tokens_per_s"] / r[0]["tokens_per_s"] for r in rounds]
        firsts = [r[i]["first_token_ms"] for r in rounds]
        print(f"  {clients:3d} clients: {', '.join(f'{x:.0f}' for x in rates)} tokens/s; "
              f"{', '.join(f'{x:.2f}x' for x in ratios)} one client's in the same round; first token "
              f"{', '.join(f'{x:.0f}' for x in firsts)} ms (median)")
    if args.json:
        Path(args.json).write_text(json.dumps({"ready_s": ready, "rounds": rounds}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
