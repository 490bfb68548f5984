"""What a generation or an evaluation may ask of the machine. sample.py, serve.py and evaluate.py size their batches
from the memory the model and its cache need, and bound everything a user or a client could make unbounded (new
tokens, samples, seeds), so that no input takes the machine down: a machine shared with others, where the kernel's
OOM killer may pick another process than the one that grew.

The byte counts are estimates, on the high side, of what the largest buffers of a step take in either framework
(the weights, the KV cache at its widest, the fp32 logits and the sampler's copies of them, the whole window's
activations once the context slides); a batch may take up to MEMORY_SHARE of the memory available when it starts.
"""

from __future__ import annotations

import os

from gpt2_common.config import SEED_MAX, ModelConfig  # noqa: F401 (SEED_MAX: the bounds in one place)
from gpt2_common.flops import num_params

MEMORY_SHARE = 0.5  # of the memory available: the rest for the framework, other processes and the estimate's error
# A completion longer than this is the work of many calls (1M tokens is ~750k words); past the model's context each
# token also reruns the whole window (no cache), which at GPT-2 small's 1024 on a CPU is about a tenth of a second.
MAX_NEW_TOKENS = 1_000_000
MAX_SAMPLES = 1_000_000  # completions of one sample.py command (printed batch by batch, so memory is one batch's)
SAMPLER_COPIES = 6  # [V]-wide fp32 buffers of one row while drawing a token: logits, sorted, probabilities, their
# cumulative sum, the filtered logits, the random noise
PREFILL_POSITIONS = 64  # positions one prefill call feeds (both samplers' PREFILL_CHUNK); torch computes their logits


def available_memory() -> int:
    """Bytes the kernel says a new allocation can take without swapping (MemAvailable), else the free pages."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30  # no way to ask (not Linux nor POSIX): assume a small machine


def _itemsize(precision: str) -> int:
    return 2 if precision in ("bf16", "fp16") else 4


def weights_bytes(model: ModelConfig, precision: str = "fp32") -> int:
    return num_params(model) * _itemsize(precision)


def decode_row_bytes(model: ModelConfig, precision: str, new_tokens: int, slides: bool) -> int:
    """Bytes one row of a generation may hold at its peak: its KV cache at full width, a prefill chunk's logits,
    the sampler's [vocab]-wide buffers, its output; and, where the completion runs past the context (`slides`), the
    whole window's logits and activations, which every step then computes again."""
    c, t, v = model.n_embd, model.block_size, model.padded_vocab_size
    item = _itemsize(precision)
    cache = 2 * model.n_layer * t * c * item
    prefill = PREFILL_POSITIONS * (v * 4 + 8 * c * item)
    sampler = SAMPLER_COPIES * v * 4
    window = t * 8 + new_tokens * 8  # token ids (int64 in torch) and the output
    sliding = t * (2 * v * 4 + 8 * c * item) + model.n_head * t * t * 4 if slides else 0
    return cache + prefill + sampler + window + sliding


def eval_row_bytes(model: ModelConfig, precision: str) -> int:
    """Bytes one sequence of an evaluation batch may hold: the fp32 logits of every position and a log-softmax of
    them (torch computes them whole), the activations, the attention scores."""
    c, t, v = model.n_embd, model.block_size, model.padded_vocab_size
    return t * (2 * v * 4 + 12 * c * _itemsize(precision)) + model.n_head * t * t * 4


def rows_that_fit(row_bytes: int, model: ModelConfig, precision: str, available: int | None = None) -> int:
    """Rows of `row_bytes` that fit beside the weights in MEMORY_SHARE of the available memory (0: not one)."""
    available = available_memory() if available is None else available
    budget = int(available * MEMORY_SHARE) - weights_bytes(model, precision)
    return max(0, budget // max(row_bytes, 1))


def shown_bytes(n: int) -> str:
    """1536 -> '1.5 KB', for messages: decimal units, as free(1) -h and file managers show them."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"
