"""Text generation with a KV cache, step for step the sampler of gpt2_torch/sample.py, with the same contract:
`generate(model, params, prompts, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, seed=0, stop_token=None)`
takes a list of prompts (token id lists of any lengths) and returns the new tokens only, int32 [B, max_new_tokens].

Decoding is explicit state (DecodeState) and one step is a pure function of it, so the same step runs inside
compiled while_loops (`generate`) and as one jitted call per token (`RowBatch`, `token_stream`: for serve.py).

- Prompts: a batch holds each row's context left-aligned in a [B, block_size] window with its own length, so prompts
  of different lengths decode together, each row at its own position; the prompt enters the cache PREFILL_CHUNK
  tokens at a time (work in proportion to the prompt, not to block_size).
- The cache holds `span` positions, a power of two that grows with the longest row (cache_span), so that a step
  reads what the rows wrote rather than block_size positions; one compiled loop runs each span (`plan`), a handful
  per generation, and new prompts or settings reuse them.
- Past block_size: positions are learned only up to block_size, so a full cache cannot slide. Like nanoGPT we crop
  the context to its last block_size tokens and run the whole window for each further token; cached and uncached
  generation then give the same tokens.
- Sampling: temperature (0: greedy), top-k (0: off), top-p (1: off), each row its own, all traced values (new
  settings do not recompile); padded vocabulary ids never drawn; a row stops at the stop token and is padded with it
  after. Each row draws from its own key, made from its seed and its sample's index, so that a sample's tokens
  depend on them and not on the rows beside it (sample.py's batches, serve.py's mixed requests).
- Serving (RowBatch): rows decoded together one step at a time, each freed when its client has what it wants; the
  batch is padded to a power of two rows, so that any number of requests reuses a handful of compiled steps.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from gpt2_common.tokenizer import EOT_TOKEN, decode, get_tokenizer
from gpt2_jax.model import GPT, KVCache, mask_padded_vocab

PREFILL_CHUNK = 64
MIN_PREFILL_CHUNK = 16
NO_STOP = -1  # a stop token that is never drawn


class Settings(NamedTuple):
    """How each row draws its next token; traced, so that other values reuse the compiled step."""

    temperature: jax.Array  # float32 [B]; 0: greedy
    top_k: jax.Array  # int32 [B]; 0: off
    top_p: jax.Array  # float32 [B]; 1: off
    keys: jax.Array  # uint32 [B, 2]: each row's random key, from its seed and its sample's index
    first_step: jax.Array  # int32 [B]: the step at which the row began (a row that joins a running batch draws
    # its n-th token from the key it would draw it from alone)
    stop_token: jax.Array  # int32 []; NO_STOP: none


class DecodeState(NamedTuple):
    window: jax.Array  # int32 [B, block_size]: each row's context (its last <= block_size tokens), left-aligned
    length: jax.Array  # int32 [B]: tokens in each row's window
    cache: KVCache | None  # keys and values [n_layer, B, span, ...] of each row's positions < length - 1; None
    # once the context has slid past block_size (or without the cache)
    done: jax.Array  # bool [B]: the row has drawn the stop token
    step: jax.Array  # int32 []: tokens drawn so far


_row_keys = jax.jit(jax.vmap(lambda seed, sample: jax.random.fold_in(jax.random.PRNGKey(seed), sample)))


def settings(rows: int, temperature=0.8, top_k=0, top_p=1.0, stop_token: int | None = None, seed=0,
             samples: Sequence[int] | None = None) -> Settings:
    """The settings of `rows` rows: temperature, top_k, top_p and seed each one value for all or one a row. Row i
    draws from the key of (its seed, samples[i]) (default: i, its sample's index)."""
    def per_row(value, dtype):
        return np.broadcast_to(np.asarray(value, dtype), (rows,)).copy()

    samples = np.arange(rows) if samples is None else samples
    keys = np.asarray(_row_keys(per_row(seed, np.uint32), per_row(samples, np.uint32)))
    return Settings(per_row(temperature, np.float32), per_row(top_k, np.int32), per_row(top_p, np.float32), keys,
                    np.zeros(rows, np.int32), np.int32(NO_STOP if stop_token is None else stop_token))


# --- drawing a token -------------------------------------------------------------------------------------------------

def _column(value) -> jax.Array:
    """A setting for every row ([B]) or for all (a scalar), as a column that broadcasts over [B, V]."""
    return jnp.reshape(jnp.asarray(value), (-1, 1))


def filter_logits(logits: jax.Array, vocab_size: int, temperature: jax.Array, top_k: jax.Array,
                  top_p: jax.Array) -> jax.Array:
    """Next-token logits [B, V] -> the logits to sample from, divided by the temperature: padded ids, those outside
    the top k and those outside the nucleus of probability top_p all at -inf. The settings are one for all or one a
    row ([B]); k and p are traced: one sort serves both, where lax.top_k would need k static."""
    logits = mask_padded_vocab(logits.astype(jnp.float32), vocab_size) / _column(temperature)
    ranked = -jnp.sort(-logits, axis=-1)  # descending
    top_k, top_p = _column(top_k), _column(top_p)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, logits.shape[-1]), logits.shape[-1])
    ranked = jnp.where(jnp.arange(logits.shape[-1]) < k, ranked, -jnp.inf)
    probs = jax.nn.softmax(ranked, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # The nucleus is the shortest prefix whose mass reaches top_p (the first id always): keep what is at least the
    # smallest logit in it. top_p >= 1 keeps all, even ids whose mass_before rounds up to 1.
    in_nucleus = (mass_before < top_p) | (top_p >= 1.0)
    kept = jnp.sum(in_nucleus & (ranked > -jnp.inf), axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(ranked, jnp.maximum(kept - 1, 0), axis=-1)
    return jnp.where(logits < cutoff, -jnp.inf, logits)


CDF_BLOCK = 64


def categorical(keys: jax.Array, logits: jax.Array) -> jax.Array:
    """One id [B] from each row of logits [B, V] (-inf: never), row i with its key keys[i]: the inverse of the
    cumulative distribution at one uniform number a row, found in two levels (a block of CDF_BLOCK ids, then the id
    in it), where jax.random.categorical draws Gumbel noise for every id: at 16 rows of GPT-2's vocabulary, 2 ms to
    its 26 on the 2-core CPU, more than a small model's whole step."""
    rows, width = logits.shape
    probs = jax.nn.softmax(logits, axis=-1)
    blocks = jnp.pad(probs, ((0, 0), (0, -width % CDF_BLOCK))).reshape(rows, -1, CDF_BLOCK)
    mass = blocks.sum(axis=-1)
    cdf = jnp.cumsum(mass, axis=-1)
    u = jax.vmap(jax.random.uniform)(keys) * cdf[:, -1]
    search = jax.vmap(functools.partial(jnp.searchsorted, side="right"))
    block = jnp.minimum(search(cdf, u), cdf.shape[1] - 1)
    row = jnp.arange(rows)
    inside = blocks[row, block]
    index = search(jnp.cumsum(inside, axis=-1), u - (cdf[row, block] - mass[row, block]))
    # rounding may point past the block's last id of any probability (a padded id, say): never beyond it
    last = CDF_BLOCK - 1 - jnp.argmax((inside > 0)[:, ::-1], axis=-1)
    return (block * CDF_BLOCK + jnp.minimum(index, last)).astype(jnp.int32)


def sample_next(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array, vocab_size: int,
                top_p: jax.Array = 1.0) -> jax.Array:
    """Next ids [B] from logits [B, V], each row with its own key [B, 2] and settings [B]: padded ids never; greedy
    (argmax) where the temperature is 0."""
    greedy = jnp.argmax(mask_padded_vocab(logits.astype(jnp.float32), vocab_size), axis=-1).astype(jnp.int32)
    sampled = temperature > 0

    def draw(logits):
        temperatures = jnp.where(sampled, temperature, 1.0)

        def unfiltered(logits):  # what filter_logits gives where no row filters, without its sort
            return mask_padded_vocab(logits.astype(jnp.float32), vocab_size) / _column(temperatures)

        # XLA's CPU sort of a 50304-wide row takes tens of ms, far more than a small model's step: only where a row
        # asks for top-k or top-p
        filters = jnp.any(((top_k > 0) & (top_k < logits.shape[-1])) | (top_p < 1.0))
        filtered = jax.lax.cond(filters, lambda logits: filter_logits(logits, vocab_size, temperatures, top_k, top_p),
                                unfiltered, logits)
        return jnp.where(sampled, categorical(keys, filtered), greedy)

    return jax.lax.cond(jnp.any(sampled), draw, lambda _: greedy, logits)  # an all-greedy batch skips the sort


# --- the decoding state ----------------------------------------------------------------------------------------------

def cache_span(length: int, block_size: int) -> int:
    """The cache positions a step reads (and the width of the uncached step's window) while the longest row holds
    `length` tokens: the next power of two, at least PREFILL_CHUNK, at most block_size. A step then reads about as
    much of the cache as the rows have written, not all block_size positions (at GPT-2 small's 1024 and a short
    prompt, the full cache was most of the attention's work), and a generation compiles one step per span it passes
    through (a handful), not one per length."""
    span = max(PREFILL_CHUNK, 1 << max(length - 1, 0).bit_length())
    return min(span, block_size)


def prefill_chunk(longest: int, span: int) -> int:
    """Positions one prefill call feeds: the prompt less its last token, rounded up to a power of two (at least
    MIN_PREFILL_CHUNK: three shapes in all), at most PREFILL_CHUNK and span. Feeding 64 positions for a 16-token
    prompt would spend 4x the prompt's work, which at batch 16 of GPT-2 small cost more than the 48 tokens after."""
    needed = max(longest - 1, 1)
    return min(span, PREFILL_CHUNK, max(MIN_PREFILL_CHUNK, 1 << (needed - 1).bit_length()))


class Segment(NamedTuple):
    """A run of decoding steps that one compiled loop takes: steps [begin, end) read `span` positions, with the cache
    (`cached`) or through the whole window."""

    begin: int
    end: int
    span: int
    cached: bool


def plan(longest: int, block_size: int, max_new_tokens: int, use_cache: bool = True) -> list[Segment]:
    """The segments of a generation whose longest prompt has `longest` tokens (<= block_size). Every row grows by
    one token a step, so the host knows each step's span without reading anything back from the device, and where
    each segment ends without walking its steps: a handful of segments for any max_new_tokens.

    Past block_size the cache cannot slide (positions are learned only up to block_size): like nanoGPT, the context
    is cropped to its last block_size tokens and the whole window runs for each further token. The step that fills
    the longest row's window (length block_size) is the last cached one."""
    segments: list[Segment] = []
    step = 0
    while step < max_new_tokens:
        span = cache_span(min(longest + step, block_size), block_size)
        cached = use_cache and longest + step <= block_size
        if span < block_size or cached:  # on until the longest row outgrows the span (or the cache, the window)
            end = min(span, block_size) - longest + 1
        else:  # the window has slid (or there is no cache): whole windows to the end
            end = max_new_tokens
        segments.append(Segment(step, min(end, max_new_tokens), span, cached))
        step = segments[-1].end
    return segments


def prefill(model: GPT, params: Any, window: jax.Array, length: jax.Array, span: int, chunk: int) -> DecodeState:
    """The start of decoding: each row's prompt but its last token into a fresh cache of `span` positions (the first
    step feeds the last one and draws from its logits), `chunk` positions at a time (prefill_chunk) up to the
    longest prompt."""
    batch = window.shape[0]

    def fill(i, cache):
        start = jnp.minimum(i * chunk, span - chunk)  # the last chunk steps back to fit; recomputing is harmless
        ids = jax.lax.dynamic_slice_in_dim(window, start, chunk, axis=1)
        positions = jnp.broadcast_to(start + jnp.arange(chunk, dtype=jnp.int32), ids.shape)
        # Positions past a row's prompt get keys of padding: each is overwritten by the step that feeds a token there
        # before any query can see it. The logits are dropped, so XLA never computes the head here.
        return model.apply({"params": params}, ids, positions, cache, method=GPT.decode)[1]

    cfg = model.config
    shape = (cfg.n_layer, batch, span, cfg.n_head, cfg.head_dim)
    cache = KVCache(jnp.zeros(shape, model.dtype), jnp.zeros(shape, model.dtype))
    chunks = (jnp.max(length) - 1 + chunk - 1) // chunk
    cache = jax.lax.fori_loop(0, chunks, fill, cache)
    return DecodeState(window, length, cache, jnp.zeros(batch, bool), jnp.array(0, jnp.int32))


def grow_cache(cache: KVCache, span: int) -> KVCache:
    """The cache with room for `span` positions (zeros after the old ones, which no query sees before they are
    written)."""
    more = span - cache.k.shape[2]
    if more <= 0:
        return cache
    pad = [(0, 0), (0, 0), (0, more), (0, 0), (0, 0)]
    return KVCache(jnp.pad(cache.k, pad), jnp.pad(cache.v, pad))


def decode_step(model: GPT, params: Any, state: DecodeState, how: Settings, span: int,
                cached: bool = True) -> tuple[DecodeState, jax.Array]:
    """One token for every row: (the next state, the tokens [B]). Rows that are done draw the stop token again.

    Cached: each row's last token through the model over the cache (which must hold `span` positions). Else the
    first `span` positions of each row's window through the model, nanoGPT's step (causal: the padding after a
    shorter row's tokens does not reach them); past block_size, span is block_size and the window the cropped
    context."""
    batch, size = state.window.shape
    rows = jnp.arange(batch)
    if cached:
        cache = grow_cache(state.cache, span)
        position = state.length - 1  # feed each row's last token; the cache holds those before it
        token = state.window[rows, position][:, None]
        logits, cache = model.apply({"params": params}, token, position[:, None], cache, method=GPT.decode)
        logits = logits[:, 0]
    else:
        cache = None
        logits = model.apply({"params": params}, state.window[:, :span])[rows, state.length - 1]
    keys = jax.vmap(jax.random.fold_in)(how.keys, state.step - how.first_step)  # each row's key for its token
    token = sample_next(logits, keys, how.temperature, how.top_k, model.config.vocab_size, how.top_p)
    token = jnp.where(state.done, how.stop_token, token)
    full = state.length == size
    window = jnp.where(full[:, None], jnp.roll(state.window, -1, axis=1), state.window)  # crop to the last size
    window = window.at[rows, jnp.where(full, size - 1, state.length)].set(token)
    return DecodeState(window, jnp.minimum(state.length + 1, size), cache, state.done | (token == how.stop_token),
                       state.step + 1), token


# --- generation -------------------------------------------------------------------------------------------------------

def prompt_window(prompts: Sequence[Sequence[int]], block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(window int32 [B, block_size], length int32 [B]): each prompt cropped to its last block_size tokens, as
    nanoGPT crops, and left-aligned."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. the tokens of '\\n')")
    window = np.zeros((len(prompts), block_size), np.int32)
    length = np.zeros(len(prompts), np.int32)
    for row, prompt in enumerate(prompts):
        cropped = list(prompt)[-block_size:]
        window[row, :len(cropped)], length[row] = cropped, len(cropped)
    return window, length


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "span", "chunk", "cached"))
def _start(model: GPT, params: Any, window: jax.Array, length: jax.Array, how: Settings, *, max_new_tokens: int,
           span: int, chunk: int, cached: bool) -> tuple[DecodeState, jax.Array]:
    """The first state (prefilled when cached) and the output [B, max_new_tokens], filled with the stop token."""
    if cached:
        state = prefill(model, params, window, length, span, chunk)
    else:
        state = DecodeState(window, length, None, jnp.zeros(window.shape[0], bool), jnp.array(0, jnp.int32))
    return state, jnp.full((window.shape[0], max_new_tokens), jnp.maximum(how.stop_token, 0), jnp.int32)


