#!/usr/bin/env python
"""Evaluation speed (validation loss over token shards) of both frameworks beside transformers and beside each
framework's own training step, on the same config and random weights, in one process.

  python scripts/bench_eval.py --config shakespeare --shards data/shakespeare --steps 10 --repeats 2

Evaluation runs gpt2_common.evaluation.loader_loss, as `scripts/evaluate.py --shards` does, over the first --steps
batches of the val shards (train.batch_size x block_size tokens each); transformers scores the same batches with
GPT2LMHeadModel's logits and a per-token cross-entropy. Training runs the trainers' own jitted/eager step on random
batches of the same shape (as scripts/bench.py). Every variant runs once untimed (compilation, warm-up), then the
variants take turns, --repeats rounds. A forward pass is a third of a training step's FLOPs, so evaluation can reach
~3x the training tokens/s; the "eval / train" column is that ratio within each round.
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
    parser = bench_parser(__doc__, repeats=2, config="shakespeare", frameworks="jax,torch,hf")
    parser.add_argument("--shards", required=True, metavar="DIR|GLOB", help="token shards (a directory's val_*)")
    parser.add_argument("--steps", type=int, default=10, help="batches a timed evaluation scores, and steps a timed "
                        "training window runs (default: %(default)s)")
    parser.add_argument("--no-train", action="store_true", help="time evaluation only")
    return parser


def evaluators(names, config, weights, loader, steps):
    """{name: run() -> mean loss over `steps` batches of `loader`}."""
    import numpy as np
    import torch

    from gpt2_common.evaluation import loader_loss

    runs = {}
    for name in names:
        if name in ("jax", "torch"):
            from importlib import import_module

            token_nll = import_module(f"gpt2_{name}.evaluate").token_nll_fn(config, weights)
            runs[name] = lambda token_nll=token_nll: loader_loss(token_nll, loader, steps)
        elif name == "hf":
            import torch.nn.functional as F
            import transformers

            from gpt2_common.weights import hf_config

            hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config(config.model))).eval()
            state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}
            hf.load_state_dict({**state, "lm_head.weight": state["transformer.wte.weight"]})

            @torch.inference_mode()
            def run_hf(hf=hf):
                total, count = 0.0, 0
                for position in range(steps):
                    inputs, targets = (torch.from_numpy(a).long() for a in loader.batch(position))
                    logits = hf(inputs).logits
                    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
                    total, count = total + float(nll.double().sum()), count + nll.numel()
                return total / count

            runs[name] = run_hf
        else:
            raise SystemExit(f"unknown framework {name!r}; choose among jax, torch, hf")
    return runs


def trainers(names, config, steps):
    """{name: run() -> None}: `steps` training steps of each trainer (random batches of the config's shape)."""
    import numpy as np

    from gpt2_common.bench import random_micro_batches

    batches = random_micro_batches(config, np.random.default_rng(0))
    runs = {}
    for name in names:
        if name == "jax":
            from gpt2_jax.stepper import JaxStepper

            runs[name] = JaxStepper(config, batches)
        elif name == "torch":
            from gpt2_torch.stepper import TorchStepper

            runs[name] = TorchStepper(config, batches, compile=False)
    return {name: (lambda stepper=stepper: stepper.run(steps)) for name, stepper in runs.items()}


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)

    import torch

    from gpt2_common.config import load_config
    from gpt2_common.data import TokenLoader
    from gpt2_torch.model import GPT as TorchGPT
    from gpt2_torch.weights import to_canonical

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from evaluate import shard_paths  # the shards scripts/evaluate.py reads

    config = load_config(args.config)
    m, t = config.model, config.train
    torch.manual_seed(t.seed)
    weights = to_canonical(TorchGPT(m).state_dict(), m)
    loader = TokenLoader(shard_paths(args.shards), t.batch_size, m.block_size, shuffle=False,
                         vocab_size=m.vocab_size)
    steps = min(args.steps, loader.batches_per_epoch)
    names = args.frameworks.split(",")
    runs = {f"{name} eval": run for name, run in evaluators(names, config, weights, loader, steps).items()}
    if not args.no_train:
        runs.update({f"{name} train": run for name, run in trainers(names, config, steps).items()})
    tokens = steps * t.batch_size * m.block_size
    print(f"{config.name}: {m.n_layer} layers, {m.n_embd} wide, block {m.block_size}, {t.precision}; {steps} batches "
          f"of {t.batch_size} x {m.block_size}; torch threads {torch.get_num_threads()}; {os.cpu_count()} CPUs",
          flush=True)
    losses = {name: run() for name, run in runs.items() if name.endswith("eval")}  # compile, warm up
    for name, run in runs.items():
        if name.endswith("train"):
            run()
    load_before = os.getloadavg()[0]
    seconds = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    load = (load_before, os.getloadavg()[0])
    results = []
    for name in runs:
        rate = [tokens / s for s in seconds[name]]
        record = {"variant": name, "tokens_per_s": rate, "seconds": seconds[name], "load_average": load}
        line = f"{name:>11}: " + " ".join(f"{r:8,.0f}" for r in rate) + " tokens/s"
        framework = name.split()[0]
        if name.endswith("eval"):
            record["loss"] = losses[name]
            line += f" (loss {losses[name]:.6f})"
            if f"{framework} train" in runs:
                record["vs_train"] = [tr / ev for ev, tr in zip(seconds[name], seconds[f"{framework} train"])]
                line += " | eval / train " + " ".join(f"{r:.2f}x" for r in record["vs_train"])
            if "hf eval" in runs and framework != "hf":
                record["vs_hf"] = [h / s for h, s in zip(seconds["hf eval"], seconds[name])]
                line += " | vs transformers " + " ".join(f"{r:.2f}x" for r in record["vs_hf"])
        print(line, flush=True)
        results.append(record)
    print(f"load average {load[0]:.1f} -> {load[1]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": config.name, "tokens": tokens, "results": results},
                                              indent=1))


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
