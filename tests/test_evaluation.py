import json

import numpy as np
import pytest

from gpt2_common.errors import UserError
from gpt2_common.evaluation import hellaswag_accuracy, read_hellaswag, sliding_window_nll, text_perplexity

VOCAB = 50257


def bigram_model(seed=0):
    """A model whose next-token distribution depends on the current token only: a sliding window must give it the
    same score as one pass over the whole text, whatever the stride."""
    rng = np.random.default_rng(seed)
    table = rng.normal(size=(VOCAB // 64 + 1, 64)).astype(np.float64)

    def log_probs(token):
        logits = np.tile(table[token // 64], VOCAB // 64 + 1)[:VOCAB]
        return logits - np.log(np.exp(logits).sum())

    def token_nll(inputs, targets):
        out = np.zeros(targets.shape)
        for b in range(targets.shape[0]):
            for t in range(targets.shape[1]):
                if targets[b, t] != -1:
                    out[b, t] = -log_probs(inputs[b, t])[targets[b, t]]
        return out

    return token_nll


def test_sliding_window_scores_each_token_once():
    model = bigram_model()
    tokens = np.random.default_rng(1).integers(0, VOCAB, 50)
    full, full_count = sliding_window_nll(tokens, 64, 64, model)
    assert full_count == 49
    for context, stride in [(16, 16), (16, 5), (8, 1)]:
        total, count = sliding_window_nll(tokens, context, stride, model)
        assert count == 49
        assert total == pytest.approx(full, rel=1e-12)


def test_sliding_window_gives_context_to_later_windows():
    seen = []

    def recorder(inputs, targets):
        seen.append((inputs.shape[1], int((targets != -1).sum())))
        return np.zeros(targets.shape)

    sliding_window_nll(np.arange(20), 8, 4, recorder)
    assert seen == [(8, 8), (8, 4), (8, 4), (7, 3)]  # full windows; only the new tokens count


def test_text_perplexity_and_bad_stride(tmp_path):
    (tmp_path / "t.txt").write_text("To be, or not to be, that is the question. " * 5)
    result = text_perplexity(tmp_path / "t.txt", 16, 8, bigram_model())
    assert result["perplexity"] == pytest.approx(np.exp(result["nll"])) and result["tokens"] > 40
    with pytest.raises(UserError, match="--stride must be in"):
        text_perplexity(tmp_path / "t.txt", 16, 17, bigram_model())


def test_hellaswag_scores_the_endings(tmp_path):
    records = [{"ctx": "A man is sitting on a roof. he", "endings": ["is using wrap.", "starts pulling up roofing.",
                "is ripping level tiles.", "is holding a rope."], "label": label} for label in range(4)]
    (tmp_path / "h.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    examples = read_hellaswag(tmp_path / "h.jsonl")
    assert examples[0].tokens.shape[0] == 4 and examples[0].mask[0].sum() > 0
    result = hellaswag_accuracy(examples, 64, bigram_model())
    # The same question with each label: the model picks one ending, so exactly one of the four is right.
    assert result["examples"] == 4 and result["acc"] == 0.25 and result["acc_norm"] == 0.25


def test_hellaswag_bad_record_names_the_line(tmp_path):
    (tmp_path / "h.jsonl").write_text('{"ctx": "x", "endings": ["a", "b", "c", "d"], "label": 0}\n{"ctx": "y"}\n')
    with pytest.raises(UserError, match="h.jsonl:2: not a HellaSwag record"):
        read_hellaswag(tmp_path / "h.jsonl")


def test_each_result_is_read_only_after_the_next_call_is_made():
    """JAX dispatches asynchronously: reading a result before handing over the next batch would idle the model."""
    events = []

    class Lazy:  # a result that notes when the host reads it
        def __init__(self, number, shape):
            self.number, self.shape = number, shape

        def __array__(self, dtype=None, copy=None):
            events.append(("read", self.number))
            return np.zeros(self.shape, dtype or np.float32)

    def token_nll(inputs, targets):
        events.append(("call", len([e for e in events if e[0] == "call"])))
        return Lazy(events[-1][1], targets.shape)

    sliding_window_nll(np.arange(20), 8, 4, token_nll)
    assert events == [("call", 0), ("call", 1), ("read", 0), ("call", 2), ("read", 1), ("call", 3), ("read", 2),
                      ("read", 3)]
