"""KV-cached generation in JAX: the cache changes nothing (also past block_size, and for prompts of different
lengths in one batch), sampling controls, the stop token, padded ids, one compile, the stream of the web page."""

import functools

import jax
import numpy as np
import pytest

from gpt2_common.batching import Sampling
from gpt2_common.config import Config, ModelConfig
from gpt2_jax import sample, serving
from gpt2_jax.model import GPT, mask_padded_vocab
from gpt2_jax.weights import from_canonical
from canonical_random import random_weights

cache_span = sample.cache_span
CFG = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=16, vocab_size=100)  # padded to 128
PROMPTS = [[5, 17, 3, 99, 42, 8, 1, 2, 3, 4, 5, 6, 7], [11], [60, 61, 62, 63, 64]]  # 13, 1 and 5 tokens
NEW = 20  # every prompt runs past block_size (16), the 13-token one after 3 tokens; one length compiles once


@functools.cache
def tiny():
    return GPT(CFG), jax.device_put(from_canonical(random_weights(CFG), CFG))


@functools.partial(jax.jit, static_argnums=0)
def apply(model, params, ids):
    return model.apply({"params": params}, ids)


def plain_greedy(model, params, prompt, new_tokens):
    """nanoGPT's loop, written out: crop to block_size, run the model, take the argmax at the last position."""
    tokens = list(prompt)
    for _ in range(new_tokens):
        window = tokens[-CFG.block_size:]
        ids = np.zeros((1, CFG.block_size), np.int32)  # right-padded to one shape: causal, so the padding is unseen
        ids[0, :len(window)] = window
        logits = mask_padded_vocab(apply(model, params, ids)[0, len(window) - 1], CFG.vocab_size)
        tokens.append(int(np.argmax(logits)))
    return tokens[len(prompt):]


def test_cached_generation_equals_uncached_and_nanogpt_loop_across_block_size():
    model, params = tiny()
    new = NEW
    cached = sample.generate(model, params, PROMPTS, new, temperature=0.0)
    uncached = sample.generate(model, params, PROMPTS, new, temperature=0.0, use_cache=False)
    expected = [plain_greedy(model, params, p, new) for p in PROMPTS]
    assert cached.tolist() == expected
    assert uncached.tolist() == expected
    assert len({tuple(row) for row in expected}) == 3  # the rows differ: each row decodes its own prompt
    # a row alone gives what it gives in the batch
    assert sample.generate(model, params, [PROMPTS[2]], new, temperature=0.0).tolist() == [expected[2]]


def test_sampling_is_reproducible_and_top_k_1_is_greedy():
    model, params = tiny()
    kwargs = dict(temperature=1.0, top_k=0, top_p=1.0)
    first = sample.generate(model, params, PROMPTS, NEW, seed=1, **kwargs)
    assert np.array_equal(first, sample.generate(model, params, PROMPTS, NEW, seed=1, **kwargs))
    assert not np.array_equal(first, sample.generate(model, params, PROMPTS, NEW, seed=2, **kwargs))
    greedy = sample.generate(model, params, PROMPTS, NEW, temperature=0.0)
    assert not np.array_equal(first, greedy)
    top1 = sample.generate(model, params, PROMPTS, NEW, temperature=1.5, top_k=1, seed=3)
    tiny_nucleus = sample.generate(model, params, PROMPTS, NEW, temperature=1.5, top_p=1e-6, seed=3)
    assert np.array_equal(top1, greedy) and np.array_equal(tiny_nucleus, greedy)
    # rows of one prompt draw different continuations
    rows = sample.generate(model, params, [PROMPTS[1]] * 3, NEW, temperature=1.0, seed=0)
    assert len({tuple(r) for r in rows.tolist()}) > 1


def test_filter_logits_keeps_the_top_k_and_the_nucleus():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    kept = lambda **kw: np.isfinite(np.asarray(sample.filter_logits(logits, **kw))).tolist()  # noqa: E731
    base = dict(vocab_size=4, temperature=1.0, top_k=0, top_p=1.0)
    assert kept(**{**base, "top_k": 2}) == [[True, True, False, False]]
    assert kept(**{**base, "top_p": 0.7}) == [[True, True, False, False]]
    assert kept(**{**base, "top_p": 0.5}) == [[True, False, False, False]]
    assert kept(**{**base, "vocab_size": 3}) == [[True, True, True, False]]
    assert kept(**base) == [[True, True, True, True]]


def test_categorical_draws_each_id_with_its_probability_and_never_an_impossible_one():
    probs = np.zeros(130, np.float32)  # three blocks of CDF_BLOCK ids, the last one short
    probs[[0, 63, 64, 129]] = [0.1, 0.2, 0.3, 0.4]
    keys = jax.vmap(jax.random.PRNGKey)(np.arange(4000))
    logits = np.where(probs > 0, np.log(np.maximum(probs, 1e-30)), -np.inf)
    drawn = np.asarray(sample.categorical(keys, np.broadcast_to(logits, (4000, 130))))
    counts = np.bincount(drawn, minlength=130) / 4000
    assert set(np.flatnonzero(counts)) == {0, 63, 64, 129}
    np.testing.assert_allclose(counts[[0, 63, 64, 129]], [0.1, 0.2, 0.3, 0.4], atol=0.03)


