"""scripts/bench.py and scripts/memory_plan.py --compiled, run as a user runs them, on the tiny config."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "XLA_FLAGS": "", "OMP_NUM_THREADS": "1"}  # one CPU device, one thread


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], capture_output=True, text=True,
                          env=ENV, timeout=600)


def test_bench_times_framework_variants_side_by_side_and_writes_the_json(tmp_path):
    out = tmp_path / "bench.json"
    done = run("bench.py", "--config", "tiny", "--frameworks", "jax,jax:model.loss_chunk_size=0,torch,nanogpt",
               "--steps", "1", "--warmup", "1", "--repeats", "2", "--json", str(out))
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    assert [(r["framework"], r["variant"]) for r in results] == [
        ("jax", []), ("jax", ["model.loss_chunk_size=0"]), ("torch", []), ("nanogpt", [])]
    assert [r["loss_chunk_size"] for r in results] == [32, 0, 32, 0]  # nanoGPT's loss is over the whole logits
    for r in results:
        assert r["config"] == "tiny" and r["precision"] == "fp32" and len(r["step_times_s"]) == 2
        assert r["median_step_s"] > 0 and r["tokens_per_s"] == r["tokens_per_step"] / r["median_step_s"]
        # MFU divides by a CPU peak measured while the machine may be busy: its value is the load's, its presence
        # (a CPU has no datasheet peak, so the measured one stands in) is the script's
        assert isinstance(r["mfu"], float) and r["mfu"] > 0 and "peak_bytes" in r
    assert "jax:model.loss_chunk_size=0" in done.stdout
    # each JAX variant reports its own step's memory (the process-wide peak would give both the larger one)
    assert results[1]["peak_bytes"] > results[0]["peak_bytes"] + 50 * 2**20  # the [8, 64, 50304] fp32 logits


def test_bench_refuses_unknown_frameworks_and_variants_of_another_shape():
    unknown = run("bench.py", "--config", "tiny", "--frameworks", "jax,tensorflow")
    assert unknown.returncode == 2 and "unknown framework 'tensorflow'" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1
    reshaped = run("bench.py", "--config", "tiny", "--frameworks", "jax,jax:train.micro_batch_size=4")
    assert reshaped.returncode == 2 and "must keep the batch and model shapes" in reshaped.stderr


def test_memory_plan_compiled_prints_the_compilers_sizes():
    done = run("memory_plan.py", "--compiled", "--configs", "tiny", "--set", "model.loss_chunk_size=0")
    assert done.returncode == 0, done.stderr
    row = [line for line in done.stdout.splitlines() if line.startswith("| tiny")]
    assert len(row) == 1
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert cells[1:3] == ["8 x 64", "0"]
    state, temp, total, compile_cpu = map(float, cells[3:])
    assert state > 0.03 and temp > 0.2 and abs(total - state - temp) < 0.011  # GiB; the logits alone are ~0.1
    assert compile_cpu > 0


def test_bench_data_runs_each_loader_in_its_own_process_beside_a_baseline(tmp_path):
    out, shards = tmp_path / "data.json", tmp_path / "shards"
    this_loader = ROOT / "gpt2_common" / "data.py"
    done = run("bench_data.py", "--shards", "3", "--shard-tokens", "100000", "--rows", "8", "--seq-len", "64",
               "--batches", "3", "--repeats", "2", "--baseline", str(this_loader), "--dir", str(shards),
               "--json", str(out))
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    assert results["loaders"] == {"this checkout": str(this_loader), "baseline": str(this_loader)}
    for runs in results["results"].values():
        assert len(runs) == 2
        for r in runs:
            assert r["windows"] == 3 * (99_999 // 64) and len(r["batch_s"]) == 3
            assert r["peak_rss_bytes"] >= r["rss_before_loader_bytes"] > 0
    assert "baseline / this checkout, peak RSS:" in done.stdout
    sizes = sorted(p.stat().st_size for p in shards.iterdir())
    assert sizes == [1024 + 200_000] * 3 and all(p.stat().st_blocks * 512 < 2**20 for p in shards.iterdir())
