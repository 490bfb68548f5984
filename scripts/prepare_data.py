#!/usr/bin/env python
"""Tokenize text into GPT-2 token shards (llm.c's .bin form) with a held-out validation split.

  python scripts/prepare_data.py --source shakespeare --out data/shakespeare
  python scripts/prepare_data.py --source 'books/*.txt' notes.jsonl fineweb/*.parquet --out data/mine
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpt2_common.cli import path_arg, source_arg  # noqa: E402
from gpt2_common.errors import as_typed, run_cli  # noqa: E402
from gpt2_common.prepare import DEFAULT_SHARD_TOKENS, documents_for, prepare  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", nargs="+", required=True, type=source_arg, metavar="SRC",
                        help="'shakespeare' (the embedded corpus), or text files, directories, globs, .jsonl "
                             "(one JSON object a line) and .parquet files")
    parser.add_argument("--out", required=True, type=path_arg, help="directory for train_*.bin, val_*.bin and meta.json")
    parser.add_argument("--text-field", default="text", help="the text field of JSONL records / Parquet column "
                        "(default: %(default)s)")
    parser.add_argument("--val-fraction", type=float, default=0.05,
                        help="share of tokens held out for validation, whole documents (default: %(default)s)")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                        help="tokens per shard (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    args = parser.parse_args()

    start = time.perf_counter()
    result = prepare(documents_for(args.source, args.text_field), args.out, val_fraction=args.val_fraction,
                     shard_tokens=args.shard_tokens, workers=args.workers, source=" ".join(args.source))
    seconds = time.perf_counter() - start
    total = result.train_tokens + result.val_tokens
    print(f"{result.documents} documents -> {result.train_tokens:,} train + {result.val_tokens:,} val tokens in "
          f"{len(result.shards)} shards under {as_typed(args.out)} ({seconds:.1f} s, {total / seconds:,.0f} tokens/s)")


if __name__ == "__main__":
    run_cli(main)
