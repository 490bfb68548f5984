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
import math
import os
import re
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from gpt2_common.cli import add_config_arguments, path_arg  # noqa: E402
from gpt2_common.errors import run_cli  # noqa: E402

OPS = ("all-reduce", "reduce-scatter", "all-gather", "all-to-all", "collective-permute")
_COLLECTIVE = re.compile(r"=\s*(.*?)\s(" + "|".join(OPS) + r")(?:-start)?\(")
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_ITEM_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s64": 8, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1}
_CALLED = re.compile(r"\b(condition|body|calls|to_apply)=%?([\w.-]+)|\bbranch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


@dataclass(frozen=True)
class Collective:
    op: str
    shapes: tuple[tuple[int, ...], ...]  # the arrays it returns (one, or a tuple of them)
    bytes: int  # of those arrays, on one device
    group: int  # devices in each of its groups
    runs: int  # times a step: the product of the trip counts of the loops around it
    computation: str


def group_size(line: str) -> int:
    """Devices per group, from any of XLA's spellings of replica_groups (or a collective-permute's pairs: 2)."""
    if " collective-permute" in line:
        return 2
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
    if mesh:  # mesh['axis_0'=2,'axis_1'=4] {'axis_1'}: the named axes' sizes
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", mesh[1]))
        return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", mesh[2]))
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line)
    if iota:  # [groups,size]<=[...]
        return int(iota[2])
    explicit = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
    if explicit:
        return len(explicit[1].split(","))
    return 0  # replica_groups={}: every device


def collectives(hlo: str) -> list[Collective]:
    """Every collective of an optimized HLO module's text, with how many times it runs per execution (a loop whose
    trip count XLA does not know counts once; an async collective counts at its -start)."""
    computation, found, callers = None, [], defaultdict(list)  # callee -> [(caller, factor)]
    for line in hlo.splitlines():
        if line and not line.startswith(" "):
            if "{" in line:
                computation = "ENTRY" if line.startswith("ENTRY") else line.split(" ")[0].lstrip("%")
            continue
        trip = _TRIP_COUNT.search(line)
        for key, name, branches in _CALLED.findall(line):
            for callee in [name] if name else re.findall(r"%?([\w.-]+)", branches):
                factor = int(trip[1]) if trip and key in ("body", "condition") else 1
                callers[callee].append((computation, factor))
        match = _COLLECTIVE.search(line)
        if match:
            arrays = [(kind, tuple(int(d) for d in dims.split(",") if d)) for kind, dims in
                      _ARRAY.findall(match[1]) if kind in _ITEM_BYTES]
            found.append((computation, match[2], arrays, group_size(line)))

    runs_cache: dict[str, int] = {"ENTRY": 1}

    def runs(name: str) -> int:
        if name not in runs_cache:
            runs_cache[name] = sum(runs(caller) * factor for caller, factor in callers[name])
        return runs_cache[name]

    return [Collective(op, tuple(shape for _, shape in arrays),
                       sum(_ITEM_BYTES[kind] * math.prod(shape) for kind, shape in arrays), group, runs(name), name)
            for name, op, arrays, group in found]


def compiled_step(trainer) -> str:
    """The optimized HLO text of a trainer's train_step, compiled for a batch of zeros (nothing runs)."""
    t, block_size = trainer.config.train, trainer.config.model.block_size
    ids = np.zeros((t.micro_batch_size, block_size), np.int32)
    batch = trainer.step_batches([(ids, ids)] * t.grad_accum_steps)[0]
    return trainer.train_step.lower(trainer.abstract_state, batch).compile().as_text()


def table(found: list[Collective]) -> str:
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
    parser.add_argument("--json", default=None, type=path_arg, help="also write every collective as JSON to this path")
    args = parser.parse_args()
    # Before jax is imported: a CPU backend then has --devices devices (an accelerator ignores it).
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={args.devices}")
    import jax

    from gpt2_common.config import load_config
    from gpt2_jax.optim import uses_multisteps
    from gpt2_jax.sharding import make_mesh
    from gpt2_jax.step import build_trainer

    config = load_config(args.config, args.overrides)
    trainer = build_trainer(config, make_mesh(config.mesh))
    found = collectives(compiled_step(trainer))
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
