#!/usr/bin/env python
"""Tokenize text into GPT-2 token shards (llm.c's .bin form) with a held-out validation split.

  python scripts/prepare_data.py --source hf:HuggingFaceFW/fineweb-edu --name sample-10BT --out data/fineweb10B
  python scripts/prepare_data.py --source hf:Salesforce/wikitext --name wikitext-103-raw-v1 --split test --out DIR
  python scripts/prepare_data.py --source shakespeare --out data/shakespeare
  python scripts/prepare_data.py --source 'books/*.txt' notes.jsonl fineweb/*.parquet --out data/mine

A Hub dataset (hf:OWNER/REPO[@REVISION]) is fetched file by file into the Hugging Face cache, pinned to one commit,
and tokenized as it arrives; the same command again resumes an interrupted run.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpt2_common import hub  # noqa: E402
from gpt2_common.cli import output_arg, source_arg  # noqa: E402
from gpt2_common.errors import UserError, as_typed, run_cli  # noqa: E402
from gpt2_common.shards import DEFAULT_SHARD_TOKENS  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", nargs="+", required=True, type=source_arg, metavar="SRC",
                        help="a Hub dataset (hf:OWNER/REPO[@REVISION]), 'shakespeare' (the embedded corpus), or "
                             "text files, directories, globs, .jsonl (one JSON object a line) and .parquet files")
    parser.add_argument("--name", default=None, help="a Hub dataset's config, as its card lists them (default: the "
                        "card's default), e.g. sample-10BT")
    parser.add_argument("--split", default=None, help="a Hub dataset's split (default: train)")
    parser.add_argument("--out", required=True, type=output_arg("--out"),
                        help="directory for train_*.bin, val_*.bin and meta.json")
    parser.add_argument("--text-field", default="text", help="the text field of JSONL records / Parquet column "
                        "(default: %(default)s)")
    parser.add_argument("--val-fraction", type=float, default=0.05,
                        help="share of tokens held out for validation, whole documents (default: %(default)s)")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                        help="tokens per shard (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=None, metavar="N",
                        help="stop after the document that brings the shards to N tokens (a smaller sample for a "
                        "first run); a Hub dataset then downloads only the files it reads")
    parser.add_argument("--delete-downloads", action="store_true",
                        help="a Hub dataset: remove each downloaded file from the cache once its documents are in "
                        "shards (the disk then holds the shards and at most two downloads)")
    parser.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    named = [s for s in args.source if hub.is_name(s)]
    if named and len(args.source) > 1:
        raise UserError(f"--source {named[0]} names a whole Hub dataset; prepare it alone (other inputs into "
                        "another --out)")
    if not named and (args.name or args.split or args.delete_downloads):
        flag = "--name" if args.name else "--split" if args.split else "--delete-downloads"
        raise UserError(f"{flag} is for a Hub dataset (--source hf:OWNER/REPO); local files are read as they are")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    start = time.perf_counter()
    settings = dict(val_fraction=args.val_fraction, shard_tokens=args.shard_tokens, workers=args.workers,
                    max_tokens=args.max_tokens)
    if named:
        from gpt2_common.prepare_hub import prepare_named

        result = prepare_named(named[0], args.out, config=args.name, split=args.split, text_field=args.text_field,
                               delete_downloads=args.delete_downloads, **settings)
    else:
        from gpt2_common.prepare import documents_for, prepare

        result = prepare(documents_for(args.source, args.text_field), args.out, source=" ".join(args.source),
                         **settings)
    seconds = time.perf_counter() - start
    total = result.train_tokens + result.val_tokens
    print(f"{result.documents} documents -> {result.train_tokens:,} train + {result.val_tokens:,} val tokens in "
          f"{len(result.shards)} shards under {as_typed(args.out)} ({seconds:.1f} s, {total / seconds:,.0f} tokens/s)")


if __name__ == "__main__":
    run_cli(main)
