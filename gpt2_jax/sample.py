"""Text generation with a KV cache, step for step the sampler of gpt2_torch/sample.py, with the same contract:
`generate(model, params, prompts, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, seed=0, stop_token=None)`
takes a list of prompts (token id lists of any lengths) and returns the new tokens only, int32 [B, max_new_tokens].

Decoding is explicit state (DecodeState) and one step is a pure function of it, so the same step runs inside
compiled while_loops (`generate`) and as one jitted call per token (`token_stream`, for the web page).

- Prompts: a batch holds each row's context left-aligned in a [B, block_size] window with its own length, so prompts
  of different lengths decode together, each row at its own position; the prompt enters the cache PREFILL_CHUNK
  tokens at a time (work in proportion to the prompt, not to block_size).
- The cache holds `span` positions, a power of two that grows with the longest row (cache_span), so that a step
  reads what the rows wrote rather than block_size positions; one compiled loop runs each span (`plan`), a handful
  per generation, and new prompts or settings reuse them.
- Past block_size: positions are learned only up to block_size, so a full cache cannot slide. Like nanoGPT we crop
  the context to its last block_size tokens and run the whole window for each further token; cached and uncached
  generation then give the same tokens.
- Sampling: temperature (0: greedy), top-k (0: off), top-p (1: off), all traced values (new settings do not
  recompile); padded vocabulary ids never drawn; a row stops at the stop token and is padded with it after.
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
    """How to draw the next token; traced, so that other values reuse the compiled step."""

    temperature: jax.Array  # float32 []; 0: greedy
    top_k: jax.Array  # int32 []; 0: off
    top_p: jax.Array  # float32 []; 1: off
    stop_token: jax.Array  # int32 []; NO_STOP: none


class DecodeState(NamedTuple):
    window: jax.Array  # int32 [B, block_size]: each row's context (its last <= block_size tokens), left-aligned
    length: jax.Array  # int32 [B]: tokens in each row's window
    cache: KVCache | None  # keys and values [n_layer, B, span, ...] of each row's positions < length - 1; None
    # once the context has slid past block_size (or without the cache)
    done: jax.Array  # bool [B]: the row has drawn the stop token
    step: jax.Array  # int32 []: tokens drawn so far


def settings(temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0, stop_token: int | None = None) -> Settings:
    return Settings(np.float32(temperature), np.int32(top_k), np.float32(top_p),
                    np.int32(NO_STOP if stop_token is None else stop_token))


# --- drawing a token -------------------------------------------------------------------------------------------------

def filter_logits(logits: jax.Array, vocab_size: int, temperature: jax.Array, top_k: jax.Array,
                  top_p: jax.Array) -> jax.Array:
    """Next-token logits [B, V] -> the logits to sample from, divided by the temperature: padded ids, those outside
    the top k and those outside the nucleus of probability top_p all at -inf (k and p are traced: one sort serves
    both, where lax.top_k would need k static)."""
    logits = mask_padded_vocab(logits.astype(jnp.float32), vocab_size) / temperature
    ranked = -jnp.sort(-logits, axis=-1)  # descending
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


def sample_next(logits: jax.Array, rng: jax.Array, temperature: jax.Array, top_k: jax.Array, vocab_size: int,
                top_p: jax.Array = 1.0) -> jax.Array:
    """Next ids [B] from logits [B, V]: padded ids never; greedy (argmax) at temperature 0."""
    def greedy(logits):
        return jnp.argmax(mask_padded_vocab(logits.astype(jnp.float32), vocab_size), axis=-1).astype(jnp.int32)

    def draw(logits):
        filtered = filter_logits(logits, vocab_size, temperature, top_k, top_p)
        return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, draw, greedy, logits)  # greedy skips the sort


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
    """The segments of a generation whose longest prompt has `longest` tokens. Every row grows by one token a step,
    so the host knows each step's span without reading anything back from the device.

    Past block_size the cache cannot slide (positions are learned only up to block_size): like nanoGPT, the context
    is cropped to its last block_size tokens and the whole window runs for each further token. The step that fills
    the longest row's window (length block_size) is the last cached one."""
    segments: list[Segment] = []
    for step in range(max_new_tokens):
        cached = use_cache and longest + step <= block_size
        span = cache_span(min(longest + step, block_size), block_size)
        if segments and segments[-1].span == span and segments[-1].cached == cached:
            segments[-1] = segments[-1]._replace(end=step + 1)
        else:
            segments.append(Segment(step, step + 1, span, cached))
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


