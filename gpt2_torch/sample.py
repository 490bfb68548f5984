"""Text generation with a KV cache, step for step the sampler of gpt2_jax/sample.py, with the same contract:
`generate(model, prompts, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, seed=0, stop_token=None)` takes a
list of prompts (token id lists of any lengths) and returns the new tokens only, int32 [B, max_new_tokens].

Decoding is explicit state (DecodeState) and one step is a function of it, so the same step runs in the loop of
`generate` and one call per token in gpt2_torch/serving.py (for serve.py). As on the JAX side:

- Prompts: a batch holds each row's context left-aligned in a [B, block_size] window with its own length, so prompts
  of different lengths decode together, each row at its own position; the prompt enters the cache PREFILL_CHUNK
  tokens at a time.
- A step reads only the cache positions written so far (a view of them), not all block_size: at GPT-2 small's 1024
  and a short prompt, attention over the full cache took as long as all the matmuls of the step.
- Past block_size: positions are learned only up to block_size, so a full cache cannot slide. Like nanoGPT we crop
  the context to its last block_size tokens and run the whole window for each further token; cached and uncached
  generation then give the same tokens.
- Sampling: temperature (0: greedy), top-k (0 or None: off), top-p (1 or None: off), each row its own; padded
  vocabulary ids never drawn; a row stops at the stop token and is padded with it after. Each row draws from its
  own generator, seeded from its seed and its sample's index, so that a sample's tokens depend on them and not on
  the rows beside it (sample.py's batches, serve.py's mixed requests).

Unlike JAX, the cache is updated in place (GPT.decode writes into its preallocated tensors); the rest of the state
is replaced, not mutated.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn as nn

from gpt2_common.tokenizer import decode, get_tokenizer
from gpt2_torch.model import GPT, KVCache, mask_padded_vocab

PREFILL_CHUNK = 64
NO_STOP = -1  # a stop token that is never drawn


class Settings(NamedTuple):
    """How each row draws its next token."""

    temperature: torch.Tensor  # float32 [B]; 0: greedy
    top_k: torch.Tensor  # long [B]; 0: off
    top_p: torch.Tensor  # float32 [B]; 1: off
    generators: list[torch.Generator]  # each row's random stream, from its seed and its sample's index
    sampled: list[int]  # the rows whose temperature is above 0 (known here, so that no step reads it back)
    filters: bool  # whether a row asks for top-k or top-p (else sampling skips the sort)
    stop_token: int  # NO_STOP: none

    def join(self, other: "Settings") -> "Settings":
        """These rows' settings, then `other`'s."""
        return Settings(torch.cat([self.temperature, other.temperature]), torch.cat([self.top_k, other.top_k]),
                        torch.cat([self.top_p, other.top_p]), self.generators + other.generators,
                        self.sampled + [len(self.generators) + row for row in other.sampled],
                        self.filters or other.filters, self.stop_token)

    def take(self, rows: Sequence[int]) -> "Settings":
        """The settings of these rows (indexes into the batch)."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.temperature.device)
        kept = {row: i for i, row in enumerate(rows)}
        return Settings(self.temperature[index], self.top_k[index], self.top_p[index],
                        [self.generators[row] for row in rows], [kept[row] for row in self.sampled if row in kept],
                        self.filters, self.stop_token)


class DecodeState(NamedTuple):
    window: torch.Tensor  # long [B, block_size]: each row's context (its last <= block_size tokens), left-aligned
    length: torch.Tensor  # long [B]: tokens in each row's window
    longest: int  # the longest row's length, uncropped (every row grows by one a step): known without a device read
    cache: KVCache | None  # keys and values [n_layer, B, span, ...] of each row's positions < length - 1; None once
    # the context has slid past block_size (or without the cache)
    done: torch.Tensor  # bool [B]: the row has drawn the stop token
    step: int  # tokens drawn so far