def test_the_two_level_argmax_is_jnp_argmax_ties_included():
    logits = np.random.default_rng(0).integers(0, 5, (6, 130)).astype(np.float32)  # many equal maxima
    logits[1, :] = -np.inf
    logits[2, 129] = 9.0  # in the last, short block
    assert np.asarray(sample.argmax(logits)).tolist() == np.argmax(logits, axis=-1).tolist()


def test_padded_ids_are_never_drawn():
    model, params = tiny()
    # Padded rows of the tied embedding far larger than the rest: unmasked, those ids would take nearly all the
    # probability. No input is a padded id, so these rows only act through the output head.
    wte = np.array(params["wte"]["embedding"])
    wte[CFG.vocab_size:] = 50.0 * np.random.default_rng(0).standard_normal(wte[CFG.vocab_size:].shape)
    params = {**params, "wte": {"embedding": jax.numpy.asarray(wte)}}
    logits = apply(model, params, np.array([PROMPTS[0]], np.int32))
    assert np.argmax(logits[0, -1]) >= CFG.vocab_size  # the test has teeth
    for use_cache in (True, False):
        drawn = sample.generate(model, params, PROMPTS, NEW, temperature=2.0, top_k=0, use_cache=use_cache)
        assert drawn.max() < CFG.vocab_size


def test_stop_token_ends_a_row_and_the_stream_equals_the_loop():
    model, params = tiny()
    greedy = sample.generate(model, params, PROMPTS, NEW, temperature=0.0)[0].tolist()
    stop = greedy[4]
    first = greedy.index(stop)
    stopped = sample.generate(model, params, PROMPTS, NEW, temperature=0.0, stop_token=stop)[0].tolist()
    assert stopped == greedy[:first + 1] + [stop] * (NEW - 1 - first)  # the stop token, then padding with it
    assert list(serving.token_stream(model, params, PROMPTS[0], NEW, temperature=0.0, stop_token=stop)) == \
        greedy[:first]  # the stream ends before the stop token
    for kwargs in (dict(temperature=0.9, top_k=20, top_p=0.9, seed=4), dict(temperature=0.0, top_k=0)):
        streamed = list(serving.token_stream(model, params, PROMPTS[0], NEW, stop_token=None, **kwargs))
        assert streamed == sample.generate(model, params, [PROMPTS[0]], NEW, **kwargs)[0].tolist()


def test_plan_reads_the_cache_by_spans_and_crops_past_block_size():
    assert sample.cache_span(1, 1024) == 64 and sample.cache_span(65, 1024) == 128 and sample.cache_span(9, 16) == 16
    assert sample.plan(16, 1024, 48) == [sample.Segment(0, 48, 64, True)]
    assert sample.plan(60, 1024, 10) == [sample.Segment(0, 5, 64, True), sample.Segment(5, 10, 128, True)]
    # block_size 16: the 13-token prompt fills its window at step 3, the last cached one; then the whole window
    assert sample.plan(13, 16, 6) == [sample.Segment(0, 4, 16, True), sample.Segment(4, 6, 16, False)]
    assert sample.plan(13, 16, 6, use_cache=False) == [sample.Segment(0, 6, 16, False)]


def test_one_compile_per_span_for_any_prompt_length_and_settings():
    model, params = tiny()
    sample.generate(model, params, [[1]], NEW, temperature=0.0)
    list(serving.token_stream(model, params, [1], NEW, temperature=0.0))
    compiled = (sample._start._cache_size(), sample._decode_loop._cache_size(), serving._decode_step._cache_size(),
                serving._prefill._cache_size())
    sample.generate(model, params, [list(range(15))], NEW, temperature=0.7, top_k=5, top_p=0.5, seed=9)
    for new_tokens in (3, 13, 40):  # other lengths: the same loops, whose output is MIN_OUT_WIDTH wide
        assert sample.generate(model, params, [[2]], new_tokens, temperature=0.0).shape == (1, new_tokens)
    list(serving.token_stream(model, params, list(range(40)), NEW, temperature=1.3, top_k=3, top_p=0.8, seed=1))
    assert (sample._start._cache_size(), sample._decode_loop._cache_size(), serving._decode_step._cache_size(),
            serving._prefill._cache_size()) == compiled


def decode_rows(batch, steps):
    """Each row's tokens over `steps` steps of a RowBatch, by prompt index."""
    got = {row: [] for row in batch.rows}
    for _ in range(steps):
        for row, token in zip(list(batch.rows), batch.step()):
            got[row].append(token)
    return got


def test_a_batch_of_rows_with_their_own_settings_decodes_each_as_alone():
    """serve.py's batches: each row its own prompt, settings and seed, and the tokens it would get alone."""
    model, params = tiny()
    start = serving.make_decoder(Config(model=CFG), random_weights(CFG))
    rows = [Sampling(0.0), Sampling(1.0, 5, 0.9, seed=3, sample=1), Sampling(0.7, seed=9)]
    got = decode_rows(start(PROMPTS, rows), NEW)
    for row, (prompt, how) in enumerate(zip(PROMPTS, rows)):
        alone = sample.generate(model, params, [prompt], NEW, temperature=how.temperature, top_k=how.top_k,
                                top_p=how.top_p, seed=how.seed, samples=[how.sample])
        assert got[row] == alone[0].tolist(), row
    assert got[0] == plain_greedy(model, params, PROMPTS[0], NEW)


