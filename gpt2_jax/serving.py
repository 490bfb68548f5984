"""The decoding serve.py runs (gpt2_common/batching.py's decode loop): rows decoded together one token at a time,
each with its own prompt and settings, rows joining a running batch and leaving it as they come and go. Built on the
sampler of gpt2_jax/sample.py: the same prefill and decoding step, one jitted call a token; `token_stream` is one
row of it. The mirror of gpt2_torch/serving.py.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gpt2_common.tokenizer import EOT_TOKEN
from gpt2_jax.model import GPT, KVCache
from gpt2_jax.sample import (DecodeState, Segment, Settings, _fit_cache, _grow_cache, cache_span, decode_step,
                             load_model, prefill, prefill_chunk, prompt_window, settings)

_prefill = jax.jit(prefill, static_argnums=(0, 4, 5))
# The state is donated: the cache is updated in place instead of copied every token.
_decode_step = jax.jit(decode_step, static_argnums=(0, 4, 5), donate_argnums=2)


def _bucket(rows: int) -> int:
    """The rows a batch of `rows` is padded to: the next power of two, so that a server's batches of any size run
    a handful of compiled steps (one per bucket and span)."""
    return 1 << max(rows - 1, 0).bit_length()


class RowBatch:
    """Rows decoded together one token at a time, each with its own prompt and settings (serve.py's batch):
    `step()` gives the next token of every live row, `add(prompts, how)` lets rows join at the next step, `free(rows)`
    drops rows whose completion is over (its stop, its length, its client gone). The batch is padded to a power of
    two rows, so that any traffic runs a handful of compiled steps: joining rows take free slots first (a slot of a
    freed row, a padding row), and once at most half the slots are live, the live rows move to a smaller batch, so
    that freed rows stop costing work. Rows are named by the order they came in (0, 1, ... from the first prompts)."""

    def __init__(self, model: GPT, params: Any, prompts: Sequence[Sequence[int]], how: Settings,
                 use_cache: bool = True):
        self.model, self.params, self.use_cache = model, params, use_cache
        self.rows: list[int] = []  # the live rows' names, in the order they came
        self.positions = np.zeros(0, np.int32)  # ... and each one's slot in the batch
        self.lengths = np.zeros(0, np.int64)  # ... and its context's length, not cropped (host-side: no device read)
        self.cached, self.named, self.steps, self.state, self.how = use_cache, 0, 0, None, None
        self.add(prompts, how)

    def add(self, prompts: Sequence[Sequence[int]], how: Settings) -> list[int]:
        """Rows that join at the next step (their prompts prefilled now): their names. `how`: their Settings, or
        one gpt2_common.batching.Sampling a prompt."""
        if not isinstance(how, Settings):
            how = from_sampling(how, None if self.how is None else int(self.how.stop_token))
        block = self.model.config.block_size
        window, length = prompt_window(prompts, block)
        if self.state is None:
            size = _bucket(len(prompts))
            self.state = DecodeState(np.zeros((size, block), np.int32), np.ones(size, np.int32), None,
                                     np.ones(size, bool), np.int32(0))
            self.how = _host_rows(how, np.zeros(size, np.int32))
        free = np.setdiff1d(np.arange(self.state.window.shape[0]), self.positions)
        if len(free) < len(prompts):
            self._resize(_bucket(len(self.rows) + len(prompts)))
            free = np.setdiff1d(np.arange(self.state.window.shape[0]), self.positions)
        slots = free[:len(prompts)]
        names = list(range(self.named, self.named + len(prompts)))
        self.named += len(prompts)
        self.rows += names
        self.positions = np.concatenate([self.positions, slots]).astype(np.int32)
        self.lengths = np.concatenate([self.lengths, length])
        # The joining rows padded to a power of two, so that joins compile once per size: the padding's slot is past
        # the batch's end, and its writes are dropped.
        rows, size = _bucket(len(prompts)), self.state.window.shape[0]
        index = np.minimum(np.arange(rows), len(prompts) - 1)
        window, length = window[index], length[index]
        cache = None
        if self.cached:  # the new prompts into a cache of their own, which _join copies into the batch's
            span = self._span()
            cache = _prefill(self.model, self.params, window, length, span,
                             prefill_chunk(int(length.max()), span)).cache
            held = self.state.cache
            self.state = self.state._replace(cache=_empty_cache(self.model, size, span) if held is None else
                                             _grow_cache(held, span))
        joined = _host_rows(how, index)._replace(first_step=np.full(rows, self.steps, np.int32))
        self.state, self.how = _join(self.state, self.how, window, length, cache, joined,
                                     np.concatenate([slots, np.full(rows - len(slots), size)]).astype(np.int32))
        return names

    def step(self) -> list[int]:
        """The next token of each live row, in the order of self.rows."""
        # Past block_size a window slides and the cache no longer matches it: the whole batch runs uncached from the
        # step after the one that fills the longest window, as generate() does.
        self.cached = self.cached and int(self.lengths.max()) <= self.model.config.block_size
        segment = Segment(0, 1, self._span(), self.cached)
        self.state = _fit_cache(self.state, segment)
        self.state, token = _decode_step(self.model, self.params, self.state, self.how, segment.span,
                                         segment.cached)
        self.lengths += 1
        self.steps += 1
        return np.asarray(token)[self.positions].tolist()

    def _span(self) -> int:
        """The cache positions (or window positions) the next step reads: as many as the longest live row needs,
        never fewer than the cache holds (freed rows do not shrink it: a narrower step would be another compile)."""
        block = self.model.config.block_size
        held = 0 if self.state.cache is None else self.state.cache.k.shape[2]
        return max(cache_span(min(int(self.lengths.max()), block), block), held)

    def free(self, rows) -> None:
        """Stops decoding these rows."""
        keep = np.array([row not in set(rows) for row in self.rows], bool)
        self.rows = [row for row, kept in zip(self.rows, keep) if kept]
        self.positions, self.lengths = self.positions[keep], self.lengths[keep]
        if self.rows and len(self.rows) <= self.state.window.shape[0] // 2:
            self._resize(_bucket(len(self.rows)))

    def _resize(self, size: int) -> None:
        """The live rows alone in the first slots of a batch of `size` rows; the other slots are padding, done."""
        live = len(self.positions)
        index = np.concatenate([self.positions, np.full(size - live, self.positions[0] if live else 0)])
        self.state, self.how = _gather(self.state, self.how, index.astype(np.int32), np.int32(live))
        self.positions = np.arange(live, dtype=np.int32)


ROW_SETTINGS = ("temperature", "top_k", "top_p", "keys", "first_step")


def _host_rows(how: Settings, index: np.ndarray) -> Settings:
    """The settings (numpy arrays, as settings() makes them) of the rows `index` names."""
    return how._replace(**{name: np.asarray(getattr(how, name))[index] for name in ROW_SETTINGS})


@functools.partial(jax.jit, donate_argnums=0)
def _join(state: DecodeState, how: Settings, window, length, cache, joined: Settings, slots):
    """Rows into their slots of a batch: their windows, lengths, settings and (where the batch is cached) the cache
    their prompts were prefilled into; slots past the batch's end are dropped."""
    def put(into, rows):
        return into.at[slots].set(rows, mode="drop")

    if state.cache is not None:
        state = state._replace(cache=KVCache(*(c.at[:, slots].set(n, mode="drop") for c, n in zip(state.cache, cache))))
    state = state._replace(window=put(state.window, window), length=put(state.length, length),
                           done=put(state.done, jnp.zeros(slots.shape, bool)))
    return state, how._replace(**{name: put(getattr(how, name), getattr(joined, name)) for name in ROW_SETTINGS})


@jax.jit
def _gather(state: DecodeState, how: Settings, index, live):
    """The batch of the rows `index` names, those from `live` on padding (done)."""
    cache = None if state.cache is None else KVCache(state.cache.k[:, index], state.cache.v[:, index])
    state = DecodeState(state.window[index], state.length[index], cache,
                        state.done[index] | (jnp.arange(index.shape[0]) >= live), state.step)
    return state, how._replace(**{name: getattr(how, name)[index] for name in ROW_SETTINGS})


def _empty_cache(model: GPT, rows: int, span: int) -> KVCache:
    cfg = model.config
    shape = (cfg.n_layer, rows, span, cfg.n_head, cfg.head_dim)
    return KVCache(jnp.zeros(shape, model.dtype), jnp.zeros(shape, model.dtype))


def from_sampling(sampling, stop_token: int | None) -> Settings:
    """The Settings of rows given one gpt2_common.batching.Sampling each (serve.py's requests)."""
    return settings(len(sampling), [s.temperature for s in sampling], [s.top_k for s in sampling],
                    [s.top_p for s in sampling], stop_token, [s.seed for s in sampling], [s.sample for s in sampling])


def token_stream(model: GPT, params: Any, prompt: Sequence[int], max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_token: int | None = EOT_TOKEN,
                 use_cache: bool = True) -> Iterator[int]:
    """The continuation of one prompt, token by token as each is drawn (the stop token ends it and is not
    yielded): the same tokens as generate() for the same arguments, from one compiled prefill and one compiled
    step per span whatever the prompt or settings."""
    rows = RowBatch(model, params, [prompt], settings(1, temperature, top_k, top_p, stop_token, seed), use_cache)
    for _ in range(max_new_tokens):
        token = rows.step()[0]
        if token == stop_token:
            return
        yield token


def make_decoder(config, weights, precision: str = "fp32"):
    """`start(prompts, sampling) -> RowBatch` for gpt2_common.batching (what serve.py's decode loop runs), from a
    Config and canonical weights; `sampling` has one gpt2_common.batching.Sampling a prompt (temperature, top_k,
    top_p, seed, sample). Rows stop at <|endoftext|>."""
    model, params = load_model(config, weights, precision)
    stop = EOT_TOKEN if config.model.vocab_size > EOT_TOKEN else None

    def start(prompts: Sequence[Sequence[int]], sampling) -> RowBatch:
        return RowBatch(model, params, prompts, from_sampling(sampling, stop))

    return start