def _row_seed(seed: int, sample: int) -> int:
    """One 32-bit seed for (seed, sample index): torch's CPU generator keeps only the low 32 bits of a seed, so the
    two are mixed (numpy's SeedSequence hash) rather than packed side by side."""
    return int(np.random.SeedSequence([int(seed), int(sample)]).generate_state(1)[0])


def settings(rows: int, temperature=0.8, top_k=0, top_p=1.0, stop_token: int | None = None, seed=0,
             samples: Sequence[int] | None = None, device: torch.device | str = "cpu") -> Settings:
    """The settings of `rows` rows: temperature, top_k, top_p and seed each one value for all or one a row (None: off
    for top_k and top_p). Row i draws from a generator seeded from (its seed, samples[i]) (default: i, its sample's
    index)."""
    def per_row(value, off):
        values = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value] * rows
        return [off if v is None else v for v in values]

    temperature, top_k, top_p = per_row(temperature, 0.0), per_row(top_k, 0), per_row(top_p, 1.0)
    samples = range(rows) if samples is None else samples
    generators = [torch.Generator(device=device).manual_seed(_row_seed(seed, sample))
                  for seed, sample in zip(per_row(seed, 0), samples)]
    return Settings(torch.tensor(temperature, dtype=torch.float32, device=device),
                    torch.tensor(top_k, dtype=torch.long, device=device),
                    torch.tensor(top_p, dtype=torch.float32, device=device), generators,
                    [row for row, t in enumerate(temperature) if t > 0],
                    any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p),
                    NO_STOP if stop_token is None else int(stop_token))


# --- drawing a token -------------------------------------------------------------------------------------------------

def _column(value, off, logits: torch.Tensor) -> torch.Tensor:
    """A setting for every row ([B]) or for all (a number; None: `off`), as a column that broadcasts over [B, V]."""
    return torch.as_tensor(off if value is None else value, dtype=torch.float32, device=logits.device).reshape(-1, 1)


def filter_logits(logits: torch.Tensor, vocab_size: int, temperature=1.0, top_k=None, top_p=None) -> torch.Tensor:
    """Next-token logits [B, V] -> the logits to sample from, divided by the temperature: padded ids, those outside
    the top k and those outside the nucleus of probability top_p all at -inf. The settings are one for all or one a
    row ([B] tensors)."""
    logits = mask_padded_vocab(logits.float(), vocab_size) / _column(temperature, 1.0, logits)
    ranked = torch.sort(logits, dim=-1, descending=True).values
    top_k = _column(top_k, 0, logits)
    k = torch.where(top_k > 0, top_k, logits.size(-1))
    ranked = ranked.masked_fill(torch.arange(logits.size(-1), device=logits.device) >= k, float("-inf"))
    probs = ranked.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    # The nucleus is the shortest prefix whose mass reaches top_p (the first id always): keep what is at least the
    # smallest logit in it. top_p >= 1 keeps all, even ids whose mass_before rounds up to 1.
    top_p = _column(top_p, 1.0, logits)
    in_nucleus = (mass_before < top_p) | (top_p >= 1.0)
    kept = (in_nucleus & (ranked > float("-inf"))).sum(dim=-1, keepdim=True)
    cutoff = ranked.gather(-1, (kept - 1).clamp(min=0))
    return logits.masked_fill(logits < cutoff, float("-inf"))


def sample_next(logits: torch.Tensor, how: Settings, vocab_size: int) -> torch.Tensor:
    """Next ids [B] from logits [B, V], each row with its own settings and generator: padded ids never; greedy
    (argmax) where the temperature is 0."""
    token = logits[:, :vocab_size].argmax(dim=-1)  # greedy skips the sort; the padded ids are left out, not masked
    if how.sampled:
        rows = torch.tensor(how.sampled, device=logits.device)
        if how.filters:
            filtered = filter_logits(logits[rows], vocab_size, how.temperature[rows], how.top_k[rows], how.top_p[rows])
        else:  # what filter_logits gives where no row filters, without its sort
            filtered = mask_padded_vocab(logits[rows].float(), vocab_size) / how.temperature[rows, None]
        token[rows] = categorical(filtered, [how.generators[row] for row in how.sampled])
    return token


