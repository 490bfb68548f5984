#!/usr/bin/env python
"""How fast bad input is answered: every row of README.md's bad-input table, and every script's --help, timed as
a user runs them (a new process each time), in a copy of the repository set up as the README's rows expect.

  python scripts/bench_errors.py                      # a fresh copy in a temporary folder; 5 runs of each
  python scripts/bench_errors.py --repeats 9 --json errors.json

The copy gets what the rows name: data/shakespeare (prepare_data.py), runs/shakespeare and runs/shakespeare-torch
(30 steps, a checkpoint every 15, as tests/test_readme.py trains them), shakespeare.pt (convert.py), empty/train.bin
(a shard of no tokens) and bad.bin (100 bytes). Each row must exit with status 2; its line is compared with the README's (a mismatch is
reported, not timed away). The figure is the median wall time of the runs, the process's start included.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpt2_common.bench import bench_parser  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# The runs the rows refer to, trained as tests/test_readme.py trains them (run-control keys only).
SHORTEN = ["--sample-tokens", "0", "--set", "train.max_steps=30", "train.eval_interval=15", "train.save_interval=15",
           "train.eval_steps=2", "train.log_interval=10"]
SETUP = ["python scripts/prepare_data.py --source shakespeare --out data/shakespeare",
         "python scripts/train_jax.py --config shakespeare", "python scripts/train_torch.py --config shakespeare",
         "python scripts/convert.py runs/shakespeare shakespeare.pt --to torch"]


def bad_input_rows(readme: str) -> list[tuple[str, str, str]]:
    """(case, command, message) of each row of README.md's bad-input table (tests/test_readme.py runs them too)."""
    table = readme.split("Bad input gets one line", 1)[1].split("\n\n", 2)[1]
    rows = []
    for line in table.splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        rows.append((cells[0], cells[1].strip("`"), cells[2].strip("`")))
    return rows


def command_line(command: str, base_env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """A README command as argv and environment: `VAR=value` prefixes go to the environment, `python` becomes this
    interpreter."""
    words, env = shlex.split(command), dict(base_env)
    while "=" in words[0] and not words[0].startswith("-"):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    return [sys.executable, *words[1:]], env


def copy_repository(target: Path) -> Path:
    """The files git tracks (or would), as a fresh clone has them."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
    return target


def set_up(workdir: Path, env: dict[str, str]) -> None:
    import numpy as np

    from gpt2_common.data import write_shard

    for command in SETUP:
        words, _ = command_line(command, env)
        if "train_" in command:
            words[2:2] = SHORTEN
        print(f"setting up: {command}", file=sys.stderr)
        subprocess.run(words, cwd=workdir, env=env, check=True, capture_output=True)
    write_shard(workdir / "empty" / "train.bin", np.zeros(0, np.int64))
    (workdir / "bad.bin").write_bytes(b"\0" * 100)


def time_command(words: list[str], env: dict[str, str], cwd: Path, repeats: int) -> tuple[list[float], int, str]:
    seconds, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = subprocess.run(words, cwd=cwd, env=env, capture_output=True, text=True)
        seconds.append(time.perf_counter() - start)
    return seconds, result.returncode, result.stderr


def main() -> None:
    parser = bench_parser(__doc__, repeats=5)
    parser.add_argument("--workdir", default=None, help="a copy already set up by an earlier run (default: a new one "
                        "in a temporary folder, removed at the end)")
    args = parser.parse_args()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    env.pop("XLA_FLAGS", None)
    temporary = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_errors_")).resolve()
    try:
        if not (workdir / "runs" / "shakespeare-torch").is_dir():
            set_up(copy_repository(workdir), env)
        results = []
        for case, command, message in bad_input_rows((workdir / "README.md").read_text(encoding="utf-8")):
            if command.startswith("("):
                continue  # a row that names a situation, not a command (the divergence row)
            words, row_env = command_line(command, env)
            seconds, code, stderr = time_command(words, row_env, workdir, args.repeats)
            same = stderr == message + "\n"
            results.append({"case": case, "command": command, "median_s": statistics.median(seconds),
                            "max_s": max(seconds), "exit": code, "message_as_readme": same,
                            **({} if same else {"printed": stderr[-1500:]})})
        for script in sorted((workdir / "scripts").glob("*.py")):
            seconds, code, _ = time_command([sys.executable, f"scripts/{script.name}", "--help"], env, workdir,
                                            args.repeats)
            results.append({"case": f"{script.name} --help", "command": f"python scripts/{script.name} --help",
                            "median_s": statistics.median(seconds), "max_s": max(seconds), "exit": code,
                            "message_as_readme": None})
    finally:
        if temporary:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"{'case':<45} {'median':>8} {'max':>8}  exit  as README")
    for r in results:
        same = "" if r["message_as_readme"] is None else ("yes" if r["message_as_readme"] else "NO")
        print(f"{r['case']:<45} {r['median_s']:>7.2f}s {r['max_s']:>7.2f}s  {r['exit']:>4}  {same}")
    slowest = max(results, key=lambda r: r["median_s"])
    print(f"slowest: {slowest['case']} ({slowest['median_s']:.2f} s median over {args.repeats} runs)")
    if args.json:
        Path(args.json).write_text(json.dumps({"repeats": args.repeats, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
