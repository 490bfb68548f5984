#!/usr/bin/env python
"""Convert GPT-2 weights between a JAX (orbax) checkpoint, a PyTorch checkpoint and a Hugging Face directory.

  python scripts/convert.py runs/small/checkpoints gpt2-small-hf --to hf
  python scripts/convert.py path/to/hf-gpt2 gpt2.pt --to torch
  python scripts/convert.py gpt2.pt gpt2-jax --to jax

The source's form is detected. Every tensor's name and shape is checked against the source's config before anything
is written, and the destination appears whole or not at all. JAX and PyTorch outputs are weights-only checkpoints
(no optimizer state) that --init-from, sampling and evaluation read; a Hugging Face output loads in
transformers.GPT2LMHeadModel.from_pretrained.
"""

import argparse
import importlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpt2_common import weights  # noqa: E402
from gpt2_common.errors import UserError, run_cli  # noqa: E402
from gpt2_common.flops import num_params  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("src", help="a JAX checkpoint (run dir, checkpoints/ or step folder), a PyTorch checkpoint "
                        "(.pt, run dir or checkpoints/) or a Hugging Face GPT-2 directory")
    parser.add_argument("dst", help="where to write: a folder for jax and hf, a .pt file for torch; must not exist")
    parser.add_argument("--to", required=True, choices=("jax", "torch", "hf"), help="the destination's form")
    return parser


def convert(src: str, dst: str, to: str) -> str:
    """Reads src in whatever form it is, writes dst in form `to`; returns what it did, in words."""
    if Path(dst).exists():
        raise UserError(f"'{dst}' already exists; remove it or choose another destination")
    form = weights.detect_format(src)
    config, canonical = weights.read_canonical(src)
    if to == "hf":
        weights.save_hf(canonical, config.model, dst)
    else:  # only the destination's framework is imported
        importlib.import_module(f"gpt2_{to}.weights").write_checkpoint(canonical, config, dst)
    m = config.model
    return (f"{src} ({form}) -> {dst} ({to}): GPT-2 of {m.n_layer} layers, {m.n_embd} wide, {m.n_head} heads, "
            f"context {m.block_size}, vocabulary {m.vocab_size}, {num_params(m) / 1e6:.1f}M parameters")


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    done = convert(args.src, args.dst, args.to)
    print(f"{done}; {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