# The state and output are donated: the cache and the output are updated in place, not copied.
@functools.partial(jax.jit, static_argnames=("model", "span", "cached"), donate_argnames=("state", "out"))
def _decode_loop(model: GPT, params: Any, state: DecodeState, out: jax.Array, how: Settings, end: jax.Array, *,
                 span: int, cached: bool) -> tuple[DecodeState, jax.Array]:
    """Steps up to `end` (one Segment) in one compiled loop, which ends early once every row has stopped."""
    if cached:
        state = state._replace(cache=grow_cache(state.cache, span))  # the loop carries one shape
    else:
        state = state._replace(cache=None)

    def running(carry):
        state, _ = carry
        return (state.step < end) & ~jnp.all(state.done)

    def step(carry):
        state, out = carry
        state, token = decode_step(model, params, state, how, span, cached)
        return state, out.at[:, state.step - 1].set(token)

    return jax.lax.while_loop(running, step, (state, out))


_grow_cache = jax.jit(grow_cache, static_argnums=1)


def _fit_cache(state: DecodeState, segment: Segment) -> DecodeState:
    """The state with the cache a segment reads (grown to its span, or dropped once the context slides), made
    before the donating call, so that the call can update its cache in place."""
    if not segment.cached:
        return state._replace(cache=None)
    if state.cache.k.shape[2] < segment.span:
        return state._replace(cache=_grow_cache(state.cache, segment.span))
    return state


