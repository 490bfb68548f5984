#!/usr/bin/env python
"""Tokens/s of prepare_data.py by name (--source hf:REPO) beside the same Parquet files prepared from disk.

  python scripts/bench_prepare.py --megabytes 48 --rounds 3

Builds a corpus of Parquet files (the embedded Shakespeare cut into web-page-sized documents, repeated to the size
asked for), serves it as a dataset repository from the tests' loopback Hub (tests/fake_hub.py, 127.0.0.1), and runs
the two commands in turns, each as a user types it, into a fresh HF_HOME: `--source FILES` and `--source hf:REPO`
(which downloads every file, then tokenizes it). Both must write the same shards; the figure is tokens over each
command's wall time, start-up included.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from fake_hub import FakeHub, environ  # noqa: E402
from gpt2_common.prepare import shakespeare_documents  # noqa: E402

REPO = "bench/corpus"
CARD = "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/*\n---\n"


def corpus(megabytes: float, files: int, chars: int = 3000) -> dict[str, bytes]:
    """{path: Parquet bytes}: documents of about `chars` characters, `megabytes` of text over `files` files."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    pieces = [play[i:i + chars] for play in shakespeare_documents() for i in range(0, len(play), chars)]
    documents, size = [], 0
    while size < megabytes * 1e6:
        for piece in pieces:
            documents.append(f"{len(documents)}: {piece}")
            size += len(documents[-1])
            if size >= megabytes * 1e6:
                break
    out = {}
    for index in range(files):
        part = documents[index::files]
        buffer = io.BytesIO()
        pq.write_table(pa.table({"text": part, "id": [f"doc-{index}-{i}" for i in range(len(part))]}), buffer)
        out[f"data/{index:03d}_00000.parquet"] = buffer.getvalue()
    return out


def run(command: list[str], cwd: Path, env: dict) -> tuple[float, int]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_data.py"), *command], cwd=cwd, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(done.stderr)
    meta = json.loads((cwd / command[command.index("--out") + 1] / "meta.json").read_text())
    return seconds, meta["train_tokens"] + meta["val_tokens"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=float, default=48, help="text in the corpus (default: %(default)s)")
    parser.add_argument("--files", type=int, default=4, help="Parquet files (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="(default: %(default)s)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    files = corpus(args.megabytes, args.files)
    work = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    for path, data in files.items():
        (work / "local" / path).parent.mkdir(parents=True, exist_ok=True)
        (work / "local" / path).write_bytes(data)
    hub = FakeHub().start()
    hub.add_commit("dataset", REPO, {"README.md": CARD.encode(), **files})
    local = [str(work / "local" / path) for path in sorted(files)]
    results = []
    try:
        for round_ in range(args.rounds):
            order = ("local", "hub") if round_ % 2 == 0 else ("hub", "local")
            for kind in order:
                out = f"out_{kind}_{round_}"
                env = {**os.environ, **environ(hub, work / f"home_{kind}_{round_}")}
                source = local if kind == "local" else [f"hf:{REPO}"]
                seconds, tokens = run(["--source", *source, "--out", out], work, env)
                results.append({"round": round_, "source": kind, "seconds": seconds, "tokens": tokens,
                                "tokens_per_s": tokens / seconds})
                print(f"round {round_} {kind:5s}: {tokens:,} tokens in {seconds:.1f} s, {tokens / seconds:,.0f} "
                      "tokens/s", flush=True)
            a, b = (sorted((work / f"out_{k}_{round_}").glob("*.bin")) for k in ("local", "hub"))
            assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b], "the two wrote different shards"
    finally:
        hub.stop()
    for round_ in range(args.rounds):
        rate = {r["source"]: r["tokens_per_s"] for r in results if r["round"] == round_}
        local_rate, hub_rate = rate["local"], rate["hub"]
        print(f"round {round_}: by name / local files = {hub_rate / local_rate:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"megabytes": args.megabytes, "files": args.files, "results": results},
                                              indent=2) + "\n")


if __name__ == "__main__":
    main()
