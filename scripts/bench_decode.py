#!/usr/bin/env python
"""Decoding speed with and without the KV cache, in JAX and PyTorch, from the same random weights.

  python scripts/bench_decode.py --config small --prompt-tokens 16 --new-tokens 64

Each measurement is the second of two identical runs (the first compiles or warms up), greedy, batch 1. Without the
cache, PyTorch runs nanoGPT's loop (the context so far through the model for every token), while JAX runs its
fixed-shape loop (the whole block_size window for every token: one compile for any prompt), so the JAX figure
without the cache falls with block_size; --uncached-new-tokens keeps that run short.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpt2_common.errors import run_cli  # noqa: E402


def timed(run) -> tuple[float, object]:
    run()  # compile / warm up
    start = time.perf_counter()
    out = run()
    return time.perf_counter() - start, out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="small", help="preset or path (default: %(default)s)")
    parser.add_argument("--frameworks", default="jax,torch", help="(default: %(default)s)")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="(default: %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=64, help="(default: %(default)s)")
    parser.add_argument("--uncached-new-tokens", type=int, default=None,
                        help="new tokens for the runs without the cache (default: --new-tokens)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's own choice); on a CPU shared with other work, "
                        "1 can be many times faster than a thread team that waits for a busy core")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from gpt2_common.config import load_config
    from gpt2_torch.model import GPT as TorchGPT
    from gpt2_torch.weights import to_canonical

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    config = load_config(args.config).model
    torch.manual_seed(args.seed)
    weights = to_canonical(TorchGPT(config).state_dict(), config)  # one random init, GPT-2's, for both frameworks
    prompt = np.random.default_rng(args.seed).integers(0, config.vocab_size, args.prompt_tokens).tolist()
    uncached_tokens = args.uncached_new_tokens or args.new_tokens
    print(f"{args.config}: {config.n_layer} layers, {config.n_embd} wide, block {config.block_size}, fp32; "
          f"prompt {args.prompt_tokens} tokens, greedy, batch 1; torch threads {torch.get_num_threads()}")
    runs = {}
    for framework in args.frameworks.split(","):
        if framework == "jax":
            import jax

            from gpt2_jax.model import build_model
            from gpt2_jax.sample import generate_batch
            from gpt2_jax.weights import from_canonical

            model = build_model(config, "fp32")
            params = jax.device_put(from_canonical(weights, config))

            def run(cache, n):
                return generate_batch(model, params, [prompt], n, temperature=0.0, use_cache=cache)
        elif framework == "torch":
            from gpt2_torch.sample import generate_batch
            from gpt2_torch.weights import from_canonical

            model = TorchGPT(config)
            model.load_state_dict(from_canonical(weights, config))
            model.eval()

            def run(cache, n):
                return generate_batch(model, [prompt], n, temperature=0.0, use_cache=cache)
        else:
            raise SystemExit(f"unknown framework {framework!r}")
        for cache, n in ((True, args.new_tokens), (False, uncached_tokens)):
            seconds, out = timed(lambda: run(cache, n))
            runs[(framework, cache)] = out[0].tolist()
            print(f"{framework:>5} {'with' if cache else 'without'} cache: {n} tokens in {seconds:.2f} s = "
                  f"{n / seconds:.1f} tokens/s", flush=True)
    firsts = {key: tokens[:min(args.new_tokens, uncached_tokens)] for key, tokens in runs.items()}
    print("greedy tokens agree across runs:", len({tuple(t) for t in firsts.values()}) == 1)


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
