#!/usr/bin/env python
"""Convert GPT-2 weights between JAX and PyTorch checkpoints, Hugging Face directories, nanoGPT and llm.c.

  python scripts/convert.py runs/small/checkpoints gpt2-small-hf --to hf
  python scripts/convert.py path/to/hf-gpt2 gpt2.pt --to torch
  python scripts/convert.py gpt2.pt gpt2-jax --to jax
  python scripts/convert.py out/ckpt.pt gpt2-jax --to jax               # nanoGPT's checkpoint (or its out/ folder)
  python scripts/convert.py gpt2_124M.bin gpt2-hf --to hf               # llm.c's model file
  python scripts/convert.py runs/small gpt2_124M_bf16.bin --to llmc --dtype bf16
  python scripts/convert.py runs/small nanogpt_out --to nanogpt          # writes nanogpt_out/ckpt.pt

The source's form is detected (gpt2_formats). Every tensor's name and shape is checked against the source's config
before anything is written, and the destination appears whole or not at all: it is written under a hidden
`.NAME.XXXXXXXX.partial` beside it and renamed into place, and a conversion killed mid-write leaves that partial for
the next conversion to the same destination to remove. JAX and PyTorch outputs are
weights-only checkpoints (no optimizer state) that --init-from, sampling and evaluation read; a Hugging Face output
loads in transformers.GPT2LMHeadModel.from_pretrained (and, for GPT-2's vocabulary, AutoTokenizer and pipeline); a
nanoGPT output loads in nanoGPT's sample.py; an llm.c output in llm.c's train_gpt2 (version 3 fp32, 5 bf16).
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gpt2_formats  # noqa: E402
from gpt2_common.cli import path_arg  # noqa: E402
from gpt2_common.errors import UserError, as_typed, run_cli  # noqa: E402
from gpt2_common.files import check_destination  # noqa: E402
from gpt2_common.flops import num_params  # noqa: E402
from gpt2_common.runlock import check_not_in_use  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("src", type=path_arg, help="a JAX checkpoint (run dir, checkpoints/ or step folder), a "
                        "PyTorch checkpoint (.pt, run dir or checkpoints/), a Hugging Face GPT-2 directory, nanoGPT's "
                        "ckpt.pt (or its out_dir, or a bare state dict) or an llm.c model .bin")
    parser.add_argument("dst", type=path_arg, help="where to write: a folder for jax, hf and nanogpt, a .pt file for "
                        "torch, a .bin file for llmc; must not exist")
    parser.add_argument("--to", required=True, choices=gpt2_formats.FORMS, help="the destination's form")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="--to llmc: the tensors' dtype (llm.c's version 3 or 5; default: %(default)s)")
    return parser


def convert(src: str, dst: str, to: str, dtype: str = "fp32") -> str:
    """Reads src in whatever form it is, writes dst in form `to`; returns what it did, in words."""
    if Path(dst).exists():
        raise UserError(f"'{dst}' already exists; remove it or choose another destination")
    check_destination(dst)  # not under a file, nor where no file can be made (/proc, a read-only disk)
    check_not_in_use(dst)  # not into a run directory that a trainer holds
    form = gpt2_formats.detect(src)
    config, canonical = gpt2_formats.read_canonical(src)
    try:
        gpt2_formats.write(canonical, config, dst, to, dtype)  # only the frameworks these two forms need are imported
    except OSError as err:  # a full disk, a folder gone or made read-only meanwhile: the writers leave nothing
        raise UserError(f"cannot write '{dst}': {err.strerror or err}; nothing was written there") from None
    m = config.model
    return (f"{src} ({form}) -> {dst} ({to}): GPT-2 of {m.n_layer} layers, {m.n_embd} wide, {m.n_head} heads, "
            f"context {m.block_size}, vocabulary {m.vocab_size}, {m.activation} activation, "
            f"{num_params(m) / 1e6:.1f}M parameters")


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    done = convert(args.src, args.dst, args.to, args.dtype)
    print(f"{as_typed(done)}; {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
