#!/usr/bin/env python
"""Time the training step of the JAX trainer and the PyTorch reference on the same config, in one run.

A step is one optimizer update (forward, backward, optimizer, every micro-batch of it) on batches already on the
device. The frameworks take turns: each repeat times `--steps` steps of every framework in turn, after warm-up and
compilation, so that a machine that slows down mid-run slows them all alike. Reported: the median step time over the
repeats, tokens/s, MFU (6N + attention FLOPs per token over the device's peak; a CPU's peak is a matmul measured
here) and the memory of each variant's step on one device: for JAX the compiler's buffers of the jitted step
(state, batch and temporaries; it runs on the GPU as compiled), for PyTorch the allocator's peak while its own steps
run, less what the other variants hold (several run in one process, and neither allocator counts per variant).

  python scripts/bench.py --config shakespeare --frameworks jax,torch,nanogpt --json bench.json
  python scripts/bench.py --config small --set train.precision=bf16 --compile     # on a GPU

Frameworks: `jax` (gpt2_jax's jitted step), `torch` (gpt2_torch's step: fused AdamW, torch.compile with --compile),
`nanogpt` (the same model as nanoGPT runs it: eager, default AdamW, no compile, the loss over the whole logits).
A framework may carry config overrides of its own after colons, to time variants side by side in one run:

  python scripts/bench.py --config shakespeare --frameworks jax,jax:model.loss_chunk_size=0,torch
"""

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from gpt2_common.bench import interleaved_step_times, random_micro_batches  # noqa: E402
from gpt2_common.cli import add_config_arguments, output_arg  # noqa: E402
from gpt2_common.config import load_config  # noqa: E402
from gpt2_common.errors import UserError, run_cli  # noqa: E402
from gpt2_common.flops import flops_per_token, peak_flops  # noqa: E402

FRAMEWORKS = ("jax", "torch", "nanogpt")


def measured_cpu_peak(seconds: float = 1.0) -> float:
    """FLOP/s of a large fp32 matmul on this CPU (torch's BLAS), the denominator of MFU where no datasheet applies."""
    import torch

    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n ** 3 * count / (time.perf_counter() - start)


def make_stepper(name, config, micro_batches, compile):
    if name == "jax":
        from gpt2_jax.stepper import JaxStepper

        return JaxStepper(config, micro_batches)
    from gpt2_torch.stepper import TorchStepper

    if name == "torch":
        stepper = TorchStepper(config, micro_batches, compile=compile)
    else:  # nanogpt: eager, torch's default (foreach) AdamW, the loss over the whole logits
        nanogpt = dataclasses.replace(config, model=dataclasses.replace(config.model, loss_chunk_size=0))
        stepper = TorchStepper(nanogpt, micro_batches, compile=False, fused=False)
    stepper.name = name
    return stepper


def parse_framework(spec: str) -> tuple[str, list[str]]:
    """"jax:model.loss_chunk_size=0" -> ("jax", ["model.loss_chunk_size=0"])."""
    name, *overrides = spec.split(":")
    if name not in FRAMEWORKS:
        raise UserError(f"unknown framework '{name}' in --frameworks; choose from {', '.join(FRAMEWORKS)}")
    return name, overrides


def benchmark(configs, frameworks, steps: int, warmup: int, repeats: int, compile: bool = False):
    """One result dict per framework spec: the median over `repeats` interleaved windows of `steps` steps.
    configs[i] is the config of frameworks[i] (a spec "name:key=value:..." with its own overrides)."""
    micro_batches = random_micro_batches(configs[0], np.random.default_rng(0))
    steppers = [make_stepper(parse_framework(spec)[0], config, micro_batches, compile)
                for spec, config in zip(frameworks, configs)]
    times = interleaved_step_times(steppers, steps, warmup, repeats)
    cpu_peak = None
    results = []
    for spec, stepper, step_times in zip(frameworks, steppers, times):
        m, t = stepper.config.model, stepper.config.train
        tokens = t.batch_size * m.block_size
        median = statistics.median(step_times)
        peak = peak_flops(stepper.device_kind, t.precision)
        if peak is None and stepper.device_kind.lower() == "cpu":
            cpu_peak = cpu_peak or measured_cpu_peak()
            peak = cpu_peak
        tokens_per_s = tokens / median
        results.append({
            "framework": stepper.name, "variant": parse_framework(spec)[1], "config": stepper.config.name,
            "precision": t.precision, "device": stepper.device_kind, "tokens_per_step": tokens,
            "median_step_s": median, "step_times_s": step_times, "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * flops_per_token(m) / peak if peak else None, "peak_flops": peak,
            "peak_bytes": stepper.peak_bytes(), "compile": compile if stepper.name == "torch" else None,
            "accumulation": t.accumulation if stepper.name == "jax" else None,
            "attention": m.attention if stepper.name == "jax" else "sdpa",
            # torch.compile'd steps use the plain loss (gpt2_torch/model.py says why); nanogpt sets it to 0 itself
            "loss_chunk_size": 0 if stepper.name == "torch" and compile else stepper.config.model.loss_chunk_size,
        })
    return results


def table(results) -> str:
    base = results[0]["tokens_per_s"]
    labels = [":".join([r["framework"], *r["variant"]]) for r in results]
    width = max(10, *map(len, labels))
    lines = [f"{'framework':<{width}} {'step (ms)':>10} {'tokens/s':>12} {'MFU':>7} {'peak mem':>10} {'vs first':>9}"]
    for label, r in zip(labels, results):
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        mem = f"{r['peak_bytes'] / 2**30:.2f} GiB" if r["peak_bytes"] else "-"
        lines.append(f"{label:<{width}} {1000 * r['median_step_s']:>10.1f} {r['tokens_per_s']:>12,.0f} "
                     f"{mfu:>7} {mem:>10} {r['tokens_per_s'] / base:>8.2f}x")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--frameworks", default="jax,torch", help=f"comma-separated, of {', '.join(FRAMEWORKS)}, "
                        "each optionally with :KEY=VALUE overrides of its own (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=5, help="steps in each timed window (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed windows per framework (default: %(default)s)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the PyTorch step")
    parser.add_argument("--json", default=None, type=output_arg("--json"), metavar="PATH", help="also write the results as a JSON list")
    args = parser.parse_args()

    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    if not frameworks:
        raise UserError(f"--frameworks is empty; choose from {', '.join(FRAMEWORKS)}")
    configs = [load_config(args.config, args.overrides + parse_framework(f)[1]) for f in frameworks]
    shapes = {(c.train.batch_size, c.train.micro_batch_size, c.model.block_size, c.model.vocab_size) for c in configs}
    if len(shapes) > 1:
        raise UserError("framework variants must keep the batch and model shapes (they time the same batches); "
                        "override train.batch_size, micro_batch_size, model.block_size or vocab_size with --set")
    results = benchmark(configs, frameworks, args.steps, args.warmup, args.repeats, args.compile)
    config = configs[0]
    t = config.train
    print(f"{config.name}: {t.batch_size} x {config.model.block_size} tokens a step in {t.grad_accum_steps} "
          f"micro-batch(es), {t.precision}, on {results[0]['device']}; median of {args.repeats} x {args.steps} steps")
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    run_cli(main)
