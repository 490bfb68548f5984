#!/usr/bin/env python
"""Try a trained model in the browser: a local page with a prompt box and the sampling controls; the completion is
streamed token by token. The model is loaded and compiled once, at start.

  python scripts/serve.py --checkpoint runs/shakespeare --framework jax --port 8000   # then open http://127.0.0.1:8000
"""

import argparse
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpt2_common.cli import add_checkpoint_arguments  # noqa: E402
from gpt2_common.errors import as_typed, run_cli  # noqa: E402


def build(checkpoint: str, framework: str, precision: str = "fp32"):
    """The page's app for a checkpoint of any form (JAX, PyTorch or Hugging Face), sampled by `framework` in
    `precision` (fp32 or bf16). JAX compiles the first cache span here (prompt and completion within 64 tokens);
    a longer one compiles its next span on first use."""
    from gpt2_common.webapp import SampleOptions, build_app
    from gpt2_formats import read_canonical

    config, weights = read_canonical(checkpoint)
    sample = importlib.import_module(f"gpt2_{framework}.sample")
    stream = sample.make_stream(config, weights, precision=precision)
    for _ in stream([0], SampleOptions(max_new_tokens=2, temperature=0.0)):  # compile now, not on the first visit
        pass
    return build_app(stream, config.model.block_size, title=f"GPT-2 · {Path(checkpoint).name} · {framework}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(parser, "samples")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind; 127.0.0.1 keeps the page local "
                        "(default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: faster where the "
                        "hardware computes in bfloat16, not token-identical to fp32 (default: %(default)s)")
    args = parser.parse_args()

    import uvicorn

    from gpt2_common.webapp import only_served_hosts

    # only requests addressed to this server by name (127.0.0.1, localhost, --host) are answered: no DNS rebinding
    app = only_served_hosts(build(args.checkpoint, args.framework, args.precision), args.host, args.port)
    print(f"serving {as_typed(args.checkpoint)} ({args.framework}) at http://{args.host}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    run_cli(main)