def decode_step(model: GPT, params: Any, state: DecodeState, rng: jax.Array, how: Settings, span: int,
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
    token = sample_next(logits, jax.random.fold_in(rng, state.step), how.temperature, how.top_k,
                        model.config.vocab_size, how.top_p)
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
def _decode_loop(model: GPT, params: Any, state: DecodeState, out: jax.Array, rng: jax.Array, how: Settings,
                 end: jax.Array, *, span: int, cached: bool) -> tuple[DecodeState, jax.Array]:
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
        state, token = decode_step(model, params, state, rng, how, span, cached)
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
             stop_token: int | None = None, use_cache: bool = True, sharding: Any = None) -> np.ndarray:
    """The continuations of prompts (lists of token ids, of any lengths): int32 [len(prompts), max_new_tokens], the
    new tokens only; a row that draws `stop_token` is filled with it from there on. Temperature 0 is greedy; top_k 0
    and top_p 1 are off. Reproducible for a seed. The contract of gpt2_torch.sample.generate, which takes the same
    arguments (less `params` and `sharding`) and returns the same.

    A few compiled loops (one per Segment of `plan`) run one after another without reading anything back, so the
    only wait for the device is for the result. `sharding`: where the inputs go when params live on a mesh (a
    replicated NamedSharding of it), so that every process of a multi-host job runs the same computation.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    window, length = prompt_window(prompts, model.config.block_size)
    longest = int(length.max())
    segments = plan(longest, model.config.block_size, max_new_tokens, use_cache)
    inputs = (window, length, jax.random.PRNGKey(seed), settings(temperature, top_k, top_p, stop_token))
    if sharding is not None:
        inputs = jax.device_put(inputs, sharding)
    window, length, rng, how = inputs
    first = segments[0]
    state, out = _start(model, params, window, length, how, max_new_tokens=max_new_tokens, span=first.span,
                        chunk=prefill_chunk(longest, first.span), cached=first.cached)
    for segment in segments:
        state = _fit_cache(state, segment)
        state, out = _decode_loop(model, params, state, out, rng, how, np.int32(segment.end), span=segment.span,
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


# --- one token at a time ---------------------------------------------------------------------------------------------

_prefill = jax.jit(prefill, static_argnums=(0, 4, 5))
# The state is donated: the cache is updated in place instead of copied every token.
_decode_step = jax.jit(decode_step, static_argnums=(0, 5, 6), donate_argnums=2)


def token_stream(model: GPT, params: Any, prompt: Sequence[int], max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_token: int | None = EOT_TOKEN,
                 use_cache: bool = True) -> Iterator[int]:
    """The continuation of one prompt, token by token as each is drawn (the stop token ends it and is not
    yielded): the same tokens as generate() for the same arguments, from one compiled prefill and one compiled
    step per span whatever the prompt or settings."""
    window, length = prompt_window([prompt], model.config.block_size)
    segments = plan(int(length.max()), model.config.block_size, max_new_tokens, use_cache)
    if segments[0].cached:
        span = segments[0].span
        state = _prefill(model, params, window, length, span, prefill_chunk(int(length.max()), span))
    else:
        state = DecodeState(window, length, None, np.zeros(1, bool), np.int32(0))
    rng, how = jax.random.PRNGKey(seed), settings(temperature, top_k, top_p, stop_token)
    for segment in segments:
        state = _fit_cache(state, segment)
        for _ in range(segment.begin, segment.end):
            state, token = _decode_step(model, params, state, rng, how, segment.span, segment.cached)
            token = int(token[0])
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


def make_stream(config, weights, precision: str = "fp32"):
    """`stream(prompt_tokens, options) -> iterator of token ids` for gpt2_common.webapp, from a Config and canonical
    weights; `options` has max_new_tokens, temperature, top_k (0: off), top_p (1: off) and seed. The stream ends at
    <|endoftext|>."""
    model, params = load_model(config, weights, precision)
    stop = EOT_TOKEN if config.model.vocab_size > EOT_TOKEN else None

    def stream(prompt_tokens: list[int], options) -> Iterator[int]:
        return token_stream(model, params, prompt_tokens, options.max_new_tokens, temperature=options.temperature,
                            top_k=options.top_k, top_p=options.top_p, seed=options.seed, stop_token=stop)

    return stream
