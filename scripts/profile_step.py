#!/usr/bin/env python
"""Where the training step's device time goes: profiles a few steps of the JAX trainer or the PyTorch reference
(bench.py's steppers: the same steps on the same random batches) and sums the device's kernel time per step by kind
(matmul, attention, elementwise, reduction, copy, other) and by kernel. Prints two tables; --json writes them.

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
import gzip
import json
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from bench import JaxStepper, TorchStepper, random_micro_batches  # noqa: E402 (scripts/ is on sys.path)
from gpt2_common.cli import add_config_arguments, path_arg  # noqa: E402
from gpt2_common.config import load_config  # noqa: E402
from gpt2_common.errors import UserError, run_cli  # noqa: E402

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


_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.-]+)\s*=\s*.*?\s([a-z][\w-]*)\(")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.-]+)\s.*\{\s*$")


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
        if opcode in ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute"):
            return "collective"
        return "elementwise"

    def computation_kind(name: str, seen: frozenset = frozenset()) -> str:
        if name in seen:
            return "elementwise"
        kinds = {own_kind(op, line, seen | {name}) for _, op, line in bodies.get(name, [])}
        return next((k for k in ("attention", "matmul", "collective", "reduction", "copy") if k in kinds),
                    "elementwise")

    return {name: own_kind(op, line, frozenset()) for body in bodies.values() for name, op, line in body}


def trace_events(path: Path) -> list[dict]:
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
    """Per-step milliseconds by kind and by kernel name (trace durations are in microseconds)."""
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


def profile(stepper, steps: int, trace_dir: Path) -> tuple[list[dict], float]:
    """Runs `steps` steps under the framework's profiler; the trace's events and the steps' wall time."""
    if isinstance(stepper, JaxStepper):
        import jax

        with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
            start = time.perf_counter()
            stepper.run(steps)
            wall = time.perf_counter() - start
        return trace_events(next(trace_dir.rglob("perfetto_trace.json.gz"))), wall
    import torch
    from torch.profiler import ProfilerActivity

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        stepper.run(steps)
        wall = time.perf_counter() - start
    path = trace_dir / "torch_trace.json"
    prof.export_chrome_trace(str(path))
    return trace_events(path), wall


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
    parser.add_argument("--trace-dir", default=None, type=path_arg, help="keep the raw trace here (default: a temporary folder)")
    parser.add_argument("--json", default=None, type=path_arg, metavar="PATH", help="also write the summary as JSON")
    parser.add_argument("--hlo", default=None, type=path_arg, metavar="PATH", help="JAX: also write the step's optimized HLO, "
                        "which names every kernel's fusion, to read after the device is gone")
    args = parser.parse_args()
    if args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    if args.hlo and args.framework != "jax":
        raise UserError("--hlo writes the JAX step's HLO; leave it out with --framework torch")

    config = load_config(args.config, args.overrides)
    micro_batches = random_micro_batches(config, np.random.default_rng(0))
    stepper = (JaxStepper(config, micro_batches) if args.framework == "jax"
               else TorchStepper(config, micro_batches, compile=args.compile))
    stepper.run(args.warmup)  # compilation stays out of the profile
    kinds_by_op = None
    if args.framework == "jax":  # the optimized HLO names each kernel's instruction; the compilation is cached
        hlo = stepper.trainer.train_step.lower(stepper.state, stepper.batches[0]).compile().as_text()
        kinds_by_op = hlo_kinds(hlo)
        if args.hlo:
            Path(args.hlo).write_text(hlo)
    with tempfile.TemporaryDirectory() as scratch:
        trace_dir = Path(args.trace_dir or scratch)
        trace_dir.mkdir(parents=True, exist_ok=True)
        events, wall = profile(stepper, args.steps, trace_dir)
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