def generate(model: GPT, params: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             stop_token: int | None = None, use_cache: bool = True, sharding: Any = None,
             samples: Sequence[int] | None = None) -> np.ndarray:
    """The continuations of prompts (lists of token ids, of any lengths): int32 [len(prompts), max_new_tokens], the
    new tokens only; a row that draws `stop_token` is filled with it from there on. Temperature 0 is greedy; top_k 0
    and top_p 1 are off; each setting and the seed may also be a sequence, one a row. Reproducible for a seed: row
    i draws from the key of (seed, samples[i]) (default i), so that a batch of samples split in several calls
    (`samples` counting on) draws what one call would. The contract of gpt2_torch.sample.generate, which takes the
    same arguments (less `params` and `sharding`) and returns the same.

    A few compiled loops (one per Segment of `plan`) run one after another without reading anything back, so the
    only wait for the device is for the result. `sharding`: where the inputs go when params live on a mesh (a
    replicated NamedSharding of it), so that every process of a multi-host job runs the same computation.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    window, length = prompt_window(prompts, model.config.block_size)
    longest = int(length.max())
    segments = plan(longest, model.config.block_size, max_new_tokens, use_cache)
    inputs = (window, length, settings(len(prompts), temperature, top_k, top_p, stop_token, seed, samples))
    if sharding is not None:
        inputs = jax.device_put(inputs, sharding)
    window, length, how = inputs
    first = segments[0]
    state, out = _start(model, params, window, length, how, max_new_tokens=max_new_tokens, span=first.span,
                        chunk=prefill_chunk(longest, first.span), cached=first.cached)
    for segment in segments:
        state = _fit_cache(state, segment)
        state, out = _decode_loop(model, params, state, out, how, np.int32(segment.end), span=segment.span,
                                  cached=segment.cached)
    if sharding is not None:  # the result may span processes: give every process all of it
        return np.asarray(multihost_utils.process_allgather(out, tiled=True))
    return np.asarray(jax.device_get(out))


def sample_text(model: GPT, params: Any, prompt: str = "\n", max_new_tokens: int = 200, *,
                temperature: float = 0.8, top_k: int = 200, top_p: float = 1.0, seed: int = 0,
                sharding: Any = None) -> str:
    """A completion of `prompt` as text (the prompt included), reproducible for a seed: what a trainer prints at the
    end of a run. A model whose vocabulary is smaller than GPT-2's (a toy one) starts from token 0 instead."""
    prompt_ids = get_tokenizer().encode_ordinary(prompt) or [0]
    if max(prompt_ids) >= model.config.vocab_size:
        prompt_ids = [0]
    out = generate(model, params, [prompt_ids], max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   seed=seed, sharding=sharding)
    return decode(prompt_ids + out[0].tolist())