def categorical(logits: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One id [B] from each row of logits [B, V] (-inf: never), row i with its generator: the inverse of the
    cumulative distribution at one uniform number a row, where torch.multinomial took 2 ms a row of GPT-2's
    vocabulary on the 2-core CPU, more than a small model's whole step."""
    probs = logits.softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)
    u = torch.cat([torch.rand(1, generator=g, device=logits.device) for g in generators])[:, None] * cdf[:, -1:]
    index = torch.searchsorted(cdf, u, right=True)[:, 0]
    # rounding may point past the last id of any probability (a padded id, say): never beyond it
    last = probs.size(-1) - 1 - (probs > 0).flip(-1).int().argmax(dim=-1)
    return torch.minimum(index, last)


# --- the decoding state ----------------------------------------------------------------------------------------------

def cache_span(length: int, block_size: int) -> int:
    """The positions the cache holds while the longest row holds `length` tokens: the next power of two, at least
    PREFILL_CHUNK, at most block_size (as gpt2_jax.sample.cache_span), so that memory follows the rows' lengths and
    the cache is reallocated a handful of times per generation. A step reads only the positions written so far."""
    span = max(PREFILL_CHUNK, 1 << max(length - 1, 0).bit_length())
    return min(span, block_size)


def prefill(model: GPT, window: torch.Tensor, length: torch.Tensor, longest: int) -> DecodeState:
    """The start of decoding: each row's prompt but its last token into a fresh cache (the first step feeds the last
    one and draws from its logits), PREFILL_CHUNK positions at a time up to the longest prompt (`longest` tokens,
    known to the caller, so that nothing is read back from the device)."""
    batch, size = window.shape
    span = cache_span(longest, size)
    cfg = model.config
    shape = (cfg.n_layer, batch, span, cfg.n_head, cfg.head_dim)
    dtype = next(model.parameters()).dtype
    cache = KVCache(torch.zeros(shape, dtype=dtype, device=window.device),
                    torch.zeros(shape, dtype=dtype, device=window.device))
    for start in range(0, longest - 1, PREFILL_CHUNK):  # exactly the prompt's positions: eager needs no padding
        end = min(start + PREFILL_CHUNK, longest - 1)
        positions = torch.arange(start, end, device=window.device).expand(batch, end - start)
        # Positions past a shorter row's prompt get keys of padding: each is overwritten by the step that feeds a
        # token there before any query can see it.
        model.decode(window[:, start:end], positions, cache)
    return DecodeState(window, length, longest, cache, torch.zeros(batch, dtype=torch.bool, device=window.device), 0)


def grow_cache(cache: KVCache, span: int) -> KVCache:
    """The cache with room for `span` positions: reallocated and copied when it is smaller."""
    if cache.k.size(2) >= span:
        return cache
    grown = KVCache(*(t.new_zeros(t.shape[:2] + (span,) + t.shape[3:]) for t in cache))
    for new, old in zip(grown, cache):
        new[:, :, :old.size(2)] = old
    return grown


