"""Reading a profiler's trace (Chrome trace JSON, as jax.profiler and torch.profiler write it): the device's kernels,
each kernel's kind (matmul, attention, elementwise, reduction, copy, collective, other) from its name, and the
per-step milliseconds by kind and by kernel. Both frameworks' traces, read with the standard library only.

On a GPU the kernels are the events of the device's streams (JAX) or the "kernel" events (PyTorch); on a CPU, which
has no device timeline, they are XLA's thunks or torch's innermost operators on the host threads, each with its self
time. gpt2_jax.hlo names the kind of a JAX kernel more surely, from the compiled instruction that launched it.
"""

from __future__ import annotations

import gzip
import json
import re
from collections import defaultdict
from pathlib import Path

KINDS = ("matmul", "attention", "elementwise", "reduction", "copy", "collective", "other")

# By kernel name, for what no HLO instruction names: cuBLAS/CUTLASS/XLA GEMMs, flash/cuDNN attention, inductor's
# Triton kernels (triton_poi: pointwise, triton_red/per: reductions), memcpy. First match wins.
NAME_KINDS = [
    ("attention", re.compile(r"fmha|flash|attention|sdpa|scaled_dot_product|cudnn", re.I)),
    ("matmul", re.compile(r"gemm|xmma|nvjet|cutlass|matmul|addmm|\bmm\b|aten::mm|aten::bmm|\bdot\b|cublas", re.I)),
    ("collective", re.compile(r"nccl|all-?reduce|all-?gather|reduce-?scatter", re.I)),
    ("reduction", re.compile(r"reduce|reduction|triton_red|triton_per|softmax|norm|sum|amax|amin|argmax", re.I)),
    ("copy", re.compile(r"memcpy|memset|copy|transpose|cat\b", re.I)),
    ("elementwise", re.compile(r"fusion|elementwise|triton_poi|vectorized|unrolled|add|sub|mul|div|exp|log|fill|"
                               r"where|neg|pow|sqrt|tanh|gelu|clamp|lerp|foreach|adam", re.I)),
]

# The lines of a device in an XLA trace that summarise its kernels rather than being kernels.
DERIVED_LINES = {"XLA Modules", "XLA Ops", "XLA TraceMe", "Steps", "TensorFlow Ops", "TensorFlow Name Scope",
                 "Framework Ops", "Framework Name Scope", "Source code", "Launch Stats"}


def kind_of_name(name: str) -> str:
    return next((kind for kind, pattern in NAME_KINDS if pattern.search(name)), "other")


def trace_events(path: Path) -> list[dict]:
    """The events of a trace file (.json, or .json.gz as jax.profiler's perfetto trace)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def kernel_events(events: list[dict]) -> list[dict]:
    """The device's kernels: PyTorch's "kernel" events; on a JAX GPU trace, the events of the GPU's streams; on a
    CPU (no device timeline), the XLA operations or torch operators of the host threads, each with its self time
    (its span less its children's), so that nested operators are counted once."""
    spans = [e for e in events if e.get("ph") == "X" and "dur" in e]
    if any(e.get("cat") == "kernel" for e in spans):
        return [e for e in spans if e.get("cat") == "kernel"]
    process = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    thread = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
              if e.get("ph") == "M" and e.get("name") == "thread_name"}
    devices = {pid for pid, name in process.items() if name.startswith("/device:")}
    if devices:
        on_device = [e for e in spans if e["pid"] in devices]
        line = lambda e: thread.get((e["pid"], e.get("tid")), "")  # noqa: E731
        streams = [e for e in on_device if line(e).startswith("Stream")]
        # Without stream lines, leave out the lines derived from the kernels, which cover the same time again.
        return streams or [e for e in on_device if line(e) not in DERIVED_LINES]
    ops = [e for e in spans if "hlo_op" in e.get("args", {}) or e.get("cat") == "cpu_op"]
    return self_times(ops)


def self_times(spans: list[dict]) -> list[dict]:
    """Copies of the spans whose "dur" is their self time: less the spans nested directly inside them on their
    thread (a while loop's time is its body's operations', an aten::linear's its aten::addmm's)."""
    by_thread = defaultdict(list)
    for e in spans:
        by_thread[(e["pid"], e.get("tid"))].append(dict(e))
    result = []
    for group in by_thread.values():
        group.sort(key=lambda e: (e["ts"], -e["dur"]))
        open_spans: list[dict] = []
        for e in group:
            while open_spans and e["ts"] >= open_spans[-1]["ts"] + open_spans[-1]["total"]:
                open_spans.pop()
            e["total"] = e["dur"]
            if open_spans:
                open_spans[-1]["dur"] -= e["dur"]
            open_spans.append(e)
            result.append(e)
    return result


def summarize(kernels: list[dict], steps: int, wall_s: float, kinds_by_op: dict[str, str] | None = None,
              top: int = 20) -> dict:
    """Per-step milliseconds by kind and by kernel name (trace durations are in microseconds). `kinds_by_op`: the
    kind of each compiled instruction (gpt2_jax.hlo.hlo_kinds), which a kernel's "hlo_op" names; else its name's."""
    by_kind, by_kernel, calls, kernel_kind = defaultdict(float), defaultdict(float), defaultdict(int), {}
    for e in kernels:
        name, op = e["name"], e.get("args", {}).get("hlo_op")
        kind = (kinds_by_op or {}).get(op) or (kinds_by_op or {}).get(name) or kind_of_name(name)
        ms = e["dur"] / 1000 / steps
        by_kind[kind] += ms
        by_kernel[name] += ms
        calls[name] += 1
        kernel_kind[name] = kind
    device_ms = sum(by_kind.values())
    ranked = sorted(by_kernel, key=by_kernel.get, reverse=True)[:top]
    return {
        "steps": steps, "wall_ms_per_step": 1000 * wall_s / steps, "device_ms_per_step": device_ms,
        "busy": device_ms / (1000 * wall_s / steps) if wall_s else None,
        "kinds": {k: by_kind[k] for k in KINDS if k in by_kind},
        "kernels": [{"name": n, "kind": kernel_kind[n], "calls_per_step": calls[n] / steps, "ms_per_step": by_kernel[n]}
                    for n in ranked],
    }
