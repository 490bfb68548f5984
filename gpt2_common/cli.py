"""The command-line contract both trainers share (DESIGN.md): --config, --run-dir, --init-from, --set."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from gpt2_common.config import Config, dumps_toml, load_config
from gpt2_common.data import find_shards
from gpt2_common.errors import UserError
from gpt2_common.prepare import EMBEDDED_SOURCES, ensure_embedded_prepared


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--config and --set, as the trainers and the benchmark scripts take them (args.config, args.overrides)."""
    parser.add_argument("--config", default="shakespeare", help="a preset in configs/ (tiny, shakespeare, small, "
                        "medium, large, xl) or a path to a .toml/.yaml file (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. --set train.lr=3e-4 model.n_layer=6")


def train_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--run-dir", default=None, help="where config.toml, metrics.jsonl and checkpoints/ go "
                        "(default: runs/<config name>); running again with the same run dir resumes")
    parser.add_argument("--init-from", default=None, help="start from these weights: a JAX or PyTorch checkpoint "
                        "or a Hugging Face GPT-2 directory")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume a run directory's checkpoints even though they were trained with another "
                        "config (keys beyond run control such as train.max_steps, train.eval_interval, logging.*)")
    return parser


def add_checkpoint_arguments(parser: argparse.ArgumentParser, does: str) -> None:
    """--checkpoint and --framework, as every script that loads weights takes them; `does`: what the model does."""
    parser.add_argument("--checkpoint", required=True, help="a JAX or PyTorch checkpoint (or run directory), or a "
                        "Hugging Face GPT-2 directory")
    parser.add_argument("--framework", choices=("jax", "torch"), default="jax",
                        help=f"which model {does} (default: %(default)s)")


def resolve_run(args: argparse.Namespace) -> tuple[Config, Path]:
    config = load_config(args.config, args.overrides)
    run_dir = Path(args.run_dir or os.path.join("runs", config.name))
    if args.init_from is not None and not os.path.exists(args.init_from):
        raise UserError(f"--init-from '{args.init_from}' does not exist; give a checkpoint or Hugging Face directory")
    return config, run_dir


def write_run_config(config: Config, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / ".config.toml.tmp"
    tmp.write_text(dumps_toml(config))
    os.replace(tmp, run_dir / "config.toml")


def data_paths(config: Config, progress: bool = True) -> tuple[list[Path], list[Path]]:
    """The train and validation shards a config names, preparing an embedded corpus on first use."""
    data = config.data
    if data.source in EMBEDDED_SOURCES:
        ensure_embedded_prepared(data.source, data.train, progress=progress)
    elif data.source:
        raise UserError(
            f"data.source '{data.source}' is not an embedded corpus ({', '.join(EMBEDDED_SOURCES)}); "
            "for your own text, run scripts/prepare_data.py and set data.train/data.val"
        )
    return find_shards(data.train, "train"), find_shards(data.val, "val")
