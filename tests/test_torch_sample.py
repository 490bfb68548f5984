"""KV-cached generation in PyTorch: the cache changes nothing (also past block_size, and for prompts of different
lengths in one batch), sampling controls, the stop token, padded ids, the stream of the web page. The mirror of
tests/test_jax_sample.py."""

import functools

import numpy as np
import pytest
import torch

from gpt2_common.batching import Sampling
from gpt2_common.config import Config, ModelConfig
from gpt2_torch import sample, serving
from gpt2_torch.model import GPT, mask_padded_vocab
from gpt2_torch.weights import from_canonical
from canonical_random import random_weights

# Tiny matrices: a team of threads costs more than it saves, and far more on cores shared with other work.
torch.set_num_threads(1)

CFG = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=16, vocab_size=100)  # padded to 128
PROMPTS = [[5, 17, 3, 99, 42, 8, 1, 2, 3, 4, 5, 6, 7], [11], [60, 61, 62, 63, 64]]  # 13, 1 and 5 tokens
NEW = 20  # every prompt runs past block_size (16), the 13-token one after 3 tokens


@functools.cache
def tiny() -> GPT:
    model = GPT(CFG)
    model.load_state_dict(from_canonical(random_weights(CFG), CFG))
    return model.eval()


@torch.no_grad()
def plain_greedy(model, prompt, new_tokens):
    """nanoGPT's loop, written out: crop to block_size, run the model, take the argmax at the last position."""
    tokens = list(prompt)
    for _ in range(new_tokens):
        logits = model(torch.tensor([tokens[-CFG.block_size:]]))[0, -1]
        tokens.append(int(mask_padded_vocab(logits, CFG.vocab_size).argmax()))
    return tokens[len(prompt):]


def test_cached_generation_equals_uncached_and_nanogpt_loop_across_block_size():
    model = tiny()
    cached = sample.generate(model, PROMPTS, NEW, temperature=0.0)
    uncached = sample.generate(model, PROMPTS, NEW, temperature=0.0, use_cache=False)
    expected = [plain_greedy(model, p, NEW) for p in PROMPTS]
    assert cached.tolist() == expected
    assert uncached.tolist() == expected
    assert len({tuple(row) for row in expected}) == 3  # the rows differ: each row decodes its own prompt
    assert sample.generate(model, [PROMPTS[2]], NEW, temperature=0.0).tolist() == [expected[2]]
    assert model.training is False and sample.generate(model, [PROMPTS[2]], NEW, temperature=0.0).dtype == np.int32


def test_sampling_is_reproducible_and_top_k_1_is_greedy():
    model = tiny()
    kwargs = dict(temperature=1.0, top_k=0, top_p=1.0)
    first = sample.generate(model, PROMPTS, NEW, seed=1, **kwargs)
    assert np.array_equal(first, sample.generate(model, PROMPTS, NEW, seed=1, **kwargs))
    assert not np.array_equal(first, sample.generate(model, PROMPTS, NEW, seed=2, **kwargs))
    greedy = sample.generate(model, PROMPTS, NEW, temperature=0.0)
    assert not np.array_equal(first, greedy)
    top1 = sample.generate(model, PROMPTS, NEW, temperature=1.5, top_k=1, seed=3)
    tiny_nucleus = sample.generate(model, PROMPTS, NEW, temperature=1.5, top_p=1e-6, seed=3)
    assert np.array_equal(top1, greedy) and np.array_equal(tiny_nucleus, greedy)
    rows = sample.generate(model, [PROMPTS[1]] * 3, NEW, temperature=1.0, seed=0)
    assert len({tuple(r) for r in rows.tolist()}) > 1


def test_filter_logits_keeps_the_top_k_and_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda **kw: torch.isfinite(sample.filter_logits(logits, **kw)).tolist()  # noqa: E731
    base = dict(vocab_size=4, temperature=1.0, top_k=0, top_p=1.0)
    assert kept(**{**base, "top_k": 2}) == [[True, True, False, False]]
    assert kept(**{**base, "top_p": 0.7}) == [[True, True, False, False]]
    assert kept(**{**base, "top_p": 0.5}) == [[True, False, False, False]]
    assert kept(**{**base, "vocab_size": 3}) == [[True, True, True, False]]
    assert kept(**base) == [[True, True, True, True]]


def test_categorical_draws_each_id_with_its_probability_and_never_an_impossible_one():
    probs = torch.zeros(130)
    probs[[0, 63, 64, 129]] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    generators = [torch.Generator().manual_seed(i) for i in range(4000)]
    drawn = sample.categorical(probs.log().expand(4000, 130), generators)
    counts = np.bincount(drawn.numpy(), minlength=130) / 4000
    assert set(np.flatnonzero(counts)) == {0, 63, 64, 129}
    np.testing.assert_allclose(counts[[0, 63, 64, 129]], [0.1, 0.2, 0.3, 0.4], atol=0.03)


