"""Evaluation that is the same for both frameworks: validation loss on shards, sliding-window perplexity of a text,
and HellaSwag accuracy. Each takes `token_nll(inputs, targets) -> nll`, the model's per-token negative
log-likelihood ([B, T] float, 0 where the target is -1), which each framework provides from its own model.

Speed without changing a bit of the results: each batch, window or example goes to the model in the shape it always
had (JAX's numbers depend, in the last bits, on the shapes of its matmuls), but `token_nll` may return an array that
is still being computed (JAX dispatches asynchronously): each result is read only after the next call has been
handed to the model, so the model does not wait for the host between calls.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from gpt2_common.config import Config
from gpt2_common.data import IGNORE_INDEX as IGNORE  # the one ignore index; gpt2_jax/evaluate.py imports this name
from gpt2_common.errors import UserError
from gpt2_common.hellaswag_file import hellaswag_path
from gpt2_common.tokenizer import get_tokenizer

TokenNLL = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _one_behind(calls):
    """Yield (result, payload) of `calls` (pairs of a zero-argument function and a payload), each call made before
    the previous result is handed out: with asynchronous dispatch the next batch runs while the host reads one."""
    pending = None
    for call, payload in calls:
        result = (call(), payload)
        if pending is not None:
            yield pending
        pending = result
    if pending is not None:
        yield pending


def loader_loss(token_nll: TokenNLL, loader, steps: int) -> float:
    """Mean loss over the loader's first `steps` batches (all of them when steps <= 0), token-weighted."""
    steps = loader.batches_per_epoch if steps <= 0 else min(steps, loader.batches_per_epoch)
    total, count = 0.0, 0

    def batches():
        for position in range(steps):
            inputs, targets = loader.batch(position)
            yield (lambda inputs=inputs, targets=targets: token_nll(inputs, targets)), targets

    for nll, targets in _one_behind(batches()):
        total += float(np.sum(np.asarray(nll), dtype=np.float64))
        count += int(np.sum(targets != IGNORE))
    return total / count


def sliding_window_nll(tokens: np.ndarray, context: int, stride: int, token_nll: TokenNLL) -> tuple[float, int]:
    """(total NLL, tokens scored) of a token stream, each token scored once with up to `context` tokens before it
    (Hugging Face's perplexity recipe: windows advance by `stride`, and only the tokens new to a window count)."""
    if not 0 < stride <= context:
        raise UserError(f"--stride must be in [1, {context}] (the model's context), got {stride}")
    tokens = np.asarray(tokens, dtype=np.int32)
    windows = []  # (inputs, targets) of each window, in order
    scored_until = 1  # the first token has no context and is not scored
    for begin in range(0, len(tokens) - 1, stride):
        end = min(begin + context + 1, len(tokens))
        window = tokens[begin:end]
        targets = window[1:].copy()
        new_from = max(scored_until, begin + 1) - (begin + 1)  # targets[i] is token begin+1+i
        targets[:new_from] = IGNORE
        windows.append((window[:-1], targets))
        scored_until = end
        if end == len(tokens):
            break
    # One window a call, the shape it always had: JAX's numbers depend (in the last bits) on how many rows share a
    # matmul, so stacking windows would change the results; dispatching them one behind the other keeps the model
    # busy all the same.
    calls = [((lambda w=window: token_nll(w[0][None, :], w[1][None, :])), window[1]) for window in windows]
    total, count = 0.0, 0
    for nll, targets in _one_behind(calls):
        total += float(np.sum(np.asarray(nll), dtype=np.float64))
        count += int(np.sum(targets != IGNORE))
    return total, count


def text_perplexity(path: str | Path, context: int, stride: int, token_nll: TokenNLL) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"text file '{path}' does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"'{path}' is not UTF-8 text") from None
    tokens = np.array(get_tokenizer().encode_ordinary(text), dtype=np.int32)
    if len(tokens) < 2:
        raise UserError(f"'{path}' holds fewer than two tokens; nothing to score")
    total, count = sliding_window_nll(tokens, context, stride, token_nll)
    return {"tokens": count, "nll": total / count, "perplexity": math.exp(total / count),
            "bits_per_byte": total / math.log(2) / len(text.encode("utf-8"))}


@dataclass
class HellaSwagExample:
    tokens: np.ndarray  # [4, T] context + each ending, padded with 0
    mask: np.ndarray  # [4, T] True on the ending's tokens
    label: int


