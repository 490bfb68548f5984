#!/usr/bin/env python
"""Convert GPT-2 weights between JAX and PyTorch checkpoints, Hugging Face directories, nanoGPT and llm.c.

  python scripts/convert.py runs/small/checkpoints gpt2-small-hf --to hf
  python scripts/convert.py path/to/hf-gpt2 gpt2.pt --to torch
  python scripts/convert.py hf:gpt2 gpt2-hf --to hf                     # OpenAI's GPT-2 from the Hub, as a folder
  python scripts/convert.py gpt2.pt gpt2-jax --to jax
  python scripts/convert.py out/ckpt.pt gpt2-jax --to jax               # nanoGPT's checkpoint (or its out/ folder)
  python scripts/convert.py gpt2_124M.bin gpt2-hf --to hf               # llm.c's model file
  python scripts/convert.py runs/small gpt2_124M_bf16.bin --to llmc --dtype bf16
  python scripts/convert.py runs/small nanogpt_out --to nanogpt          # writes nanogpt_out/ckpt.pt
  python scripts/convert.py runs/small runs/small-torch --to torch-run   # the whole run, continued by PyTorch
  python scripts/convert.py runs/small-torch runs/small-jax --to jax-run --step 4000

The source's form is detected (gpt2_formats); a Hub name (hf:gpt2, hf:OWNER/REPO[@REVISION]) is fetched into the
Hugging Face cache first. Every tensor's name and shape is checked against the source's config before anything is
written, and the destination appears whole or not at all: it is written under a hidden `.NAME.XXXXXXXX.partial`
beside it and renamed into place, and a conversion killed mid-write leaves that partial for the next conversion to
the same destination to remove. JAX and PyTorch outputs are
weights-only checkpoints (no optimizer state) that --init-from, sampling and evaluation read; a Hugging Face output
loads in transformers.GPT2LMHeadModel.from_pretrained (and, for GPT-2's vocabulary, AutoTokenizer and pipeline); a
nanoGPT output loads in nanoGPT's sample.py; an llm.c output in llm.c's train_gpt2 (version 3 fp32, 5 bf16).

--to torch-run and --to jax-run turn a run of one trainer into a run directory of the other with its whole training
state (weights, AdamW's moments and count, the schedule's and the loader's positions, the best validation loss, the
skipped steps, the fp16 loss scale), config.toml and a copy of metrics.jsonl: the other trainer's plain command
continues it (gpt2_formats.runs).
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gpt2_formats  # noqa: E402
from gpt2_formats.runs import RUN_FORMS, convert_run  # noqa: E402
from gpt2_common.cli import output_arg, path_arg  # noqa: E402
from gpt2_common.errors import UserError, as_typed, run_cli  # noqa: E402
from gpt2_common.files import check_destination  # noqa: E402
from gpt2_common.flops import num_params  # noqa: E402
from gpt2_common.runlock import check_not_in_use  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("src", type=path_arg, help="a JAX checkpoint (run dir, checkpoints/ or step folder), a "
                        "PyTorch checkpoint (.pt, run dir or checkpoints/), a Hugging Face GPT-2 directory or Hub name "
                        "(hf:gpt2), nanoGPT's ckpt.pt (or its out_dir, or a bare state dict) or an llm.c model .bin")
    parser.add_argument("dst", type=output_arg("the destination"), help="where to write: a folder for jax, hf and "
                        "nanogpt, a .pt file for torch, a .bin file for llmc, a run directory for jax-run and torch-run; "
                        "must not exist (a local path: hf: names are sources only)")
    parser.add_argument("--to", required=True, choices=(*gpt2_formats.FORMS, *RUN_FORMS),
                        help="the destination's form: weights (jax, torch, hf, nanogpt, llmc), or a run of the other "
                        "trainer with the whole training state (jax-run, torch-run)")
    parser.add_argument("--step", type=int, default=None, metavar="N",
                        help="--to jax-run|torch-run: the source run's checkpoint of step N (default: its newest "
                        "that reads back)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="--to llmc: the tensors' dtype (llm.c's version 3 or 5; default: %(default)s)")
    return parser


def convert(src: str, dst: str, to: str, dtype: str = "fp32", step: int | None = None) -> str:
    """Reads src in whatever form it is, writes dst in form `to`; returns what it did, in words (and for a run, the
    command that continues it on a line of its own)."""
    if to in RUN_FORMS:
        if dtype != "fp32":
            raise UserError(f"--dtype {dtype} is for --to llmc; a run keeps its fp32 state")
        return convert_run(src, dst, to, step)
    if step is not None:
        raise UserError("--step is for --to jax-run|torch-run; to convert the weights of one checkpoint, give its "
                        "step folder or .pt file as the source")
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
    done, *then = as_typed(convert(args.src, args.dst, args.to, args.dtype, args.step)).split("\n")
    print(f"{done}; {time.perf_counter() - start:.1f} s", *then, sep="\n")


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