def test_padded_ids_are_never_drawn():
    model = GPT(CFG)
    model.load_state_dict(tiny().state_dict())
    model.eval()
    # Padded rows of the tied embedding far larger than the rest: unmasked, those ids would take nearly all the
    # probability. No input is a padded id, so these rows only act through the output head.
    with torch.no_grad():
        model.transformer.wte.weight[CFG.vocab_size:] = 50.0 * torch.randn(CFG.padded_vocab_size - CFG.vocab_size,
                                                                           CFG.n_embd)
        assert model(torch.tensor([PROMPTS[0]]))[0, -1].argmax() >= CFG.vocab_size  # the test has teeth
    for use_cache in (True, False):
        drawn = sample.generate(model, PROMPTS, NEW, temperature=2.0, top_k=0, use_cache=use_cache)
        assert drawn.max() < CFG.vocab_size


def test_stop_token_ends_a_row_and_the_stream_equals_the_loop():
    model = tiny()
    greedy = sample.generate(model, PROMPTS, NEW, temperature=0.0)[0].tolist()
    stop = greedy[4]
    first = greedy.index(stop)
    stopped = sample.generate(model, PROMPTS, NEW, temperature=0.0, stop_token=stop)[0].tolist()
    assert stopped == greedy[:first + 1] + [stop] * (NEW - 1 - first)  # the stop token, then padding with it
    assert list(serving.token_stream(model, PROMPTS[0], NEW, temperature=0.0, stop_token=stop)) == greedy[:first]
    for kwargs in (dict(temperature=0.9, top_k=20, top_p=0.9, seed=4), dict(temperature=0.0, top_k=0)):
        streamed = list(serving.token_stream(model, PROMPTS[0], NEW, stop_token=None, **kwargs))
        assert streamed == sample.generate(model, [PROMPTS[0]], NEW, **kwargs)[0].tolist()


def decode_rows(batch, steps):
    """Each row's tokens over `steps` steps of a RowBatch, by prompt index."""
    got = {row: [] for row in batch.rows}
    for _ in range(steps):
        for row, token in zip(list(batch.rows), batch.step()):
            got[row].append(token)
    return got


def test_a_batch_of_rows_with_their_own_settings_decodes_each_as_alone():
    """serve.py's batches: each row its own prompt, settings and seed, and the tokens it would get alone."""
    model = sample.for_cpu_decoding(tiny())
    start = serving.make_decoder(Config(model=CFG), random_weights(CFG), "cpu")
    rows = [Sampling(0.0), Sampling(1.0, 5, 0.9, seed=3, sample=1), Sampling(0.7, seed=9)]
    got = decode_rows(start(PROMPTS, rows), NEW)
    for row, (prompt, how) in enumerate(zip(PROMPTS, rows)):
        alone = sample.generate(model, [prompt], NEW, temperature=how.temperature, top_k=how.top_k,
                                top_p=how.top_p, seed=how.seed, samples=[how.sample])
        assert got[row] == alone[0].tolist(), row
    assert got[0] == plain_greedy(tiny(), PROMPTS[0], NEW)


def test_freed_rows_leave_the_batch_and_the_others_decode_on():
    batch = serving.make_decoder(Config(model=CFG), random_weights(CFG), "cpu")(PROMPTS * 2, [Sampling(0.0)] * 6)
    first = batch.step()
    batch.free([0, 2, 4])
    assert batch.rows == [1, 3, 5] and batch.state.window.shape[0] == 3  # gone from the batch at once
    rest = decode_rows(batch, NEW - 1)
    for row in (1, 3, 5):
        assert [first[row]] + rest[row] == plain_greedy(tiny(), PROMPTS[row % 3], NEW)


def test_rows_that_join_a_running_batch_decode_as_they_would_alone():
    """serve.py's requests join the batch that runs when they come, at the next step: each row still gets the tokens
    it would get alone (its own positions, its own key from its own first token)."""
    model = sample.for_cpu_decoding(tiny())
    start = serving.make_decoder(Config(model=CFG), random_weights(CFG), "cpu")
    joins = {3: ([PROMPTS[1], PROMPTS[2]], [Sampling(0.0), Sampling(1.0, seed=4, sample=2)]),
             6: ([PROMPTS[0]], [Sampling(0.9, 7, seed=1)])}
    batch = start([PROMPTS[0]], [Sampling(0.0)])
    asked, got, began = {0: (PROMPTS[0], Sampling(0.0))}, {0: []}, {0: 0}
    for step in range(NEW):
        if step == 5:
            batch.free([0])
        if step in joins:
            prompts, how = joins[step]
            for name, prompt, row in zip(batch.add(prompts, how), prompts, how):
                asked[name], got[name], began[name] = (prompt, row), [], step
        for name, token in zip(list(batch.rows), batch.step()):
            got[name].append(token)
    assert sorted(got) == [0, 1, 2, 3] and batch.rows == [1, 2, 3]
    assert batch.state.window.shape[0] == 3  # the freed row gone, the newcomer in
    for name, (prompt, how) in asked.items():
        steps = len(got[name])
        assert steps == (5 if name == 0 else NEW - began[name])
        alone = sample.generate(model, [prompt], steps, temperature=how.temperature, top_k=how.top_k,
                                top_p=how.top_p, seed=how.seed, samples=[how.sample])
        assert got[name] == alone[0].tolist(), name