def read_hellaswag(path: str | Path) -> list[HellaSwagExample]:
    """HellaSwag's released JSONL (`ctx`, `endings`, `label`), rendered as build-nanogpt does: the context's tokens,
    then " " + ending; the ending's tokens are the ones scored. `path` may name a split (val: fetched once into the
    cache, gpt2_common.hellaswag_file)."""
    path = hellaswag_path(str(path))
    if not path.is_file():
        raise UserError(f"HellaSwag file '{path}' does not exist")
    enc = get_tokenizer()
    examples = []
    for number, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise UserError(f"{path}:{number}: not UTF-8 text (byte {err.start + 1} of the line is "
                            f"0x{raw[err.start]:02x}); HellaSwag's JSONL is UTF-8") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            ctx, endings, label = record["ctx"], record["endings"], record["label"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{path}:{number}: not a HellaSwag record (needs ctx, endings, label)") from None
        # the released files hold label as an int; Hugging Face's copy as a string of one digit
        label = int(label) if isinstance(label, str) and label in ("0", "1", "2", "3") else label
        if not isinstance(ctx, str):
            raise UserError(f"{path}:{number}: a HellaSwag record's ctx is text, got {json.dumps(ctx)}")
        if not (isinstance(endings, list) and len(endings) == 4 and all(isinstance(e, str) for e in endings)):
            raise UserError(f"{path}:{number}: a HellaSwag record's endings are a list of 4 strings, got "
                            f"{json.dumps(endings)[:80]}")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < 4:
            raise UserError(f"{path}:{number}: a HellaSwag record's label is an integer in 0..3, got "
                            f"{json.dumps(label)[:80]}")
        ctx_tokens = enc.encode_ordinary(ctx)
        rows = [ctx_tokens + enc.encode_ordinary(" " + ending) for ending in endings]
        width = max(len(r) for r in rows)
        tokens = np.zeros((4, width), dtype=np.int32)
        mask = np.zeros((4, width), dtype=bool)
        for i, row in enumerate(rows):
            tokens[i, :len(row)] = row
            mask[i, len(ctx_tokens):len(row)] = True
        examples.append(HellaSwagExample(tokens, mask, label))
    if not examples:
        raise UserError(f"'{path}' holds no HellaSwag records")
    return examples


def hellaswag_correct(examples: list[HellaSwagExample], context: int, token_nll: TokenNLL) -> tuple[int, int]:
    """(examples whose ending of lowest total loss is the right one, the same by lowest mean loss per ending token):
    counts, so that processes that each score a share of the examples can add them up."""
    def calls():
        for ex in examples:  # the four endings of an example as one batch
            tokens, mask = ex.tokens[:, -(context + 1):], ex.mask[:, -(context + 1):]
            targets = np.where(mask[:, 1:], tokens[:, 1:], IGNORE)
            yield (lambda t=tokens, y=targets: token_nll(t[:, :-1], y)), (ex, mask)

    correct = correct_norm = 0
    for nll, (ex, mask) in _one_behind(calls()):
        total = np.asarray(nll).astype(np.float64).sum(axis=1)
        correct += int(np.argmin(total) == ex.label)
        correct_norm += int(np.argmin(total / np.maximum(mask[:, 1:].sum(axis=1), 1)) == ex.label)
    return correct, correct_norm


def hellaswag_accuracy(examples: list[HellaSwagExample], context: int, token_nll: TokenNLL) -> dict:
    """acc: the ending with the lowest total loss; acc_norm: the lowest mean loss per ending token."""
    correct, correct_norm = hellaswag_correct(examples, context, token_nll)
    n = len(examples)
    return {"examples": n, "acc": correct / n, "acc_norm": correct_norm / n}


def training_hellaswag(config: Config) -> list[HellaSwagExample] | None:
    """The examples a training run scores at each evaluation (data.hellaswag, the first train.hellaswag_examples
    of them), read once before the first step so that a bad file stops the run before it trains; None if unset."""
    if not config.data.hellaswag:
        return None
    examples = read_hellaswag(config.data.hellaswag)
    examples = examples[:config.train.hellaswag_examples] if config.train.hellaswag_examples else examples
    largest = max(int(ex.tokens.max()) for ex in examples)
    if largest >= config.model.vocab_size:
        raise UserError(f"data.hellaswag is GPT-2 text (token ids up to {largest}), which model.vocab_size="
                        f"{config.model.vocab_size} cannot read; train with the GPT-2 vocabulary (50257) or unset it")
    return examples
