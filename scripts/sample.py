#!/usr/bin/env python
"""Continue a prompt with a trained GPT-2 (KV-cached generation), in JAX or PyTorch.

  python scripts/sample.py --checkpoint runs/shakespeare --prompt "ROMEO:" --num-samples 3
  python scripts/sample.py --checkpoint path/to/hf-gpt2 --framework torch --prompt "The meaning of" --temperature 0
  python scripts/sample.py --checkpoint hf:gpt2 --prompt "Hello, I'm a language model," --max-new-tokens 30
  python scripts/sample.py --checkpoint runs/alpaca --instruction "Name three colours."

The checkpoint may be a JAX or PyTorch checkpoint (or run directory), a Hugging Face GPT-2 directory or a Hub name
(hf:gpt2, hf:OWNER/REPO[@REVISION], fetched once into the Hugging Face cache). Temperature 0 is greedy; --top-k 0 and
--top-p 1 turn those filters off. A completion ends at <|endoftext|>. --instruction asks a model fine-tuned on
instructions (configs/alpaca.toml) through the Alpaca template it learned them in, and prints its response. Samples
are generated in batches that fit half the free memory, and each batch is printed when done; a seed draws the same
samples whatever the batches.
"""

import argparse
import importlib
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpt2_common.cli import add_checkpoint_arguments  # noqa: E402
from gpt2_common.errors import UserError, run_cli  # noqa: E402
from gpt2_common.limits import MAX_NEW_TOKENS, MAX_SAMPLES, SEED_MAX  # noqa: E402
from gpt2_common.startup import imports_without_gc  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    add_checkpoint_arguments(parser, "generates")
    parser.add_argument("--prompt", default=None, help="the text to continue (default: a newline); the last "
                        "block_size tokens of a longer one are kept, with a note")
    parser.add_argument("--instruction", default=None, help="instead of --prompt: an instruction, put in the Alpaca "
                        "template that instruction fine-tuning trains on; prints the response")
    parser.add_argument("--input", default="", help="with --instruction: the input it refers to, if any")
    parser.add_argument("--max-new-tokens", type=int, default=200, help=f"at most {MAX_NEW_TOKENS:,}; tokens past "
                        "the model's context slide its window, each rerunning the whole context without the cache "
                        "(default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=200, help="sample from the k most likely tokens; 0: all "
                        "(default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set of tokens whose "
                        "probability reaches p; 1: all (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help=f"in [0, {SEED_MAX}] (default: %(default)s)")
    parser.add_argument("--num-samples", type=int, default=1, help="completions, generated together in batches "
                        "that fit the memory (default: %(default)s)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: faster where the "
                        "hardware computes in bfloat16, but not token-identical to fp32 (docs/benchmarks.md has "
                        "the agreement) (default: %(default)s)")
    return parser


# Below this, logits / temperature overflows float32 (or the temperature flushes to 0) and sampling draws garbage;
# it is greedy in all but name long before. The web page (gpt2_common/webapp.py) keeps the same floor.
MIN_TEMPERATURE = 1e-6


def check_args(args: argparse.Namespace) -> None:
    if not 1 <= args.max_new_tokens <= MAX_NEW_TOKENS:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} is out of range; it must be in [1, "
                        f"{MAX_NEW_TOKENS}] (a longer text is the work of several calls)")
    if not (args.temperature == 0 or MIN_TEMPERATURE <= args.temperature < math.inf):  # NaN fails both
        raise UserError(f"--temperature must be 0 (greedy) or a finite number of at least {MIN_TEMPERATURE:g}, got "
                        f"{args.temperature}")
    if args.top_k < 0:
        raise UserError(f"--top-k must be 0 (off) or more, got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1] (1: off), got {args.top_p}")
    if not 1 <= args.num_samples <= MAX_SAMPLES:
        raise UserError(f"--num-samples {args.num_samples} is out of range; it must be in [1, {MAX_SAMPLES}]")
    if not 0 <= args.seed <= SEED_MAX:
        raise UserError(f"--seed {args.seed} is out of range; it must be in [0, {SEED_MAX}]")
    if args.instruction is not None and args.prompt is not None:
        raise UserError("give --prompt or --instruction, not both (--instruction puts the instruction in the Alpaca "
                        "template, which is the prompt)")
    if args.instruction is not None and not args.instruction.strip():
        raise UserError("--instruction is empty; give the instruction to answer")
    if args.input and args.instruction is None:
        raise UserError("--input goes with --instruction (the input the instruction refers to)")
    if args.prompt == "":
        raise UserError("--prompt is empty; give some text to continue (e.g. --prompt $'\\n')")


def batch_rows(args: argparse.Namespace, model, slides: bool) -> int:
    """Samples generated together: as many as fit half the free memory (gpt2_common.limits), or one line saying
    that not one does."""
    from gpt2_common.limits import decode_row_bytes, rows_that_fit, shown_bytes

    row = decode_row_bytes(model, args.precision, args.max_new_tokens, slides)
    rows = rows_that_fit(row, model, args.precision)
    if rows < 1:
        raise UserError(f"one sample of --max-new-tokens {args.max_new_tokens} needs {shown_bytes(row)} for its cache "
                        "and buffers, more than half the memory free now; lower --max-new-tokens or free memory")
    return min(rows, args.num_samples)


def completions(args: argparse.Namespace):
    """The prompt followed by each completion, as text (with --instruction: each response), batch by batch."""
    from gpt2_common.instruct import format_prompt
    from gpt2_common.tokenizer import EOT_TOKEN, decode, get_tokenizer
    from gpt2_formats import read_canonical

    check_args(args)
    config, weights = read_canonical(args.checkpoint)
    vocab, context = config.model.vocab_size, config.model.block_size
    text = args.prompt or "\n" if args.instruction is None else format_prompt(args.instruction, args.input)
    prompt = get_tokenizer().encode_ordinary(text)
    if max(prompt) >= vocab:
        raise UserError(f"the prompt's GPT-2 tokens go up to id {max(prompt)}, but this model's vocabulary has only "
                        f"{vocab} tokens; it was not trained on GPT-2 tokens")
    if len(prompt) > context:
        print(f"note: the prompt is {len(prompt)} tokens; it is cut to the last {context} (the model's context)",
              file=sys.stderr)
    shown = [] if args.instruction is not None else prompt
    rows = batch_rows(args, config.model, slides=len(prompt[-context:]) + args.max_new_tokens > context)
    stop = EOT_TOKEN if vocab > EOT_TOKEN else None
    with imports_without_gc():
        framework = importlib.import_module(f"gpt2_{args.framework}.sample")
    generate = framework.make_generate(config, weights, precision=args.precision)
    for first in range(0, args.num_samples, rows):
        count = min(rows, args.num_samples - first)
        out = generate([prompt[-context:]] * count, args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_token=stop,
                       samples=range(first, first + count))
        for row in out.tolist():
            if stop in row:
                row = row[:row.index(stop)]
            yield decode(shown + row)


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    count = 0
    for text in completions(args):
        print(text)
        print("---------------", flush=True)
        count += 1
    print(f"{count} sample(s) in {time.perf_counter() - start:.1f} s ({args.framework})", file=sys.stderr)


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
