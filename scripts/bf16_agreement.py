#!/usr/bin/env python
"""How far `--precision bf16` inference is from fp32, in both frameworks, for one checkpoint: the validation loss
of each, the share of positions whose most likely next token (top-1) is the same, and the share of greedy tokens
generated that are the same.

  python scripts/bf16_agreement.py --checkpoint runs/shakespeare --shards data/shakespeare --steps 10
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpt2_common.errors import run_cli  # noqa: E402


def top1(framework, config, weights, precision, batches):
    """The most likely next token [B, T] of each batch, under the model in `precision`."""
    import numpy as np

    if framework == "jax":
        import jax

        from gpt2_jax.model import mask_padded_vocab
        from gpt2_jax.sample import load_model

        model, params = load_model(config, weights, precision)
        forward = jax.jit(lambda p, ids: mask_padded_vocab(model.apply({"params": p}, ids),
                                                           config.model.vocab_size).argmax(-1))
        return [np.asarray(forward(params, inputs)) for inputs, _ in batches]
    import torch

    from gpt2_torch.sample import load_model

    model = load_model(config, weights, "cpu", precision)
    with torch.inference_mode():
        return [model(torch.from_numpy(inputs).long())[..., :config.model.vocab_size].argmax(-1).numpy()
                for inputs, _ in batches]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="any weights form scripts/evaluate.py reads")
    parser.add_argument("--shards", required=True, metavar="DIR|GLOB", help="token shards (a directory's val_*)")
    parser.add_argument("--frameworks", default="jax,torch", help="(default: %(default)s)")
    parser.add_argument("--steps", type=int, default=10, help="batches of 8 sequences (default: %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy tokens generated (default: %(default)s)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)

    import importlib

    import numpy as np

    from gpt2_common.data import TokenLoader
    from gpt2_common.evaluation import loader_loss
    from gpt2_common.tokenizer import get_tokenizer
    from gpt2_formats import read_canonical

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from evaluate import shard_paths  # the shards scripts/evaluate.py reads

    config, weights = read_canonical(args.checkpoint)
    m = config.model
    loader = TokenLoader(shard_paths(args.shards), 8, m.block_size, shuffle=False, vocab_size=m.vocab_size)
    steps = min(args.steps, loader.batches_per_epoch)
    batches = [loader.batch(i) for i in range(steps)]
    prompt = get_tokenizer().encode_ordinary("ROMEO:\n")
    results = []
    for framework in args.frameworks.split(","):
        evaluate = importlib.import_module(f"gpt2_{framework}.evaluate")
        sample = importlib.import_module(f"gpt2_{framework}.sample")
        record = {"framework": framework, "checkpoint": args.checkpoint, "tokens": steps * 8 * m.block_size}
        for precision in ("fp32", "bf16"):
            record[f"loss_{precision}"] = loader_loss(evaluate.token_nll_fn(config, weights, precision=precision),
                                                      loader, steps)
            record[f"greedy_{precision}"] = sample.make_generate(config, weights, precision=precision)(
                [prompt], args.new_tokens, temperature=0.0)[0].tolist()
        record["loss_difference"] = record["loss_bf16"] - record["loss_fp32"]
        same = [np.mean(a == b) for a, b in zip(top1(framework, config, weights, "fp32", batches),
                                                 top1(framework, config, weights, "bf16", batches))]
        record["top1_agreement"] = float(np.mean(same))
        greedy = np.array(record["greedy_fp32"]) == np.array(record["greedy_bf16"])
        record["greedy_agreement"] = float(np.mean(greedy))
        record["greedy_same_until"] = int(np.argmin(greedy)) if not greedy.all() else len(greedy)
        print(f"{framework}: loss fp32 {record['loss_fp32']:.5f}, bf16 {record['loss_bf16']:.5f} (difference "
              f"{record['loss_difference']:+.5f}) over {record['tokens']:,} tokens; top-1 agreement "
              f"{record['top1_agreement']:.2%}; greedy tokens the same {record['greedy_agreement']:.0%} "
              f"(the first {record['greedy_same_until']} of {args.new_tokens} identical)", flush=True)
        results.append(record)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