def test_freed_rows_leave_the_batch_and_the_others_decode_on():
    model, params = tiny()
    batch = serving.make_decoder(Config(model=CFG), random_weights(CFG))(PROMPTS * 2, [Sampling(0.0)] * 6)
    assert batch.state.window.shape[0] == 8  # padded to a power of two
    first = batch.step()
    batch.free([0, 2, 4])
    assert batch.rows == [1, 3, 5] and batch.state.window.shape[0] == 4  # half or fewer live: a smaller batch
    rest = decode_rows(batch, NEW - 1)
    for row in (1, 3, 5):
        assert [first[row]] + rest[row] == plain_greedy(model, params, PROMPTS[row % 3], NEW)
    batch.free([1])
    assert batch.rows == [3, 5] and batch.state.window.shape[0] == 2


def test_rows_that_join_a_running_batch_decode_as_they_would_alone():
    """serve.py's requests join the batch that runs when they come, at the next step: each row still gets the tokens
    it would get alone (its own positions, its own key from its own first token)."""
    model, params = tiny()
    start = serving.make_decoder(Config(model=CFG), random_weights(CFG))
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
    assert batch.state.window.shape[0] == 4  # 3 live rows in a batch of a power of two
    for name, (prompt, how) in asked.items():
        steps = len(got[name])
        assert steps == (5 if name == 0 else NEW - began[name])
        alone = sample.generate(model, params, [prompt], steps, temperature=how.temperature, top_k=how.top_k,
                                top_p=how.top_p, seed=how.seed, samples=[how.sample])
        assert got[name] == alone[0].tolist(), name


def test_samples_split_over_calls_draw_what_one_call_draws():
    """sample.py's batches: row i draws from the key of (seed, i) wherever it falls."""
    model, params = tiny()
    kwargs = dict(temperature=1.0, top_k=10, seed=5)
    whole = sample.generate(model, params, [PROMPTS[1]] * 3, NEW, **kwargs)
    parts = [sample.generate(model, params, [PROMPTS[1]] * len(rows), NEW, samples=rows, **kwargs)
             for rows in ([0], [1], [2])]
    assert np.array_equal(np.concatenate(parts), whole) and len({tuple(r) for r in whole.tolist()}) > 1


def test_the_plan_is_a_handful_of_segments_for_any_length(monkeypatch):
    """The plan was built step by step in Python: 10**8 new tokens spent minutes before the first one (issue 32)."""
    spans = []
    monkeypatch.setattr(sample, "cache_span", lambda *args: spans.append(args) or cache_span(*args))
    assert len(sample.plan(5, 1024, 10**6)) == 6 and len(spans) < 100  # not a call per step
    monkeypatch.undo()

    def stepwise(longest, block_size, new, use_cache):  # the plan as it was built
        segments = []
        for step in range(new):
            cached = use_cache and longest + step <= block_size
            span = sample.cache_span(min(longest + step, block_size), block_size)
            if segments and segments[-1].span == span and segments[-1].cached == cached:
                segments[-1] = segments[-1]._replace(end=step + 1)
            else:
                segments.append(sample.Segment(step, step + 1, span, cached))
        return segments

    for longest, block_size, new, use_cache in [(1, 16, 40, True), (16, 16, 3, True), (13, 16, 6, False),
                                                (1, 1024, 2000, True), (700, 1024, 700, True), (64, 256, 1, True),
                                                (65, 256, 300, False), (3, 64, 62, True)]:
        assert sample.plan(longest, block_size, new, use_cache) == stepwise(longest, block_size, new, use_cache)
    assert sample.plan(5, 1024, 10**12) == [sample.Segment(0, 60, 64, True), sample.Segment(60, 124, 128, True),
                                            sample.Segment(124, 252, 256, True), sample.Segment(252, 508, 512, True),
                                            sample.Segment(508, 1020, 1024, True),
                                            sample.Segment(1020, 10**12, 1024, False)]


def test_sample_text_includes_the_prompt():
    model, params = tiny()  # a toy vocabulary: the prompt falls back to token 0
    assert isinstance(sample.sample_text(model, params, max_new_tokens=5), str)


def test_empty_prompt_is_refused():
    model, params = tiny()
    with pytest.raises(ValueError, match="at least one token"):
        sample.generate(model, params, [[1], []], 4)


def test_bf16_inference_keeps_bf16_parameters_and_draws_real_ids():
    config = Config(model=CFG)
    model, params = sample.load_model(config, random_weights(CFG), "bf16")
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {np.dtype(jax.numpy.bfloat16)}
    out = sample.make_generate(config, random_weights(CFG), precision="bf16")(PROMPTS, NEW, temperature=0.0)
    assert out.shape == (3, NEW) and out.max() < CFG.vocab_size
