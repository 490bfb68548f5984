"""Text generation with a KV cache, step for step the sampler of gpt2_jax/sample.py.

Decoding is explicit state (DecodeState) and one step is a function of it, so the same step runs in the loop of
`generate`/`generate_batch` and one call per token in `token_stream` (for the web page). As on the JAX side:

- Prompts: a batch holds each row's context left-aligned in a [B, block_size] window with its own length, so prompts
  of different lengths decode together, each row at its own position; the prompt enters the cache PREFILL_CHUNK
  tokens at a time.
- Past block_size: positions are learned only up to block_size, so a full cache cannot slide. Like nanoGPT we crop
  the context to its last block_size tokens and run the whole window for each further token; cached and uncached
  generation then give the same tokens.
- Sampling: temperature (0: greedy), top-k (0 or None: off), top-p (1 or None: off); padded vocabulary ids never
  drawn; a row stops at the stop token and is padded with it after.

Unlike JAX, the cache is updated in place (GPT.decode writes into its preallocated tensors); the rest of the state
is replaced, not mutated.
"""

from __future__ import annotations

import functools
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch

from gpt2_common.tokenizer import EOT_TOKEN, decode, get_tokenizer
from gpt2_torch.model import GPT, KVCache, init_cache, mask_padded_vocab

PREFILL_CHUNK = 64
NO_STOP = -1  # a stop token that is never drawn


class Settings(NamedTuple):
    """How to draw the next token."""

    temperature: float  # 0: greedy
    top_k: int  # 0: off
    top_p: float  # 1: off
    stop_token: int  # NO_STOP: none


class DecodeState(NamedTuple):
    window: torch.Tensor  # long [B, block_size]: each row's context (its last <= block_size tokens), left-aligned
    length: torch.Tensor  # long [B]: tokens in each row's window
    cache: KVCache  # keys and values of each row's window positions < length - 1 (valid while not slid)
    slid: bool  # a window has slid past block_size, so the cache no longer matches its positions
    done: torch.Tensor  # bool [B]: the row has drawn the stop token
    step: int  # tokens drawn so far


def settings(temperature: float = 0.8, top_k: int | None = 0, top_p: float | None = 1.0,
             stop_token: int | None = None) -> Settings:
    return Settings(float(temperature), int(top_k or 0), 1.0 if top_p is None else float(top_p),
                    NO_STOP if stop_token is None else int(stop_token))


# --- drawing a token -------------------------------------------------------------------------------------------------

