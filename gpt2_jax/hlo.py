"""Reading a compiled step's optimized HLO text (gpt2_jax.step.compile_on_zeros(trainer).as_text()): what crosses
devices, and what kind of work each instruction is. Plain text parsing; nothing is compiled or run here.

- `collectives(hlo)`: every collective, the bytes of the array it moves on one device, the devices in its group and
  how many times a step it runs (the trip counts of the loops around it: the micro-batch loop, the loss's chunk
  loop). scripts/collectives.py prints them as a table.
- `hlo_kinds(hlo)`: the kind of every instruction (matmul, attention, reduction, copy, collective, elementwise), by
  instruction name, which a profiler's trace names for each kernel (scripts/profile_step.py, gpt2_common.trace).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass

from gpt2_common.trace import kind_of_name

OPS = ("all-reduce", "reduce-scatter", "all-gather", "all-to-all", "collective-permute")
_COLLECTIVE = re.compile(r"=\s*(.*?)\s(" + "|".join(OPS) + r")(?:-start)?\(")
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_ITEM_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s64": 8, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1}
_CALLED = re.compile(r"\b(condition|body|calls|to_apply)=%?([\w.-]+)|\bbranch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.-]+)\s*=\s*.*?\s([a-z][\w-]*)\(")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.-]+)\s.*\{\s*$")


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


def hlo_kinds(hlo_text: str) -> dict[str, str]:
    """The kind of every instruction of an optimized HLO module, by instruction name: a fusion takes the kind of
    what it computes (a dot makes it a matmul even when elementwise work is fused around it)."""
    bodies: dict[str, list[tuple[str, str, str]]] = defaultdict(list)  # computation -> (name, opcode, line)
    current = None
    for line in hlo_text.splitlines():
        if not line.startswith(" ") and (match := _COMPUTATION.match(line)):
            current = match.group(1)
        elif current and (match := _INSTRUCTION.match(line)):
            bodies[current].append((match.group(1), match.group(2), line))

    def own_kind(opcode: str, line: str, seen: frozenset) -> str:
        if opcode in ("dot", "convolution"):
            return "matmul"
        if opcode == "custom-call":
            target = re.search(r'custom_call_target="([^"]+)"', line)
            return kind_of_name(target.group(1)) if target else "other"
        if opcode == "fusion":
            called = re.search(r"calls=%?([\w.-]+)", line)
            if called and "__triton_gemm" in line:
                return "matmul"
            return computation_kind(called.group(1), seen) if called else "elementwise"
        if opcode in ("reduce", "reduce-window", "scatter", "select-and-scatter", "sort"):
            return "reduction"
        if opcode in ("copy", "transpose", "dynamic-update-slice", "dynamic-slice", "concatenate", "pad", "slice"):
            return "copy"
        if opcode in OPS:
            return "collective"
        return "elementwise"

    def computation_kind(name: str, seen: frozenset = frozenset()) -> str:
        if name in seen:
            return "elementwise"
        kinds = {own_kind(op, line, seen | {name}) for _, op, line in bodies.get(name, [])}
        return next((k for k in ("attention", "matmul", "collective", "reduction", "copy") if k in kinds),
                    "elementwise")

    return {name: own_kind(op, line, frozenset()) for body in bodies.values() for name, op, line in body}
