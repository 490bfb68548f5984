#!/usr/bin/env python
"""Draw training and validation loss curves of one or more runs (JAX and PyTorch runs overlaid) to a PNG.

  python scripts/plot.py runs/shakespeare_jax runs/shakespeare_torch --out docs/shakespeare.png
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpt2_common.cli import output_arg, path_arg  # noqa: E402
from gpt2_common.errors import UserError, as_typed, run_cli  # noqa: E402
from gpt2_common.metrics import read_metrics  # noqa: E402


def plot_runs(run_dirs: list[str], out: str, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    for index, run_dir in enumerate(run_dirs):
        if not Path(run_dir, "metrics.jsonl").is_file():
            raise UserError(f"'{run_dir}' has no metrics.jsonl; give run directories made by the trainers")
        records = read_metrics(run_dir)
        train = [r for r in records if r.get("loss") is not None]
        evals = [r for r in records if r.get("val_loss") is not None]
        if not train and not evals:
            raise UserError(f"'{run_dir}/metrics.jsonl' holds no loss yet")
        color = f"C{index}"
        label = Path(run_dir).name
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], color=color, alpha=0.6,
                     label=f"{label} train")
        if evals:
            ax_loss.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], color=color, marker="o",
                         linestyle="--", label=f"{label} val")
        ax_lr.plot([r["step"] for r in train if "lr" in r], [r["lr"] for r in train if "lr" in r], color=color,
                   label=label)
    ax_loss.set(xlabel="step", ylabel="loss (nats/token)", title=title or "loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    ax_lr.set(xlabel="step", ylabel="learning rate", title="schedule")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=path_arg, metavar="RUN_DIR", help="run directories holding metrics.jsonl")
    parser.add_argument("--out", required=True, type=output_arg("--out"), help="the PNG to write")
    parser.add_argument("--title", default=None, help="title of the loss plot (default: 'loss')")
    args = parser.parse_args()
    plot_runs(args.runs, args.out, args.title)
    print(f"wrote {as_typed(args.out)}")


if __name__ == "__main__":
    run_cli(main)
