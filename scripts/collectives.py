#!/usr/bin/env python
"""What crosses devices in one step of the JAX trainer, read from the compiled step (nothing is run): every
collective of the optimized HLO, the bytes of the array it moves on one device, the devices it spans, and how many
times a step it runs (the trip counts of the loops around it: the micro-batch loop, the loss's chunk loop). On a
CPU it compiles for --devices simulated devices, so that a laptop can check a mesh before a job.

  python scripts/collectives.py --config small --devices 8 --set mesh.data=8 train.micro_batch_size=64

Bytes are the array's bytes on one device (for an all-reduce its result, for an all-gather the gathered array),
not the bytes on the wire, which depend on the algorithm: a ring all-reduce sends about twice them.
"""

import argparse
import json
import os
import sys
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpt2_common.cli import add_config_arguments, output_arg  # noqa: E402
from gpt2_common.errors import run_cli  # noqa: E402


def table(found) -> str:
    """gpt2_jax.hlo.collectives' list as Markdown: one row per kind of collective, the largest traffic first."""
    rows = defaultdict(lambda: [0, 0])  # (op, group, runs) -> [count, bytes per run]
    for c in found:
        rows[c.op, c.group, c.runs][0] += 1
        rows[c.op, c.group, c.runs][1] += c.bytes
    lines = ["| collective | devices in a group | runs a step | count | MB a run | MB a step |",
             "| --- | --- | --- | --- | --- | --- |"]
    for (op, group, runs), (count, size) in sorted(rows.items(), key=lambda kv: -kv[1][1] * kv[0][2]):
        lines.append(f"| {op} | {group or 'all'} | {runs} | {count} | {size / 1e6:.3f} | {size * runs / 1e6:.3f} |")
    total = sum(c.bytes * c.runs for c in found)
    looped = sum(c.bytes * c.runs for c in found if c.runs > 1)
    lines.append(f"\nper step: {total / 1e6:.3f} MB, of which {looped / 1e6:.3f} MB in collectives that run more "
                 "than once a step")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices, where there is no "
                        "accelerator (default: %(default)s)")
    parser.add_argument("--json", default=None, type=output_arg("--json"), help="also write every collective as JSON to this path")
    args = parser.parse_args()
    # Before jax is imported: a CPU backend then has --devices devices (an accelerator ignores it).
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={args.devices}")
    import jax

    from gpt2_common.config import load_config
    from gpt2_jax.hlo import collectives
    from gpt2_jax.optim import uses_multisteps
    from gpt2_jax.sharding import make_mesh
    from gpt2_jax.step import build_trainer, compile_on_zeros

    config = load_config(args.config, args.overrides)
    trainer = build_trainer(config, make_mesh(config.mesh))
    found = collectives(compile_on_zeros(trainer).as_text())
    t = config.train
    mesh = ", ".join(f"{k}={v}" for k, v in trainer.mesh.shape.items())
    print(f"{config.name} on {jax.device_count()} {jax.devices()[0].platform} devices ({mesh}), "
          f"{t.grad_accum_steps} micro-batch(es) of {t.micro_batch_size} a step"
          + (" in one call each (multisteps): the figures are one call's" if uses_multisteps(t) else ""))
    print(table(found))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(c) for c in found], indent=1))


if __name__ == "__main__":
    run_cli(main)
