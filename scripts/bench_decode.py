#!/usr/bin/env python
"""Decoding speed of both generators beside transformers' generate(), from the same random weights, in one process.

  python scripts/bench_decode.py --config small --batch-sizes 1,4,16 --prompt-tokens 16 --new-tokens 48

Greedy, KV-cached, every prompt --prompt-tokens long and every row --new-tokens long (no early stop). Each framework
first runs once untimed (JAX compiles, the others warm up); then the frameworks take turns, --repeats rounds, so that
a change in the machine's load touches all of them alike; the ratio to transformers is taken within each round.
The tokens of each framework are compared with transformers' (fp32: they must be the same; bf16: the share that
agrees is reported). The load average is printed with each batch size: on a shared machine read the ratios, not the
absolute figures.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpt2_common.bench import bench_parser  # noqa: E402
from gpt2_common.errors import run_cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser(__doc__, repeats=3, config="small", frameworks="jax,torch,hf")
    parser.add_argument("--batch-sizes", default="1,4,16", help="(default: %(default)s)")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="(default: %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=48, help="(default: %(default)s)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    return parser


def generators(names, config, weights, precision):
    """{name: run(prompts, new_tokens) -> int [B, new_tokens]} for the same canonical weights."""
    import numpy as np
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"  # torch and transformers; JAX takes its default device
    runs = {}
    for name in names:
        if name == "jax":
            from gpt2_jax import sample as jax_sample

            model, params = jax_sample.load_model(config, weights, precision)
            runs[name] = lambda prompts, n, model=model, params=params: jax_sample.generate(
                model, params, prompts, n, temperature=0.0)
        elif name == "torch":
            from gpt2_torch import sample as torch_sample

            generate = torch_sample.make_generate(config, weights, device, precision)  # as scripts/sample.py
            runs[name] = lambda prompts, n, generate=generate: generate(prompts, n, temperature=0.0)
        elif name == "hf":
            import transformers

            from gpt2_common.weights import hf_config

            hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config(config.model))).eval()
            state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}
            hf.load_state_dict({**state, "lm_head.weight": state["transformer.wte.weight"]})
            hf = hf.to(device=device, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)

            @torch.inference_mode()
            def run_hf(prompts, n, hf=hf):
                ids = torch.tensor(prompts, device=device)
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, pad_token_id=0)
                return out[:, ids.shape[1]:].cpu().numpy()

            runs[name] = run_hf
        else:
            raise SystemExit(f"unknown framework {name!r}; choose among jax, torch, hf")
    return runs


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)

    import numpy as np
    import torch

    from gpt2_common.config import Config, load_config
    from gpt2_torch.model import GPT as TorchGPT
    from gpt2_torch.weights import to_canonical

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    model_config = load_config(args.config).model
    torch.manual_seed(args.seed)
    weights = to_canonical(TorchGPT(model_config).state_dict(), model_config)  # GPT-2's init, for every framework
    names = args.frameworks.split(",")
    runs = generators(names, Config(model=model_config), weights, args.precision)
    rng = np.random.default_rng(args.seed)
    print(f"{args.config}: {model_config.n_layer} layers, {model_config.n_embd} wide, {args.precision}; prompt "
          f"{args.prompt_tokens} tokens, {args.new_tokens} new, greedy; torch threads {torch.get_num_threads()}; "
          f"{os.cpu_count()} CPUs", flush=True)
    results = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        prompts = rng.integers(0, model_config.vocab_size, (batch, args.prompt_tokens)).tolist()
        load_before = os.getloadavg()[0]
        tokens = {name: np.asarray(run(prompts, args.new_tokens)) for name, run in runs.items()}  # compile, warm up
        seconds = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run(prompts, args.new_tokens)
                seconds[name].append(time.perf_counter() - start)
        load = (load_before, os.getloadavg()[0])
        for name in names:
            record = {"framework": name, "batch": batch, "precision": args.precision,
                      "tokens_per_s": [batch * args.new_tokens / s for s in seconds[name]],
                      "seconds": seconds[name], "load_average": load}
            line = (f"batch {batch:>3} {name:>5}: " + " ".join(f"{t:7.1f}" for t in record["tokens_per_s"])
                    + " tokens/s")
            if "hf" in runs and name != "hf":
                record["vs_hf"] = [h / s for h, s in zip(seconds["hf"], seconds[name])]
                record["same_tokens_as_hf"] = float(np.mean(tokens[name] == tokens["hf"]))
                line += (" | vs transformers " + " ".join(f"{r:.2f}x" for r in record["vs_hf"])
                         + f" | tokens as transformers' {record['same_tokens_as_hf']:.1%}")
            print(line + f" (load {load[0]:.1f} -> {load[1]:.1f})", flush=True)
            results.append(record)
    if args.json:
        Path(args.json).write_text(json.dumps({"config": args.config, "prompt_tokens": args.prompt_tokens,
                                               "new_tokens": args.new_tokens, "results": results}, indent=1))


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
