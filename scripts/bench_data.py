#!/usr/bin/env python
"""The shard loader at 10B tokens: opening 100 shards of 100M tokens, the first batch (the epoch's order drawn
with it), 100 batches of `small`'s 512 x 1024, one epoch's order alone, and the process's peak RSS.

  python scripts/bench_data.py                                            # 10B tokens, this checkout's loader
  git show 77e3920:gpt2_common/data.py > /tmp/data_before.py
  python scripts/bench_data.py --shards 10 --baseline /tmp/data_before.py --repeats 2   # beside another data.py

The shards are sparse files (a header as scripts/prepare_data.py writes it, then a hole that reads as token 0), so
10B tokens take no disk. Each loader runs in a fresh process of its own (its peak RSS is its own, and nothing it
imported or cached helps the next), the loaders taking turns, --repeats rounds; on a shared machine read the ratios
of one run, not the absolute figures. `--baseline FILE` is another version of gpt2_common/data.py (with its
TokenLoader), e.g. from `git show`: the loader that read every token at open needs as much memory as the shards
(2 bytes a token), so give it fewer of them.
"""

import argparse
import importlib.util
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpt2_common.bench import bench_parser  # noqa: E402
from gpt2_common.errors import UserError, run_cli  # noqa: E402

THIS_LOADER = Path(__file__).resolve().parent.parent / "gpt2_common" / "data.py"


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser(__doc__, repeats=1)
    parser.add_argument("--shards", type=int, default=100, help="(default: %(default)s)")
    parser.add_argument("--shard-tokens", type=int, default=100_000_000, help="(default: %(default)s)")
    parser.add_argument("--rows", type=int, default=512, help="sequences a batch (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=1024, help="(default: %(default)s)")
    parser.add_argument("--batches", type=int, default=100, help="timed batches after the first (default: "
                        "%(default)s)")
    parser.add_argument("--baseline", default=None, metavar="FILE", help="another gpt2_common/data.py to run beside")
    parser.add_argument("--dir", default=None, help="where the sparse shards are made (and kept; default: a "
                        "temporary folder, removed after)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one measurement, in its own process
    return parser


def make_sparse_shards(directory: Path, shards: int, tokens: int) -> list[Path]:
    """Shards of `tokens` zeros that take no disk; shards already there at the right size are reused."""
    from gpt2_common.data import HEADER_BYTES, shard_header

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(shards):
        path = directory / f"train_{i:06d}.bin"
        size = HEADER_BYTES + 2 * tokens
        if not (path.is_file() and path.stat().st_size == size):
            with open(path, "wb") as f:
                f.write(shard_header(tokens, max_id=0).tobytes())
                f.truncate(size)
            if path.stat().st_blocks * 512 > 2**20:
                path.unlink()
                raise UserError(f"the filesystem of '{directory}' does not make sparse files; give --dir on one "
                                "that does (ext4, xfs, btrfs, tmpfs)")
        paths.append(path)
    return paths


def measure(loader_file: str, paths: list[str], rows: int, seq_len: int, batches: int) -> dict:
    """In a fresh process: the seconds to open, to read the first batch and each batch after it, to draw an epoch's
    order, and the peak RSS (before the loader's module is imported, and after the batches)."""
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    spec = importlib.util.spec_from_file_location("data_under_test", loader_file)
    data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(data)
    start = time.perf_counter()
    loader = data.TokenLoader(paths, rows, seq_len, seed=0, shuffle=True, vocab_size=50257)
    open_s = time.perf_counter() - start
    start = time.perf_counter()
    loader.batch(0)
    first_batch_s = time.perf_counter() - start
    batch_s = []
    for position in range(1, batches + 1):
        start = time.perf_counter()
        loader.batch(position)
        batch_s.append(time.perf_counter() - start)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    loader.window_ids(loader.batches_per_epoch)  # the second epoch's order: drawn once an epoch
    epoch_order_s = time.perf_counter() - start
    return {"open_s": open_s, "first_batch_s": first_batch_s, "batch_s": batch_s,
            "median_batch_s": statistics.median(batch_s), "epoch_order_s": epoch_order_s,
            "windows": loader.num_windows, "peak_rss_bytes": peak_rss, "rss_before_loader_bytes": rss_before}


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(measure(spec["loader"], spec["paths"], args.rows, args.seq_len, args.batches)))
        return
    loaders = {"this checkout": str(THIS_LOADER)}
    if args.baseline:
        if not Path(args.baseline).is_file():
            raise UserError(f"--baseline '{args.baseline}' does not exist; give a copy of gpt2_common/data.py, e.g. "
                            "from git show REV:gpt2_common/data.py > FILE")
        loaders["baseline"] = str(Path(args.baseline).resolve())
    directory = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        paths = [str(p) for p in make_sparse_shards(directory, args.shards, args.shard_tokens)]
        print(f"{args.shards} shards of {args.shard_tokens:,} tokens ({args.shards * args.shard_tokens / 1e9:g}B "
              f"tokens, sparse, in {directory}); batches of {args.rows} x {args.seq_len}; {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
        results = {name: [] for name in loaders}
        for _ in range(args.repeats):
            for name, loader_file in loaders.items():
                child = json.dumps({"loader": loader_file, "paths": paths})
                done = subprocess.run([sys.executable, __file__, "--child", child, *argv], capture_output=True,
                                      text=True)
                if done.returncode:
                    raise UserError(f"the {name} loader failed: {done.stderr.strip().splitlines()[-1:]}")
                result = json.loads(done.stdout)
                results[name].append(result)
                print(f"{name:>13}: open {result['open_s']:7.3f} s | first batch {result['first_batch_s']:6.3f} s | "
                      f"batch {result['median_batch_s'] * 1e3:7.2f} ms (median of {args.batches}) | epoch order "
                      f"{result['epoch_order_s']:6.3f} s ({result['windows']:,} windows) | peak RSS "
                      f"{result['peak_rss_bytes'] / 2**20:7.0f} MiB (before the loader "
                      f"{result['rss_before_loader_bytes'] / 2**20:.0f})", flush=True)
        if args.baseline:
            for key, what in (("open_s", "open"), ("median_batch_s", "batch"), ("peak_rss_bytes", "peak RSS")):
                ratios = [b[key] / t[key] for b, t in zip(results["baseline"], results["this checkout"])]
                print(f"baseline / this checkout, {what}: " + " ".join(f"{r:.2f}x" for r in ratios))
        print(f"load average {os.getloadavg()[0]:.1f}")
        if args.json:
            Path(args.json).write_text(json.dumps({"shards": args.shards, "shard_tokens": args.shard_tokens,
                                                   "rows": args.rows, "seq_len": args.seq_len,
                                                   "loaders": loaders, "results": results}, indent=1))
    finally:
        if not args.dir:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