def test_samples_split_over_calls_draw_what_one_call_draws():
    """sample.py's batches: row i draws from the generator of (seed, i) wherever it falls."""
    model = tiny()
    kwargs = dict(temperature=1.0, top_k=10, seed=5)
    whole = sample.generate(model, [PROMPTS[1]] * 3, NEW, **kwargs)
    parts = [sample.generate(model, [PROMPTS[1]] * len(rows), NEW, samples=rows, **kwargs)
             for rows in ([0], [1], [2])]
    assert np.array_equal(np.concatenate(parts), whole) and len({tuple(r) for r in whole.tolist()}) > 1


def test_sample_text_and_empty_prompt():
    model = tiny()
    assert isinstance(sample.sample_text(model, max_new_tokens=5), str)  # the trainers' end-of-run sample
    model.train()  # a trainer's model: generation runs it in eval mode and gives it back in training mode
    assert sample.generate(model, [PROMPTS[0]], 4, temperature=0.0).shape == (1, 4) and model.training
    model.eval()
    with pytest.raises(ValueError, match="at least one token"):
        sample.generate(model, [[1], []], 4)


def test_bf16_inference_keeps_bf16_weights_and_draws_real_ids():
    config = Config(model=CFG)
    model = sample.load_model(config, random_weights(CFG), "cpu", "bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    out = sample.make_generate(config, random_weights(CFG), "cpu", precision="bf16")(PROMPTS, NEW, temperature=0.0)
    assert out.shape == (3, NEW) and out.max() < CFG.vocab_size


# The exact words torch 2.13 raises where oneDNN has no bf16 path (an AVX2-only CPU, issue 32 item 0).
NO_BF16_PACKING = ("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert or avx512bw, "
                   "avx512vl and avx512dq")


def packed_layers(model) -> int:
    return sum(isinstance(m, sample.PackedLinear) for m in model.modules())


def bf16_greedy(monkeypatch=None, **patch):
    model = sample.load_model(Config(model=CFG), random_weights(CFG), "cpu", "bf16")
    if monkeypatch is not None:
        for name, value in patch.items():
            monkeypatch.setattr(torch.ops.mkldnn, name, value)
    model = sample.for_cpu_decoding(model)
    return model, sample.generate(model, PROMPTS, NEW, temperature=0.0)


def test_bf16_decoding_falls_back_to_column_major_where_onednn_has_no_bf16(monkeypatch):
    """A CPU without AVX-512 (or AVX-NE-CONVERT) has no oneDNN bf16 path: asked first, torch says so, and the blocks
    stay Linear layers with column-major weights; the tokens are those of the packed layout where this CPU has one."""
    normal, expected = bf16_greedy()
    assert packed_layers(normal) == (4 * CFG.n_layer if torch.ops.mkldnn._is_mkldnn_bf16_supported() else 0)
    fallback, tokens = bf16_greedy(monkeypatch, _is_mkldnn_bf16_supported=lambda: False)
    assert packed_layers(fallback) == 0 and tokens.tolist() == expected.tolist()
    assert all(not m.weight.is_contiguous() for m in fallback.modules() if isinstance(m, torch.nn.Linear))


def test_bf16_decoding_falls_back_when_the_packing_itself_refuses(monkeypatch):
    """Should torch's answer and oneDNN's own check ever disagree, the first refusal of the packing is taken as the
    answer: the same column-major layout, no traceback."""
    def refuse(weight, rows):
        raise RuntimeError(NO_BF16_PACKING)

    _, expected = bf16_greedy()
    fallback, tokens = bf16_greedy(monkeypatch, _is_mkldnn_bf16_supported=lambda: True, _reorder_linear_weight=refuse)
    assert packed_layers(fallback) == 0 and tokens.tolist() == expected.tolist()
    fp32 = sample.for_cpu_decoding(sample.load_model(Config(model=CFG), random_weights(CFG), "cpu", "fp32"))
    assert packed_layers(fp32) == 0  # the same refusal in fp32 (no oneDNN at all) falls back too
