"""GPT-2's loss, as gpt2_jax/loss.py has it: the plain cross-entropy over the logits, and the output head fused with
it, which gives the mean loss of the last hidden states without the [B, T, V] logits. model.py imports both.

The sequence goes through the head `chunk_size` positions at a time (every row of the batch in each chunk); the
forward pass computes a chunk's loss and, when a gradient is wanted, that chunk's gradient with respect to the hidden
states and the head weights in the same pass (softmax minus one-hot, then two matmuls), so that only one chunk's
logits ever exist and the backward pass is a scaling. The FLOPs are those of the plain head and loss.
`cross_entropy` below, over the model's logits, is the same loss computed the plain way (tests/test_torch_loss.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gpt2_common.data import IGNORE_INDEX


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """-inf on the ids the embedding was padded with (>= vocab_size), so that they never take probability."""
    if logits.size(-1) == vocab_size:
        return logits
    padded = torch.arange(logits.size(-1), device=logits.device) >= vocab_size
    return logits.masked_fill(padded, float("-inf"))


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Mean fp32 cross-entropy over the positions whose target is not IGNORE_INDEX (-1: positions to ignore).

    Summed and divided by the count (at least 1) rather than reduction="mean", so that a batch with every target
    ignored gives 0 as on the JAX side, not nan.
    """
    logits = mask_padded_vocab(logits.float(), vocab_size)
    targets = targets.reshape(-1).long()
    total = F.cross_entropy(logits.view(-1, logits.size(-1)), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


def token_losses(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """fp32 cross-entropy [B, T] of each target (0 where it is IGNORE_INDEX) under fp32 logits [B, T, V], which it
    overwrites: the padded ids' columns are set to -inf in place, the values mask_padded_vocab gives without its copy
    of the whole logits (200 kB a token at GPT-2's vocabulary). For evaluation, where nothing needs the logits after;
    torch's eager kernels stream through them fast enough that evaluation needs no chunks here (docs/benchmarks.md)."""
    logits[..., vocab_size:] = float("-inf")
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten().long(), ignore_index=IGNORE_INDEX, reduction="none")
    return nll.view(targets.shape)


def fused_cross_entropy(x: torch.Tensor, embedding: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                        chunk_size: int) -> torch.Tensor:
    """Mean fp32 cross-entropy of targets [B, T] (IGNORE_INDEX: skipped) under logits x @ embedding.T, by chunks.

    x: the final hidden states [B, T, C]; embedding: the fp32 token embedding [V_padded, C]. The matmuls run in the
    autocast dtype when autocast is on (as the plain head's would), else in x's dtype; ids >= vocab_size (the
    padding) never take probability.
    """
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    with torch.autocast(device, enabled=False):  # the casts below are the autocast ones, made explicit
        return _FusedCrossEntropy.apply(x.to(dtype), embedding, targets, vocab_size, chunk_size)


class _FusedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, embedding, targets, vocab_size, chunk_size):
        """The loss, and (when a gradient is wanted) its gradients with respect to x and the embedding.

        d loss / d logits = (softmax - one_hot(target)) / count on the valid positions, cast to the compute dtype
        unscaled by 1/count (in [-1, 1]: no fp16 underflow) before its matmuls; the 1/count is applied in fp32.
        """
        B, T, C = x.shape
        w = embedding.to(x.dtype)
        valid = targets != IGNORE_INDEX
        count = valid.sum().clamp(min=1).float()
        want_grads = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        dx = torch.empty((B, T, C), dtype=torch.float32, device=x.device) if want_grads else None
        dw = torch.zeros(w.shape, dtype=torch.float32, device=x.device) if want_grads else None
        for start in range(0, T, chunk_size):
            x_c, t_c, valid_c = (a[:, start:start + chunk_size] for a in (x, targets, valid))
            # A chunk's logits are its own fresh tensor, worked on in place: on a CPU each pass over them costs as
            # much as the head's matmul (mask_padded_vocab's copy, logsumexp's and the softmax's passes were ~40% of
            # a shakespeare step), so the padded ids are set to -inf in place and one log_softmax gives both the
            # loss and, exponentiated in place, the softmax.
            logits = (x_c @ w.T).float()
            logits[..., vocab_size:] = float("-inf")
            log_probs = torch.log_softmax(logits, dim=-1)
            del logits
            safe_targets = t_c.clamp(min=0).unsqueeze(-1)  # any in-range id: an ignored position is zeroed below
            nll = -log_probs.gather(-1, safe_targets).squeeze(-1)
            total += torch.where(valid_c, nll, 0.0).sum()
            if want_grads:
                dlogits = log_probs.exp_().scatter_add_(
                    -1, safe_targets, torch.full_like(safe_targets, -1.0, dtype=torch.float32)).to(x.dtype)
                # An ignored position's gradient is zero: its row of dlogits is left as it is and zeroed where the
                # row is C wide, not V (its hidden state and its dx), the same values without a pass over the logits
                keep = valid_c.unsqueeze(-1).to(x.dtype)
                dx[:, start:start + chunk_size] = (dlogits @ w).float() * keep
                dw += (dlogits.flatten(0, 1).T @ (x_c * keep).flatten(0, 1)).float()
        if want_grads:
            ctx.save_for_backward(dx / count, dw / count)
            ctx.x_dtype = x.dtype
        return total / count

    @staticmethod
    def backward(ctx, g):
        dx, dw = ctx.saved_tensors
        return (g * dx).to(ctx.x_dtype), g * dw, None, None, None