# --- one token at a time, rows freed as they finish -------------------------------------------------------------------

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


ROW_SETTINGS = ("temperature", "top_k", "top_p", "keys", "first_step")


def _empty_cache(model: GPT, rows: int, span: int) -> KVCache:
    cfg = model.config
    shape = (cfg.n_layer, rows, span, cfg.n_head, cfg.head_dim)
    return KVCache(jnp.zeros(shape, model.dtype), jnp.zeros(shape, model.dtype))


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


def load_model(config, weights, precision: str = "fp32") -> tuple[GPT, Any]:
    """(model, params on the default device) for a Config and canonical weights (gpt2_common.weights). precision
    "bf16" stores the parameters in bfloat16 too, not only the compute: decoding reads every weight once a token,
    so half the bytes is most of the gain, and fp32 parameters would be converted again at every step."""
    from gpt2_jax.model import build_model, compute_dtype
    from gpt2_jax.weights import from_canonical

    params = from_canonical(weights, config.model)
    if precision != "fp32":
        params = jax.tree.map(lambda a: np.asarray(a).astype(compute_dtype(precision)), params)
    return build_model(config.model, precision), jax.device_put(params)


def make_generate(config, weights, precision: str = "fp32"):
    """`generate(prompts, max_new_tokens, **options) -> int32 [len(prompts), max_new_tokens]` (generate's options)
    for a Config and canonical weights: what scripts/sample.py runs. precision "bf16" computes in bfloat16 (the
    weights stay fp32): faster where the hardware has it, no longer token-identical to fp32."""
    model, params = load_model(config, weights, precision)
    return functools.partial(generate, model, params)


def make_decoder(config, weights, precision: str = "fp32"):
    """`start(prompts, sampling) -> RowBatch` for gpt2_common.batching (what serve.py's decode loop runs), from a
    Config and canonical weights; `sampling` has one gpt2_common.batching.Sampling a prompt (temperature, top_k,
    top_p, seed, sample). Rows stop at <|endoftext|>."""
    model, params = load_model(config, weights, precision)
    stop = EOT_TOKEN if config.model.vocab_size > EOT_TOKEN else None

    def start(prompts: Sequence[Sequence[int]], sampling) -> RowBatch:
        return RowBatch(model, params, prompts, from_sampling(sampling, stop))

    return start