def filter_logits(logits: torch.Tensor, vocab_size: int, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """Next-token logits [B, V] -> the logits to sample from, divided by the temperature: padded ids, those outside
    the top k and those outside the nucleus of probability top_p all at -inf."""
    logits = mask_padded_vocab(logits.float(), vocab_size) / temperature
    ranked = torch.sort(logits, dim=-1, descending=True).values
    if top_k and top_k < logits.size(-1):
        ranked[:, top_k:] = float("-inf")
    probs = ranked.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    # The nucleus is the shortest prefix whose mass reaches top_p (the first id always): keep what is at least the
    # smallest logit in it. top_p >= 1 keeps all, even ids whose mass_before rounds up to 1.
    in_nucleus = mass_before < top_p if top_p is not None and top_p < 1.0 else torch.ones_like(mass_before, dtype=bool)
    kept = (in_nucleus & (ranked > float("-inf"))).sum(dim=-1, keepdim=True)
    cutoff = ranked.gather(-1, (kept - 1).clamp(min=0))
    return logits.masked_fill(logits < cutoff, float("-inf"))


def sample_next(logits: torch.Tensor, generator: torch.Generator | None, temperature: float, top_k: int,
                vocab_size: int, top_p: float = 1.0) -> torch.Tensor:
    """Next ids [B] from logits [B, V]: padded ids never; greedy (argmax) at temperature 0."""
    if temperature == 0:  # greedy skips the sort
        return mask_padded_vocab(logits.float(), vocab_size).argmax(dim=-1)
    probs = filter_logits(logits, vocab_size, temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]


# --- the decoding state ----------------------------------------------------------------------------------------------

def prefill(model: GPT, window: torch.Tensor, length: torch.Tensor) -> DecodeState:
    """The start of decoding: each row's prompt but its last token into a fresh cache (the first step feeds the last
    one and draws from its logits), PREFILL_CHUNK positions at a time up to the longest prompt."""
    batch, size = window.shape
    chunk = min(PREFILL_CHUNK, size)
    cache = init_cache(model.config, batch, next(model.parameters()).dtype, window.device)
    chunks = (int(length.max()) - 1 + chunk - 1) // chunk
    for i in range(chunks):
        start = min(i * chunk, size - chunk)  # the last chunk steps back to fit; recomputing is harmless
        ids = window[:, start:start + chunk]
        positions = (start + torch.arange(chunk, device=window.device)).expand(batch, chunk)
        # Positions past a row's prompt get keys of padding: each is overwritten by the step that feeds a token there
        # before any query can see it.
        model.decode(ids, positions, cache)
    return DecodeState(window, length, cache, False, torch.zeros(batch, dtype=torch.bool, device=window.device), 0)


def decode_step(model: GPT, state: DecodeState, generator: torch.Generator | None, how: Settings,
                use_cache: bool = True) -> tuple[DecodeState, torch.Tensor]:
    """One token for every row: (the next state, the tokens [B]). Rows that are done draw the stop token again."""
    batch, size = state.window.shape
    rows = torch.arange(batch, device=state.window.device)
    if use_cache and not state.slid:
        position = state.length - 1  # feed each row's last token; the cache holds those before it
        token = state.window[rows, position][:, None]
        logits = model.decode(token, position[:, None], state.cache)[:, 0]
    else:  # nanoGPT's step: the (cropped) context through the model, as far as the longest row (causal: the
        # padding after a shorter row's tokens does not reach them)
        logits = model(state.window[:, :int(state.length.max())])[rows, state.length - 1]
    token = sample_next(logits, generator, how.temperature, how.top_k, model.config.vocab_size, how.top_p)
    token = torch.where(state.done, torch.full_like(token, how.stop_token), token)
    full = state.length == size
    window = torch.where(full[:, None], torch.roll(state.window, -1, dims=1), state.window)  # crop to the last size
    window[rows, torch.where(full, size - 1, state.length)] = token
    return DecodeState(window, torch.clamp(state.length + 1, max=size), state.cache, state.slid or bool(full.any()),
                       state.done | (token == how.stop_token), state.step + 1), token


# --- generation -------------------------------------------------------------------------------------------------------

def prompt_window(prompts: Sequence[Sequence[int]], block_size: int,
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(window long [B, block_size], length long [B]): each prompt cropped to its last block_size tokens, as nanoGPT
    crops, and left-aligned."""
    if len(prompts) == 0 or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. the tokens of '\\n')")
    window = torch.zeros((len(prompts), block_size), dtype=torch.long)
    length = torch.zeros(len(prompts), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        cropped = [int(t) for t in prompt][-block_size:]
        window[row, :len(cropped)], length[row] = torch.tensor(cropped), len(cropped)
    return window.to(device), length.to(device)


@torch.no_grad()
def _generate(model: GPT, window: torch.Tensor, length: torch.Tensor, generator: torch.Generator | None,
              how: Settings, max_new_tokens: int, use_cache: bool = True) -> torch.Tensor:
    """The tokens drawn [B, max_new_tokens] (the stop token after a row stops); ends early once every row has
    stopped."""
    was_training = model.training
    model.eval()
    if use_cache:
        state = prefill(model, window, length)
    else:
        state = DecodeState(window, length, init_cache(model.config, 0, device=window.device), False,
                            torch.zeros(window.size(0), dtype=torch.bool, device=window.device), 0)
    out = torch.full((window.size(0), max_new_tokens), max(how.stop_token, 0), dtype=torch.long,
                     device=window.device)
    while state.step < max_new_tokens and not bool(state.done.all()):
        state, token = decode_step(model, state, generator, how, use_cache)
        out[:, state.step - 1] = token
    model.train(was_training)
    return out


def _generator(model: GPT, seed: int) -> torch.Generator:
    return torch.Generator(device=next(model.parameters()).device).manual_seed(seed)


def generate_batch(model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.8,
                   top_k: int | None = 0, top_p: float | None = 1.0, seed: int = 0, stop_token: int | None = None,
                   use_cache: bool = True) -> np.ndarray:
    """Continuations of prompts of any lengths: int64 [len(prompts), max_new_tokens]; a row that draws `stop_token`
    is filled with it from there on. Reproducible for a seed."""
    device = next(model.parameters()).device
    window, length = prompt_window(prompts, model.config.block_size, device)
    how = settings(temperature, top_k, top_p, stop_token)
    return _generate(model, window, length, _generator(model, seed), how, max_new_tokens, use_cache).cpu().numpy()


def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
             stop_token: int | None = None, use_cache: bool = True) -> torch.Tensor:
    """Extends token ids idx [B, T] by max_new_tokens (nanoGPT's interface); temperature 0 is greedy. Ids are always
    < vocab_size."""
    window, length = prompt_window(idx.tolist(), model.config.block_size, idx.device)
    out = _generate(model, window, length, generator, settings(temperature, top_k, top_p, stop_token),
                    max_new_tokens, use_cache)
    return torch.cat((idx, out), dim=1)


@torch.no_grad()
def token_stream(model: GPT, prompt: Sequence[int], max_new_tokens: int, *, temperature: float = 0.8,
                 top_k: int | None = 0, top_p: float | None = 1.0, seed: int = 0,
                 stop_token: int | None = EOT_TOKEN, use_cache: bool = True) -> Iterator[int]:
    """The continuation of one prompt, token by token as each is drawn (the stop token ends it and is not
    yielded): the same tokens as generate_batch() for the same arguments. The model must be in eval mode."""
    device = next(model.parameters()).device
    window, length = prompt_window([prompt], model.config.block_size, device)
    if use_cache:
        state = prefill(model, window, length)
    else:
        state = DecodeState(window, length, init_cache(model.config, 0, device=device), False,
                            torch.zeros(1, dtype=torch.bool, device=device), 0)
    generator, how = _generator(model, seed), settings(temperature, top_k, top_p, stop_token)
    for _ in range(max_new_tokens):
        state, token = decode_step(model, state, generator, how, use_cache)
        token = int(token[0])
        if token == stop_token:
            return
        yield token


def load_model(config, weights, device: str | None = None) -> GPT:
    """The model in eval mode, on `device` (default: CUDA where there is one), for a Config and canonical weights
    (gpt2_common.weights)."""
    from gpt2_torch.weights import from_canonical

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = GPT(config.model)
    model.load_state_dict(from_canonical(weights, config.model))
    return model.to(device).eval()


def make_generate(config, weights, device: str | None = None):
    """`generate(prompts, max_new_tokens, **options) -> int64 [len(prompts), max_new_tokens]` (generate_batch's
    options) for a Config and canonical weights: what scripts/sample.py runs."""
    return functools.partial(generate_batch, load_model(config, weights, device))


def make_stream(config, weights, device: str | None = None):
    """`stream(prompt_tokens, options) -> iterator of token ids` for gpt2_common.webapp, from a Config and canonical
    weights; `options` has max_new_tokens, temperature, top_k (0: off), top_p (1: off) and seed. The stream ends at
    <|endoftext|>."""
    model = load_model(config, weights, device)
    stop = EOT_TOKEN if config.model.vocab_size > EOT_TOKEN else None

    def stream(prompt_tokens: list[int], options) -> Iterator[int]:
        return token_stream(model, prompt_tokens, options.max_new_tokens, temperature=options.temperature,
                            top_k=options.top_k, top_p=options.top_p, seed=options.seed, stop_token=stop)

    return stream


def sample_text(model: GPT, prompt: str = "\n", max_new_tokens: int = 200, *, temperature: float = 0.8,
                top_k: int | None = 200, top_p: float | None = None, seed: int = 0) -> str:
    """A completion of `prompt` as text (the prompt included), reproducible for a seed."""
    prompt_ids = get_tokenizer().encode_ordinary(prompt) or [0]
    if max(prompt_ids) >= model.config.vocab_size:  # a toy vocabulary smaller than GPT-2's: start from id 0
        prompt_ids = [0]
    out = generate_batch(model, [prompt_ids], max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                         seed=seed)
    return decode(prompt_ids + out[0].tolist())
