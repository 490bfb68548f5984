"""Plain autoregressive sampling: the whole (cropped) context through the model for every new token.

Quadratic in the length, and enough for the sample a training run prints at its end; KV-cached generation is
another module's job.
"""

from __future__ import annotations

import torch

from gpt2_common.tokenizer import decode, get_tokenizer
from gpt2_torch.model import GPT, mask_padded_vocab


def filter_logits(logits: torch.Tensor, vocab_size: int, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """Next-token logits [B, V] -> the logits to sample from: padded ids, those outside the top k and those outside
    the nucleus of probability top_p all at -inf."""
    logits = mask_padded_vocab(logits.float(), vocab_size) / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        mass_before = sorted_logits.softmax(dim=-1).cumsum(dim=-1) - sorted_logits.softmax(dim=-1)
        drop_sorted = mass_before >= top_p  # keep the smallest prefix whose mass reaches top_p (always the first)
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits


@torch.no_grad()
def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Extends token ids idx [B, T] by max_new_tokens; temperature 0 is greedy. Ids are always < vocab_size."""
    config = model.config
    was_training = model.training
    model.eval()
    for _ in range(max_new_tokens):
        context = idx[:, -config.block_size:]
        logits = model(context)[:, -1, :]
        if temperature == 0:
            next_id = mask_padded_vocab(logits, config.vocab_size).argmax(dim=-1, keepdim=True)
        else:
            probs = filter_logits(logits, config.vocab_size, temperature, top_k, top_p).softmax(dim=-1)
            next_id = torch.multinomial(probs, num_samples=1, generator=generator)
        idx = torch.cat((idx, next_id), dim=1)
    model.train(was_training)
    return idx


def sample_text(model: GPT, prompt: str = "\n", max_new_tokens: int = 200, *, temperature: float = 0.8,
                top_k: int | None = 200, top_p: float | None = None, seed: int = 0) -> str:
    """A completion of `prompt` as text (the prompt included), reproducible for a seed."""
    device = next(model.parameters()).device
    prompt_ids = get_tokenizer().encode_ordinary(prompt) or [0]
    if max(prompt_ids) >= model.config.vocab_size:  # a toy vocabulary smaller than GPT-2's: start from id 0
        prompt_ids = [0]
    generator = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    out = generate(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   generator=generator)
    return decode(out[0].tolist())
