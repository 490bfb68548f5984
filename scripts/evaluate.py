#!/usr/bin/env python
"""Evaluate a GPT-2: validation loss on token shards, perplexity of a text file, or HellaSwag accuracy.

  python scripts/evaluate.py --checkpoint runs/shakespeare --shards data/shakespeare
  python scripts/evaluate.py --checkpoint path/to/hf-gpt2 --text wiki.test.raw --stride 512
  python scripts/evaluate.py --checkpoint hf:gpt2 --hellaswag val --json

The checkpoint may be a JAX or PyTorch checkpoint (or run directory), a Hugging Face GPT-2 directory or a Hub name
(hf:gpt2, hf:OWNER/REPO). --shards reads the val_* shards of a directory from prepare_data.py (or every shard a glob
names); --text scores each token once with up to block_size tokens of context, windows advancing by --stride;
--hellaswag reads HellaSwag's JSONL (ctx, endings, label): a file, or `val`, the validation file build-nanogpt and
llm.c use, downloaded once into the Hugging Face cache.
"""

import argparse
import glob
import importlib
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpt2_common.cli import add_checkpoint_arguments, hellaswag_arg, path_arg  # noqa: E402
from gpt2_common.errors import UserError, run_cli  # noqa: E402
from gpt2_common.startup import imports_without_gc  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    add_checkpoint_arguments(parser, "scores")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--shards", type=path_arg, metavar="DIR|GLOB", help="validation loss over token shards")
    what.add_argument("--text", type=path_arg, metavar="FILE", help="sliding-window perplexity of a UTF-8 text file")
    what.add_argument("--hellaswag", type=hellaswag_arg, metavar="FILE|val", help="HellaSwag accuracy over a JSONL "
                      "file, or over its validation set (val, downloaded once)")
    parser.add_argument("--stride", type=int, default=None, help="--text: how far each window advances "
                        "(default: half of block_size)")
    parser.add_argument("--batch-size", type=int, default=8, help="--shards: sequences per batch "
                        "(default: %(default)s)")
    parser.add_argument("--steps", type=int, default=0, help="--shards: batches to score; 0: all "
                        "(default: %(default)s)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: faster where the "
                        "hardware computes in bfloat16, not bit-identical to fp32 (docs/benchmarks.md has the "
                        "difference) (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return parser


def shard_paths(pattern: str) -> list[Path]:
    """A directory's val_* shards (all its shards if it has none), or the shards a glob names."""
    from gpt2_common.data import find_shards

    if os.path.isdir(pattern):
        val = sorted(glob.glob(os.path.join(pattern, "val_*.bin")) + glob.glob(os.path.join(pattern, "val_*.npy")))
        if val:
            return [Path(p) for p in val]
    return find_shards(pattern, "validation", setting="--shards")


def shards_loss(pattern: str, model, precision: str, batch_size: int, steps: int, make_token_nll) -> dict:
    from gpt2_common.data import TokenLoader
    from gpt2_common.evaluation import loader_loss

    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    block_size, vocab_size = model.block_size, model.vocab_size
    paths = shard_paths(pattern)
    windows = TokenLoader(paths, 1, block_size, shuffle=False, vocab_size=vocab_size).num_windows
    check_fits(min(batch_size, windows), model, precision, f"--batch-size {batch_size}")
    loader = TokenLoader(paths, min(batch_size, windows), block_size, shuffle=False, vocab_size=vocab_size)
    batches = loader.batches_per_epoch if steps <= 0 else min(steps, loader.batches_per_epoch)
    loss = loader_loss(with_progress(make_token_nll(), batches, "batches"), loader, batches)
    return {"shards": len(paths), "tokens": batches * loader.order.rows * block_size, "loss": loss,
            "perplexity": math.exp(loss), "batches": batches, "batches_in_shards": loader.batches_per_epoch}


def check_fits(rows: int, model, precision: str, what: str) -> None:
    """One line, before the model is loaded, if `rows` sequences at a time would not fit half the free memory
    (gpt2_common.limits): a batch too large for the machine was the kernel's OOM killer's to end, and it may pick
    another process on a shared machine."""
    from gpt2_common.limits import eval_row_bytes, rows_that_fit, shown_bytes

    row = eval_row_bytes(model, precision)
    if rows > rows_that_fit(row, model, precision):
        raise UserError(f"{what} needs {shown_bytes(rows * row)} for the logits and activations of its {rows} "
                        f"sequences of {model.block_size} tokens, more than half the memory free now; "
                        + ("lower --batch-size" if what.startswith("--batch-size") else "free some memory"))


def with_progress(token_nll, total: int, what: str):
    """token_nll that reports its calls on stderr (a bar on a terminal, a line each tenth elsewhere) when there
    are enough of them to wait for; stdout keeps only the result."""
    if total < 20:
        return token_nll
    from tqdm import tqdm

    bar = tqdm(total=total, unit=what[:-1], desc="scoring", file=sys.stderr, disable=not sys.stderr.isatty())
    calls = 0

    def counted(*args, **kwargs):
        nonlocal calls
        calls += 1
        bar.update(1)
        if not sys.stderr.isatty() and calls % max(1, total // 10) == 0:
            print(f"scoring: {calls}/{total} {what}", file=sys.stderr, flush=True)
        if calls == total:
            bar.close()
        return token_nll(*args, **kwargs)

    return counted


def evaluate(args: argparse.Namespace) -> dict:
    from gpt2_common import evaluation
    from gpt2_formats import read_canonical

    config, weights = read_canonical(args.checkpoint)
    model = config.model
    # HellaSwag's examples (`val` downloads them once) before the framework loads: a bad file is told at once
    examples = evaluation.read_hellaswag(args.hellaswag) if args.hellaswag else None

    def make_token_nll():
        with imports_without_gc():
            framework = importlib.import_module(f"gpt2_{args.framework}.evaluate")
        return framework.token_nll_fn(config, weights, precision=args.precision)

    if args.shards:
        result = shards_loss(args.shards, model, args.precision, args.batch_size, args.steps, make_token_nll)
    elif args.text:
        check_fits(1, model, args.precision, "--text")  # one window at a time
        stride = args.stride or max(1, model.block_size // 2)
        result = {**evaluation.text_perplexity(args.text, model.block_size, stride, make_token_nll()),
                  "stride": stride}
    else:
        check_fits(4, model, args.precision, "--hellaswag")  # an example's four endings at a time
        result = evaluation.hellaswag_accuracy(examples, model.block_size, make_token_nll())
    return {"checkpoint": args.checkpoint, "framework": args.framework, "precision": args.precision, **result}


def summary(result: dict) -> str:
    if "acc" in result:
        return (f"HellaSwag: acc {result['acc']:.4f} | acc_norm {result['acc_norm']:.4f} "
                f"over {result['examples']} examples")
    if "bits_per_byte" in result:
        return (f"perplexity {result['perplexity']:.3f} | nll {result['nll']:.4f} | "
                f"{result['bits_per_byte']:.4f} bits per byte over {result['tokens']:,} tokens "
                f"(stride {result['stride']})")
    scored = ("every batch of them" if result["batches"] == result["batches_in_shards"] else
              f"the first {result['batches']} of their {result['batches_in_shards']} batches (--steps)")
    return (f"val loss {result['loss']:.4f} | perplexity {result['perplexity']:.3f} over {result['tokens']:,} tokens "
            f"of {result['shards']} shard(s): {scored}, where a trainer's logged val_loss is the mean of its first "
            "train.eval_steps batches")


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    result = evaluate(args)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{summary(result)} ({args.framework}, {time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
