#!/usr/bin/env python
"""Bytes per device of parameters, gradients, optimizer state and (estimated) activations for GPT-2 sizes under
data parallel and FSDP, from the JAX trainer's real shardings (jax.eval_shape over an AbstractMesh: nothing is
allocated, so a laptop can plan a 64-GPU job). Prints a Markdown table.

  python scripts/memory_plan.py --configs small medium large xl --devices 8 64 --rows-per-device 8

With --compiled it asks the compiler instead: it compiles (does not run) the real train_step of each config on the
devices here and prints XLA's buffer sizes for one device and the CPU time the compile took; --set changes
the configs as in training:

  python scripts/memory_plan.py --compiled --configs small --set train.batch_size=16 model.loss_chunk_size=0
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpt2_common.config import load_config  # noqa: E402
from gpt2_common.errors import run_cli  # noqa: E402
from gpt2_common.flops import num_params  # noqa: E402


def gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["small", "medium", "large", "xl"])
    parser.add_argument("--devices", nargs="+", type=int, default=[8, 64], help="device counts to plan for")
    parser.add_argument("--rows-per-device", type=int, default=8, help="sequences of block_size per device in a "
                        "micro-batch (default: %(default)s)")
    parser.add_argument("--gpu-gib", type=float, default=80.0, help="memory of one device (default: %(default)s)")
    parser.add_argument("--compiled", action="store_true", help="compile each config's train_step on the devices "
                        "here and print the compiler's buffer sizes")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="config overrides for --compiled, e.g. train.micro_batch_size=8 model.loss_chunk_size=0")
    args = parser.parse_args()
    if args.compiled:
        return print_compiled(args.configs, args.overrides)

    from gpt2_jax.memory import plan

    print(f"| config | params | layout | params | grads | opt state | activations ({args.rows_per_device} rows) "
          f"| total (GiB) | fits {args.gpu_gib:g} GiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.configs:
        for layout, n in [("data parallel", args.devices[0])] + [("FSDP", n) for n in args.devices]:
            data, fsdp = (n, 1) if layout == "data parallel" else (1, n)
            config = load_config(name, ["train.accumulation=scan", "train.batch_size=" + str(args.rows_per_device * n),
                                        "train.micro_batch_size=" + str(args.rows_per_device * n)])
            p = plan(config, data, fsdp)
            fits = "yes" if p.total <= args.gpu_gib * 2**30 else "no"
            label = f"{layout} x{n}" if layout == "FSDP" else "data parallel (any count)"
            print(f"| {name} | {num_params(config.model) / 1e6:.0f}M | {label} | {gib(p.params)} | {gib(p.grads)} | "
                  f"{gib(p.opt_state)} | {gib(p.activations)} | {gib(p.total)} | {fits} |")


def print_compiled(names: list[str], overrides: list[str]) -> None:
    import jax

    from gpt2_jax import sharding
    from gpt2_jax.memory import compiled_step_bytes

    print(f"Compiled for {jax.device_count()} {jax.devices()[0].device_kind} device(s); bytes on one device, GiB; "
          "and the CPU seconds of tracing and compiling it (of loading it, where a compilation cache holds it)")
    print("| config | micro-batch | loss_chunk_size | state + batch | temporaries | total | compile (CPU s) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in names:
        config = load_config(name, overrides)
        started = time.process_time()
        b = compiled_step_bytes(config, sharding.make_mesh(config.mesh))
        cpu = time.process_time() - started
        print(f"| {name} | {config.train.micro_batch_size} x {config.model.block_size} | "
              f"{config.model.loss_chunk_size} | {gib(b.arguments)} | {gib(b.temp)} | {gib(b.arguments + b.temp)} | "
              f"{cpu:.2f} |")


if __name__ == "__main__":
    run_cli(main)
