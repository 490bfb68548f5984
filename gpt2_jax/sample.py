"""Text generation with a KV cache, step for step the sampler of gpt2_torch/sample.py.

Decoding is explicit state (DecodeState) and one step is a pure function of it, so the same step runs inside one
compiled while_loop (`generate`, `generate_batch`) and as one jitted call per token (`token_stream`, for the web page).

- Prompts: a batch holds each row's context left-aligned in a [B, block_size] window with its own length, so prompts
  of different lengths decode together, each row at its own position. The window's shape never changes, so one
  compile serves any prompt; the prompt enters the cache PREFILL_CHUNK tokens at a time (work in proportion to the
  prompt, not to block_size).
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

from gpt2_common.tokenizer import EOT_TOKEN
from gpt2_jax.model import GPT, KVCache, init_cache, mask_padded_vocab

PREFILL_CHUNK = 64
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
    cache: KVCache  # keys and values of each row's window positions < length - 1 (valid while not slid)
    slid: jax.Array  # bool []: a window has slid past block_size, so the cache no longer matches its positions
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

def prefill(model: GPT, params: Any, window: jax.Array, length: jax.Array) -> DecodeState:
    """The start of decoding: each row's prompt but its last token into a fresh cache (the first step feeds the last
    one and draws from its logits), PREFILL_CHUNK positions at a time up to the longest prompt."""
    batch, size = window.shape
    chunk = min(PREFILL_CHUNK, size)

    def fill(i, cache):
        start = jnp.minimum(i * chunk, size - chunk)  # the last chunk steps back to fit; recomputing is harmless
        ids = jax.lax.dynamic_slice_in_dim(window, start, chunk, axis=1)
        positions = jnp.broadcast_to(start + jnp.arange(chunk, dtype=jnp.int32), ids.shape)
        # Positions past a row's prompt get keys of padding: each is overwritten by the step that feeds a token there
        # before any query can see it. The logits are dropped, so XLA never computes the head here.
        return model.apply({"params": params}, ids, positions, cache, method=GPT.decode)[1]

    cache = init_cache(model.config, batch, model.dtype)
    chunks = (jnp.max(length) - 1 + chunk - 1) // chunk
    cache = jax.lax.fori_loop(0, chunks, fill, cache)
    return DecodeState(window, length, cache, jnp.array(False), jnp.zeros(batch, bool), jnp.array(0, jnp.int32))


def decode_step(model: GPT, params: Any, state: DecodeState, rng: jax.Array, how: Settings,
                use_cache: bool = True) -> tuple[DecodeState, jax.Array]:
    """One token for every row: (the next state, the tokens [B]). Rows that are done draw the stop token again."""
    batch, size = state.window.shape
    rows = jnp.arange(batch)

    def cached(state):
        position = state.length - 1  # feed each row's last token; the cache holds those before it
        token = state.window[rows, position][:, None]
        logits, cache = model.apply({"params": params}, token, position[:, None], state.cache, method=GPT.decode)
        return logits[:, 0], cache

    def whole_window(state):  # nanoGPT's step: the (cropped) context through the model
        logits = model.apply({"params": params}, state.window)
        return logits[rows, state.length - 1], state.cache

    if use_cache:
        logits, cache = jax.lax.cond(state.slid, whole_window, cached, state)
    else:
        logits, cache = whole_window(state)
    token = sample_next(logits, jax.random.fold_in(rng, state.step), how.temperature, how.top_k,
                        model.config.vocab_size, how.top_p)
    token = jnp.where(state.done, how.stop_token, token)
    full = state.length == size
    window = jnp.where(full[:, None], jnp.roll(state.window, -1, axis=1), state.window)  # crop to the last size
    window = window.at[rows, jnp.where(full, size - 1, state.length)].set(token)
    return DecodeState(window, jnp.minimum(state.length + 1, size), cache, state.slid | jnp.any(full),
                       state.done | (token == how.stop_token), state.step + 1), token


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


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "use_cache"))
def _generate(model: GPT, params: Any, window: jax.Array, length: jax.Array, rng: jax.Array, how: Settings, *,
              max_new_tokens: int, use_cache: bool = True) -> jax.Array:
    """The tokens drawn [B, max_new_tokens] (the stop token after a row stops): one compiled loop that ends early
    once every row has stopped."""
    if use_cache:
        state = prefill(model, params, window, length)
    else:
        state = DecodeState(window, length, init_cache(model.config, 0, model.dtype), jnp.array(False),
                            jnp.zeros(window.shape[0], bool), jnp.array(0, jnp.int32))
    out = jnp.full((window.shape[0], max_new_tokens), jnp.maximum(how.stop_token, 0), jnp.int32)

    def running(carry):
        state, _ = carry
        return (state.step < max_new_tokens) & ~jnp.all(state.done)

    def step(carry):
        state, out = carry
        state, token = decode_step(model, params, state, rng, how, use_cache)
        return state, out.at[:, state.step - 1].set(token)

    return jax.lax.while_loop(running, step, (state, out))[1]


def generate_batch(model: GPT, params: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                   temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                   stop_token: int | None = None, use_cache: bool = True, sharding: Any = None) -> np.ndarray:
    """Continuations of prompts of any lengths: int32 [len(prompts), max_new_tokens]; a row that draws `stop_token`
    is filled with it from there on.

    `sharding`: where the inputs go when params live on a mesh (a replicated NamedSharding of it), so that every
    process of a multi-host job runs the same computation.
    """
    window, length = prompt_window(prompts, model.config.block_size)
    inputs = (window, length, jax.random.PRNGKey(seed), settings(temperature, top_k, top_p, stop_token))
    if sharding is not None:
        inputs = jax.device_put(inputs, sharding)
    out = _generate(model, params, *inputs, max_new_tokens=max_new_tokens, use_cache=use_cache)
    if sharding is not None:  # the result may span processes: give every process all of it
        return np.asarray(multihost_utils.process_allgather(out, tiled=True))
    return np.asarray(jax.device_get(out))


def generate(model: GPT, params: Any, prompt: Sequence[int], max_new_tokens: int, *, temperature: float = 0.8,
             top_k: int = 200, top_p: float = 1.0, seed: int = 0, num_samples: int = 1,
             stop_token: int | None = None, use_cache: bool = True, sharding: Any = None) -> np.ndarray:
    """`num_samples` continuations of the token ids `prompt`: int32 [num_samples, max_new_tokens]."""
    return generate_batch(model, params, [prompt] * num_samples, max_new_tokens, temperature=temperature,
                          top_k=top_k, top_p=top_p, seed=seed, stop_token=stop_token, use_cache=use_cache,
                          sharding=sharding)


# --- one token at a time ---------------------------------------------------------------------------------------------

_prefill = jax.jit(prefill, static_argnums=0)
# The state is donated: the cache is updated in place instead of copied every token.
_decode_step = jax.jit(decode_step, static_argnums=(0, 5), donate_argnums=2)


def token_stream(model: GPT, params: Any, prompt: Sequence[int], max_new_tokens: int, *, temperature: float = 0.8,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_token: int | None = EOT_TOKEN,
                 use_cache: bool = True) -> Iterator[int]:
    """The continuation of one prompt, token by token as each is drawn (the stop token ends it and is not
    yielded): the same tokens as generate() for the same arguments, from two compiled functions (the prefill and
    one step) whatever the prompt, settings or length."""
    window, length = prompt_window([prompt], model.config.block_size)
    if use_cache:
        state = _prefill(model, params, window, length)
    else:
        state = DecodeState(window, length, init_cache(model.config, 0, model.dtype), np.bool_(False),
                            np.zeros(1, bool), np.int32(0))
    rng, how = jax.random.PRNGKey(seed), settings(temperature, top_k, top_p, stop_token)
    for _ in range(max_new_tokens):
        state, token = _decode_step(model, params, state, rng, how, use_cache)
        token = int(token[0])
        if token == stop_token:
            return
        yield token


def load_model(config, weights, precision: str = "fp32") -> tuple[GPT, Any]:
    """(model, params on the default device) for a Config and canonical weights (gpt2_common.weights)."""
    from gpt2_jax.model import build_model
    from gpt2_jax.weights import from_canonical

    return build_model(config.model, precision), jax.device_put(from_canonical(weights, config.model))


def make_generate(config, weights, precision: str = "fp32"):
    """`generate(prompts, max_new_tokens, **options) -> int32 [len(prompts), max_new_tokens]` (generate_batch's
    options) for a Config and canonical weights: what scripts/sample.py runs."""
    model, params = load_model(config, weights, precision)
    return functools.partial(generate_batch, model, params)


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
