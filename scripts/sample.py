#!/usr/bin/env python
"""Continue a prompt with a trained GPT-2 (KV-cached generation), in JAX or PyTorch.

  python scripts/sample.py --checkpoint runs/shakespeare --prompt "ROMEO:" --num-samples 3
  python scripts/sample.py --checkpoint path/to/hf-gpt2 --framework torch --prompt "The meaning of" --temperature 0
  python scripts/sample.py --checkpoint hf:gpt2 --prompt "Hello, I'm a language model," --max-new-tokens 30

The checkpoint may be a JAX or PyTorch checkpoint (or run directory), a Hugging Face GPT-2 directory or a Hub name
(hf:gpt2, hf:OWNER/REPO[@REVISION], fetched once into the Hugging Face cache). Temperature 0
is greedy; --top-k 0 and --top-p 1 turn those filters off. A completion ends at <|endoftext|>.
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    add_checkpoint_arguments(parser, "generates")
    parser.add_argument("--prompt", default="\n", help="the text to continue (default: a newline)")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="(default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=200, help="sample from the k most likely tokens; 0: all "
                        "(default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set of tokens whose "
                        "probability reaches p; 1: all (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument("--num-samples", type=int, default=1, help="completions, generated as one batch "
                        "(default: %(default)s)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: faster where the "
                        "hardware computes in bfloat16, but not token-identical to fp32 (docs/benchmarks.md has "
                        "the agreement) (default: %(default)s)")
    return parser


# Below this, logits / temperature overflows float32 (or the temperature flushes to 0) and sampling draws garbage;
# it is greedy in all but name long before. The web page (gpt2_common/webapp.py) keeps the same floor.
MIN_TEMPERATURE = 1e-6


def check_args(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not (args.temperature == 0 or MIN_TEMPERATURE <= args.temperature < math.inf):  # NaN fails both
        raise UserError(f"--temperature must be 0 (greedy) or a finite number of at least {MIN_TEMPERATURE:g}, got "
                        f"{args.temperature}")
    if args.top_k < 0:
        raise UserError(f"--top-k must be 0 (off) or more, got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1] (1: off), got {args.top_p}")
    if args.num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, got {args.num_samples}")
    if not args.prompt:
        raise UserError("--prompt is empty; give some text to continue (e.g. --prompt $'\\n')")


def completions(args: argparse.Namespace) -> list[str]:
    """The prompt followed by each completion, as text."""
    from gpt2_common.tokenizer import EOT_TOKEN, decode, get_tokenizer
    from gpt2_formats import read_canonical

    check_args(args)
    config, weights = read_canonical(args.checkpoint)
    vocab = config.model.vocab_size
    prompt = get_tokenizer().encode_ordinary(args.prompt)
    if max(prompt) >= vocab:
        raise UserError(f"the prompt's GPT-2 tokens go up to id {max(prompt)}, but this model's vocabulary has only "
                        f"{vocab} tokens; it was not trained on GPT-2 tokens")
    stop = EOT_TOKEN if vocab > EOT_TOKEN else None
    generate = importlib.import_module(f"gpt2_{args.framework}.sample").make_generate(config, weights,
                                                                                     precision=args.precision)
    out = generate([prompt] * args.num_samples, args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_token=stop)
    texts = []
    for row in out.tolist():
        if stop in row:
            row = row[:row.index(stop)]
        texts.append(decode(prompt + row))
    return texts


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    texts = completions(args)
    for text in texts:
        print(text)
        print("---------------")
    print(f"{len(texts)} sample(s) in {time.perf_counter() - start:.1f} s ({args.framework})", file=sys.stderr)


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