def decode_step(model: GPT, state: DecodeState, how: Settings,
                use_cache: bool = True) -> tuple[DecodeState, torch.Tensor]:
    """One token for every row: (the next state, the tokens [B]). Rows that are done draw the stop token again."""
    batch, size = state.window.shape
    rows = torch.arange(batch, device=state.window.device)
    cache = state.cache  # None without the cache, and once the context has slid past block_size
    if cache is not None:
        # Each row's last token over the cache's first `longest` positions: the keys written so far (a view, so
        # the model writes the new keys into the cache itself).
        cache = grow_cache(cache, cache_span(state.longest, size))
        position = state.length - 1  # feed each row's last token; the cache holds those before it
        token = state.window[rows, position][:, None]
        visible = KVCache(cache.k[:, :, :state.longest], cache.v[:, :, :state.longest])
        logits = model.decode(token, position[:, None], visible)[:, 0]
    else:  # nanoGPT's step: the (cropped) context through the model, as far as the longest row (causal: the
        # padding after a shorter row's tokens does not reach them)
        logits = model(state.window[:, :min(state.longest, size)])[rows, state.length - 1]
    token = sample_next(logits, how, model.config.vocab_size)
    token = torch.where(state.done, torch.full_like(token, how.stop_token), token)
    full = state.length == size
    window = torch.where(full[:, None], torch.roll(state.window, -1, dims=1), state.window)  # crop to the last size
    window[rows, torch.where(full, size - 1, state.length)] = token
    # Past block_size the cache cannot slide (positions are learned only up to block_size): `longest` passes size
    # after the step that fills the longest window, and from then on the whole window runs, as in nanoGPT.
    return DecodeState(window, torch.clamp(state.length + 1, max=size), state.longest + 1,
                       cache if state.longest < size else None, state.done | (token == how.stop_token),
                       state.step + 1), token


# --- generation -------------------------------------------------------------------------------------------------------

