#!/usr/bin/env python
"""Time to first token of scripts/serve.py, as a browser meets it: the server is started, and each request's time is
measured from sending it to the first piece of text streamed back (the prompt's prefill and one decoding step, plus
HTTP). The first request after start is reported apart from the others.

  python scripts/bench_serve.py --checkpoint runs/shakespeare --framework jax --requests 5
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def first_text(url: str) -> float:
    """Seconds from sending the request to the first text event."""
    start = time.perf_counter()
    with urllib.request.urlopen(url, timeout=600) as response:
        for line in response:
            if line.startswith(b"data: ") and b'"text"' in line:
                return time.perf_counter() - start
    raise RuntimeError(f"no text came back from {url}")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--framework", choices=("jax", "torch"), default="jax")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--prompt", default="ROMEO: What light through yonder window breaks?")
    parser.add_argument("--requests", type=int, default=5)
    args = parser.parse_args(argv)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    server = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "serve.py"), "--checkpoint", args.checkpoint,
                               "--framework", args.framework, "--precision", args.precision, "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        while True:
            try:
                urllib.request.urlopen(base + "/health", timeout=5).read()
                break
            except OSError:
                if server.poll() is not None:
                    raise SystemExit(server.stdout.read())
                time.sleep(0.2)
        ready = time.perf_counter() - start
        query = urllib.parse.urlencode({"prompt": args.prompt, "max_new_tokens": 1, "temperature": 0})
        times = [first_text(f"{base}/generate?{query}") for _ in range(args.requests)]
    finally:
        server.terminate()
        server.wait(timeout=30)
    result = {"framework": args.framework, "precision": args.precision, "ready_s": ready, "first_request_s": times[0],
              "later_requests_s": times[1:], "load_average": os.getloadavg()[0]}
    print(f"{args.framework} {args.precision}: server ready (loaded, compiled) in {ready:.1f} s; time to first token "
          f"{1000 * times[0]:.0f} ms on the first request, then " + ", ".join(f"{1000 * t:.0f}" for t in times[1:])
          + f" ms (load {result['load_average']:.1f})")
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
