#!/usr/bin/env python
"""Where the training step's device time goes: profiles a few steps of the JAX trainer or the PyTorch reference
(gpt2_jax.stepper, gpt2_torch.stepper: the steps that scripts/bench.py times, on the same random batches) and sums
the device's kernel time per step by kind (matmul, attention, elementwise, reduction, copy, other) and by kernel
(gpt2_common.trace reads the trace, gpt2_jax.hlo the JAX step's compiled instructions). Prints two tables; --json
writes them.

  python scripts/profile_step.py --config small --set train.batch_size=32 train.micro_batch_size=32   # on a GPU
  python scripts/profile_step.py --config small --framework torch --compile --set train.batch_size=32 ...

A kernel's kind comes from the compiled program where there is one: for JAX, the optimized HLO instruction that
launched it (a fusion holding a dot is a matmul, one holding a reduce a reduction, cuDNN's fmha custom call is
attention); for PyTorch, and where no instruction is named, from the kernel's name. On a CPU the "kernels" are XLA's
thunks or torch's innermost operators, timed on the host: the shares are rougher than a GPU's, but the tables hold.
"busy" is the summed kernel time over the wall time of the profiled steps: well under 100% on a GPU means gaps
between kernels (launch overhead, host work, synchronisation) that no faster kernel removes.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from gpt2_common.bench import random_micro_batches  # noqa: E402
from gpt2_common.cli import add_config_arguments, output_arg  # noqa: E402
from gpt2_common.config import load_config  # noqa: E402
from gpt2_common.errors import UserError, run_cli  # noqa: E402
from gpt2_common.trace import kernel_events, summarize  # noqa: E402


def table(summary: dict, label: str) -> str:
    device = summary["device_ms_per_step"]
    lines = [f"{label}: {summary['wall_ms_per_step']:.1f} ms a step under the profiler, kernels {device:.1f} ms"
             + (f" (busy {100 * summary['busy']:.0f}%)" if summary["busy"] else ""),
             f"{'kind':<12} {'ms/step':>9} {'share':>7}"]
    for kind, ms in sorted(summary["kinds"].items(), key=lambda kv: -kv[1]):
        lines.append(f"{kind:<12} {ms:>9.2f} {100 * ms / device:>6.1f}%")
    lines += ["", f"{'kernel':<72} {'kind':<11} {'calls':>6} {'ms/step':>9} {'share':>7}"]
    for k in summary["kernels"]:
        name = k["name"] if len(k["name"]) <= 72 else k["name"][:69] + "..."
        lines.append(f"{name:<72} {k['kind']:<11} {k['calls_per_step']:>6g} {k['ms_per_step']:>9.3f} "
                     f"{100 * k['ms_per_step'] / device:>6.1f}%")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--framework", choices=("jax", "torch"), default="jax")
    parser.add_argument("--compile", action="store_true", help="torch.compile the PyTorch step")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: %(default)s)")
    parser.add_argument("--top", type=int, default=20, help="kernels listed (default: %(default)s)")
    parser.add_argument("--trace-dir", default=None, type=output_arg("--trace-dir"), help="keep the raw trace here (default: a temporary folder)")
    parser.add_argument("--json", default=None, type=output_arg("--json"), metavar="PATH", help="also write the summary as JSON")
    parser.add_argument("--hlo", default=None, type=output_arg("--hlo"), metavar="PATH", help="JAX: also write the step's optimized HLO, "
                        "which names every kernel's fusion, to read after the device is gone")
    args = parser.parse_args()
    if args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    if args.hlo and args.framework != "jax":
        raise UserError("--hlo writes the JAX step's HLO; leave it out with --framework torch")

    config = load_config(args.config, args.overrides)
    micro_batches = random_micro_batches(config, np.random.default_rng(0))
    kinds_by_op = None
    if args.framework == "jax":
        from gpt2_jax.hlo import hlo_kinds
        from gpt2_jax.step import compile_on_zeros
        from gpt2_jax.stepper import JaxStepper

        stepper = JaxStepper(config, micro_batches)
        hlo = compile_on_zeros(stepper.trainer).as_text()  # it names each kernel's instruction
        kinds_by_op = hlo_kinds(hlo)
        if args.hlo:
            Path(args.hlo).write_text(hlo)
    else:
        from gpt2_torch.stepper import TorchStepper

        stepper = TorchStepper(config, micro_batches, compile=args.compile)
    stepper.run(args.warmup)  # compilation stays out of the profile
    with tempfile.TemporaryDirectory() as scratch:
        trace_dir = Path(args.trace_dir or scratch)
        trace_dir.mkdir(parents=True, exist_ok=True)
        events, wall = stepper.profile(args.steps, trace_dir)
    summary = summarize(kernel_events(events), args.steps, wall, kinds_by_op, args.top)
    summary.update(framework=args.framework, config=config.name, device=stepper.device_kind,
                   compile=args.compile if args.framework == "torch" else None, overrides=args.overrides)
    t = config.train
    label = (f"{args.framework} on {stepper.device_kind}, {config.name}: {t.batch_size} x {config.model.block_size} "
             f"tokens in {t.grad_accum_steps} micro-batch(es), {t.precision}")
    print(table(summary, label))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    run_cli(main)