def prompt_window(prompts: Sequence[Sequence[int]], block_size: int,
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, int]:
    """(window long [B, block_size], length long [B], the longest length): each prompt cropped to its last
    block_size tokens, as nanoGPT crops, and left-aligned."""
    if len(prompts) == 0 or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. the tokens of '\\n')")
    window = torch.zeros((len(prompts), block_size), dtype=torch.long)
    length = torch.zeros(len(prompts), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        cropped = [int(t) for t in prompt][-block_size:]
        window[row, :len(cropped)], length[row] = torch.tensor(cropped), len(cropped)
    return window.to(device), length.to(device), int(length.max())


def start(model: GPT, prompts: Sequence[Sequence[int]], use_cache: bool) -> DecodeState:
    """The first decoding state of prompts: prefilled with the cache, else the bare windows."""
    device = next(model.parameters()).device
    window, length, longest = prompt_window(prompts, model.config.block_size, device)
    if use_cache:
        return prefill(model, window, length, longest)
    return DecodeState(window, length, longest, None, torch.zeros(len(prompts), dtype=torch.bool, device=device), 0)


@torch.inference_mode()
def generate(model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = 0, top_p: float | None = 1.0, seed: int = 0, stop_token: int | None = None,
             use_cache: bool = True, samples: Sequence[int] | None = None) -> np.ndarray:
    """The continuations of prompts (lists of token ids, of any lengths): int32 [len(prompts), max_new_tokens], the
    new tokens only; a row that draws `stop_token` is filled with it from there on. Temperature 0 is greedy; top_k 0
    and top_p 1 are off; each setting and the seed may also be a sequence, one a row. Reproducible for a seed: row
    i draws from a generator seeded from (seed, samples[i]) (default i), so that a batch of samples split in
    several calls (`samples` counting on) draws what one call would. The contract of gpt2_jax.sample.generate
    (which also takes the params). The model runs in eval mode and is put back in the mode it was in."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    was_training = model.training
    model.eval()
    try:
        state = start(model, prompts, use_cache)
        how = settings(len(prompts), temperature, top_k, top_p, stop_token, seed, samples, state.window.device)
        out = torch.full((len(prompts), max_new_tokens), max(how.stop_token, 0), dtype=torch.long,
                         device=state.window.device)
        # Without a stop token no row ends early, and the loop never waits to read `done` back from the device.
        while state.step < max_new_tokens and (how.stop_token == NO_STOP or not bool(state.done.all())):
            state, token = decode_step(model, state, how, use_cache)
            out[:, state.step - 1] = token
    finally:
        model.train(was_training)
    return out.cpu().numpy().astype(np.int32)


def sample_text(model: GPT, prompt: str = "\n", max_new_tokens: int = 200, *, temperature: float = 0.8,
                top_k: int = 200, top_p: float = 1.0, seed: int = 0) -> str:
    """A completion of `prompt` as text (the prompt included), reproducible for a seed: what a trainer prints at the
    end of a run. A model whose vocabulary is smaller than GPT-2's (a toy one) starts from token 0 instead."""
    prompt_ids = get_tokenizer().encode_ordinary(prompt) or [0]
    if max(prompt_ids) >= model.config.vocab_size:
        prompt_ids = [0]
    out = generate(model, [prompt_ids], max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   seed=seed)
    return decode(prompt_ids + out[0].tolist())


INFERENCE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class PackedLinear(nn.Module):
    """A Linear whose weight oneDNN holds in its own blocked layout, for products of a few rows (decoding): the same
    values, multiplied through oneDNN rather than the BLAS. With the weights streaming from memory, as one decoding
    step streams all of them, GPT-2 small's block products ran 1.3x faster this way than column-major through
    the BLAS (docs/benchmarks.md). These are torch's own ops for a frozen Linear on a CPU, the ones inductor emits."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        # 1: the rows a product is packed for (one token a row); any row count still multiplies correctly
        self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def can_pack(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs Linear weights of `dtype` on this CPU, as torch itself answers it: its bf16 path needs
    AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT, and an AVX2-only CPU (common in clouds) has neither."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return True


def _column_major(linear: nn.Linear) -> None:
    linear.weight.data = linear.weight.data.t().contiguous().t()


def for_cpu_decoding(model: GPT) -> GPT:
    """The model with its weights laid out for decoding on a CPU, where a step multiplies a token or a few by every
    weight and little else: the blocks' Linear layers packed for oneDNN (PackedLinear) where this CPU packs the
    model's dtype (can_pack), the others and the tied output head stored column-major (the same values and shape
    [out, in], transposed in memory: torch's CPU BLAS multiplies a single token by nn.Linear's row-major weight 2-4x
    slower than by a column-major one, which is transformers' Conv1D layout; the head stays one tensor with the
    token embedding). Greedy tokens stay those of the plain model (tests/test_torch_sample.py,
    parity_tests/test_generation_parity.py). Not for training or evaluation: the bits of a product depend on how it
    is computed, and evaluation keeps today's."""
    pack = can_pack(model.lm_head.weight.dtype)
    with torch.no_grad():
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if not isinstance(child, nn.Linear):
                    continue
                if child is model.lm_head or not pack:
                    _column_major(child)
                    continue
                try:
                    setattr(module, name, PackedLinear(child))
                except RuntimeError:  # oneDNN refused this dtype after all: the first refusal stands for all
                    pack = False
                    _column_major(child)
    return model


def load_model(config, weights, device: str | None = None, precision: str = "fp32") -> GPT:
    """The model in eval mode, on `device` (default: CUDA where there is one), for a Config and canonical weights
    (gpt2_common.weights). precision "bf16" stores the weights in bfloat16 too, not only the compute as autocast
    would: decoding reads every weight once a token, so half the bytes is most of the gain (and autocast would
    convert each weight again at every call)."""
    from gpt2_torch.weights import from_canonical

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = GPT(config.model)
    model.load_state_dict(from_canonical(weights, config.model))
    return model.to(device=device, dtype=INFERENCE_DTYPES[precision]).eval()


def make_generate(config, weights, device: str | None = None, precision: str = "fp32"):
    """`generate(prompts, max_new_tokens, **options) -> int32 [len(prompts), max_new_tokens]` (generate's options)
    for a Config and canonical weights: what scripts/sample.py runs. precision "bf16" runs the model in bfloat16:
    faster where the hardware has it, no longer token-identical to fp32."""
    model = load_model(config, weights, device, precision)
    return functools.partial(generate, for_cpu_decoding(model) if model.lm_head.weight.is_cpu else model)
