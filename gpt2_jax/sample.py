"""Text generation with a KV cache, step for step the sampler of gpt2_torch/sample.py, with the same contract:
`generate(model, params, prompts, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, seed=0, stop_token=None)`
takes a list of prompts (token id lists of any lengths) and returns the new tokens only, int32 [B, max_new_tokens].

Decoding is explicit state (DecodeState) and one step is a pure function of it, so the same step runs inside
compiled while_loops (`generate`) and as one jitted call per token (gpt2_jax/serving.py, for serve.py).

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
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from gpt2_common.tokenizer import decode, get_tokenizer
from gpt2_jax.model import GPT, KVCache, mask_padded_vocab

PREFILL_CHUNK = 64
MIN_PREFILL_CHUNK = 16
MIN_OUT_WIDTH = 64
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
    # padded to a power of two rows, so that serve.py's joins of any count compile this a handful of times
    padded = 1 << max(rows - 1, 0).bit_length()
    keys = np.asarray(_row_keys(*(np.resize(per_row(v, np.uint32), padded) for v in (seed, samples))))[:rows]
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
    weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))  # unnormalised: u scales to their sum
    blocks = jnp.pad(weights, ((0, 0), (0, -width % CDF_BLOCK))).reshape(rows, -1, CDF_BLOCK)
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


def argmax(logits: jax.Array) -> jax.Array:
    """jnp.argmax(logits, axis=-1) of [B, V] logits (the first of equal maxima), in two levels: the block of
    CDF_BLOCK ids that holds the maximum, then the id in it. XLA's CPU argmax is a reduction of (value, index) pairs
    that it does not vectorise; a max is: at 16 rows of GPT-2's vocabulary, 2 ms for the argmax alone, more than
    all the shakespeare model's layers."""
    rows, width = logits.shape
    blocks = jnp.pad(logits, ((0, 0), (0, -width % CDF_BLOCK)), constant_values=-jnp.inf).reshape(rows, -1, CDF_BLOCK)
    block = jnp.argmax(blocks.max(axis=-1), axis=-1)
    return (block * CDF_BLOCK + jnp.argmax(blocks[jnp.arange(rows), block], axis=-1)).astype(jnp.int32)


def sample_next(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array, vocab_size: int,
                top_p: jax.Array = 1.0) -> jax.Array:
    """Next ids [B] from logits [B, V], each row with its own key [B, 2] and settings [B]: padded ids never; greedy
    (argmax) where the temperature is 0."""
    greedy = argmax(mask_padded_vocab(logits.astype(jnp.float32), vocab_size))
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


def out_width(max_new_tokens: int) -> int:
    """The width of the output that the compiled loops carry: max_new_tokens rounded up to a power of two (at least
    MIN_OUT_WIDTH), so that a generation of another length reuses the loops compiled for this one (each took seconds
    to compile on a CPU, in every call of another length); the columns past max_new_tokens are never written, and
    generate() returns the first max_new_tokens."""
    return max(MIN_OUT_WIDTH, 1 << (max_new_tokens - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("model", "width", "span", "chunk", "cached"))
def _start(model: GPT, params: Any, window: jax.Array, length: jax.Array, how: Settings, *, width: int,
           span: int, chunk: int, cached: bool) -> tuple[DecodeState, jax.Array]:
    """The first state (prefilled when cached) and the output [B, width], filled with the stop token."""
    if cached:
        state = prefill(model, params, window, length, span, chunk)
    else:
        state = DecodeState(window, length, None, jnp.zeros(window.shape[0], bool), jnp.array(0, jnp.int32))
    return state, jnp.full((window.shape[0], width), jnp.maximum(how.stop_token, 0), jnp.int32)


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
    state, out = _start(model, params, window, length, how, width=out_width(max_new_tokens), span=first.span,
                        chunk=prefill_chunk(longest, first.span), cached=first.cached)
    for segment in segments:
        state = _fit_cache(state, segment)
        state, out = _decode_loop(model, params, state, out, how, np.int32(segment.end), span=segment.span,
                                  cached=segment.cached)
    if sharding is not None:  # the result may span processes: give every process all of it
        return np.asarray(multihost_utils.process_allgather(out, tiled=True))[:, :max_new_tokens]
    return np.asarray(jax.device_get(out))[:, :max_new_tokens]


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
