import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def write_run(run_dir, offset):
    run_dir.mkdir()
    lines = [{"step": s, "loss": 5 - s / 10 + offset, "lr": 1e-3, "grad_norm": 1.0} for s in range(1, 21)]
    lines += [{"step": s, "val_loss": 5 - s / 10 + offset} for s in (10, 20)]
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")


def test_plot_overlays_runs(tmp_path):
    write_run(tmp_path / "jax", 0.0)
    write_run(tmp_path / "torch", 0.1)
    out = tmp_path / "curves.png"
    result = subprocess.run([sys.executable, str(ROOT / "scripts/plot.py"), str(tmp_path / "jax"),
                             str(tmp_path / "torch"), "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_plot_refuses_a_directory_without_metrics(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts/plot.py"), str(tmp_path), "--out",
                             str(tmp_path / "x.png")], capture_output=True, text=True)
    assert result.returncode == 2 and "has no metrics.jsonl" in result.stderr
    assert not (tmp_path / "x.png").exists()
