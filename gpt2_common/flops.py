"""FLOPs per token and model FLOPs utilisation, the same formula for both trainers (PaLM appendix B, as nanoGPT
and llm.c count it): 6 FLOPs per parameter per token for forward and backward, plus the attention scores."""

from __future__ import annotations

from gpt2_common.config import ModelConfig

# Dense peak FLOP/s by device name fragment and compute precision (vendor datasheets, without sparsity).
PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "fp32": 30e12},
    "A10G": {"bf16": 70e12, "fp16": 70e12, "fp32": 31e12},
    "V100": {"bf16": 0.0, "fp16": 125e12, "fp32": 15.7e12},
    "T4": {"bf16": 0.0, "fp16": 65e12, "fp32": 8.1e12},
}


def num_params(model: ModelConfig, include_position: bool = True) -> int:
    """Parameters of the model as built: padded vocabulary, tied output head."""
    c, v, l = model.n_embd, model.padded_vocab_size, model.n_layer
    per_block = 2 * 2 * c + (c * 3 * c + 3 * c) + (c * c + c) + (c * 4 * c + 4 * c) + (4 * c * c + c)
    total = v * c + l * per_block + 2 * c
    return total + (model.block_size * c if include_position else 0)


def flops_per_token(model: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token: 6N (N without position embeddings, which do no matmul) plus 12·L·C·T attention."""
    t = seq_len or model.block_size
    return 6 * num_params(model, include_position=False) + 12 * model.n_layer * model.n_embd * t


def peak_flops(device_kind: str, precision: str) -> float | None:
    """The device's dense peak for this precision, or None where we do not know it (then MFU is not reported)."""
    for fragment, peaks in PEAK_FLOPS.items():
        if fragment.lower() in device_kind.lower():
            return peaks.get(precision) or None
    return None


def mfu(tokens_per_s: float, model: ModelConfig, peak: float | None, seq_len: int | None = None) -> float | None:
    if not peak:
        return None
    return tokens_per_s * flops_per_token(model, seq_len) / peak
