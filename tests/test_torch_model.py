"""The PyTorch GPT-2: names, tying, init, the padded vocabulary, the loss, the sampler, and that it can learn."""

import math

import numpy as np
import pytest
import torch

from gpt2_common.config import ModelConfig
from gpt2_torch.model import GPT, cross_entropy, mask_padded_vocab
from gpt2_torch.sample import filter_logits, generate



pytestmark = pytest.mark.usefixtures("torch_one_thread")

# vocab 100 is padded to 128: the padded ids exist in the embedding and must never take probability
TINY = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=16, vocab_size=100)


def tiny_model(seed=0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(**{**TINY.__dict__, **overrides}))


def test_parameter_names_and_shapes_are_the_contracts():
    state = tiny_model().state_dict()
    C, V = 64, 128
    expected = {"transformer.wte.weight": (V, C), "transformer.wpe.weight": (16, C),
                "transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,), "lm_head.weight": (V, C)}
    for i in range(2):
        h = f"transformer.h.{i}."
        expected |= {h + "ln_1.weight": (C,), h + "ln_1.bias": (C,), h + "ln_2.weight": (C,), h + "ln_2.bias": (C,),
                     h + "attn.c_attn.weight": (3 * C, C), h + "attn.c_attn.bias": (3 * C,),
                     h + "attn.c_proj.weight": (C, C), h + "attn.c_proj.bias": (C,),
                     h + "mlp.c_fc.weight": (4 * C, C), h + "mlp.c_fc.bias": (4 * C,),
                     h + "mlp.c_proj.weight": (C, 4 * C), h + "mlp.c_proj.bias": (C,)}
    assert {k: tuple(v.shape) for k, v in state.items()} == expected


def test_output_head_is_tied_to_the_token_embedding():
    model = tiny_model()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert sum(p.numel() for p in model.parameters()) == sum(
        v.numel() for k, v in model.state_dict().items() if k != "lm_head.weight")


def test_initialisation_follows_gpt2():
    model = tiny_model(n_layer=4, n_embd=256, n_head=4)  # big enough for the standard deviations to be measured
    params = dict(model.named_parameters())
    residual_std = 0.02 / math.sqrt(2 * 4)
    for name, p in params.items():
        if name.endswith(("attn.c_proj.weight", "mlp.c_proj.weight")):
            assert p.std().item() == pytest.approx(residual_std, rel=0.05), name
        elif name.endswith("weight") and p.dim() == 2:
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name
        elif "ln_" in name and name.endswith("weight"):
            assert torch.all(p == 1), name
        else:
            assert torch.all(p == 0), name


def test_attention_is_causal():
    model = tiny_model().eval()
    idx = torch.randint(0, 100, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 100
    torch.testing.assert_close(model(idx)[:, :10], model(changed)[:, :10])
    assert not torch.allclose(model(idx)[:, 10:], model(changed)[:, 10:])


class PaddedIdsWin(GPT):
    """A model whose padded ids would take all the probability if they were not masked."""

    def forward(self, idx):
        logits = super().forward(idx)
        return torch.cat([logits[..., :100], logits[..., 100:] + 1e4], dim=-1)


def test_padded_vocabulary_takes_no_probability_and_no_gradient():
    torch.manual_seed(0)
    model = PaddedIdsWin(TINY)
    idx = torch.randint(0, 100, (2, 16))
    logits = model(idx)
    assert logits.dtype == torch.float32 and logits.shape == (2, 16, 128)
    probs = mask_padded_vocab(logits, 100).softmax(-1)
    assert torch.all(probs[..., 100:] == 0)
    loss = cross_entropy(logits, idx, 100)
    expected = torch.nn.functional.cross_entropy(logits[..., :100].reshape(-1, 100), idx.reshape(-1))
    torch.testing.assert_close(loss, expected)
    # no input id reaches the padded rows of wte, so only the tied head could move them, and the mask stops that
    loss.backward()
    assert torch.all(model.transformer.wte.weight.grad[100:] == 0)
    assert torch.any(model.transformer.wte.weight.grad[:100] != 0)


def test_forward_with_targets_gives_the_masked_loss():
    model = tiny_model()
    idx, targets = torch.randint(0, 100, (2, 16)), torch.randint(0, 100, (2, 16))
    targets[0, :3] = -1
    torch.testing.assert_close(model(idx, targets), cross_entropy(model(idx), targets, 100))


def test_loss_ignores_targets_of_minus_one():
    logits = torch.randn(2, 4, 128)
    targets = torch.randint(0, 100, (2, 4))
    masked = targets.clone()
    masked[0, :2] = -1
    keep = masked != -1
    expected = torch.nn.functional.cross_entropy(logits[..., :100][keep], targets[keep])
    torch.testing.assert_close(cross_entropy(logits, masked, 100), expected)
    assert cross_entropy(logits, torch.full_like(targets, -1), 100).item() == 0.0  # as on the JAX side: not nan


def test_a_tiny_model_overfits_one_batch():
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 100, (4, 17), generator=generator)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    first = cross_entropy(model(inputs), targets, 100).item()
    assert first == pytest.approx(math.log(100), rel=0.1)  # uniform at init over the real vocabulary
    for _ in range(150):
        loss = cross_entropy(model(inputs), targets, 100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05, f"loss {first:.3f} -> {loss.item():.3f}: the model does not memorise one batch"


def test_sampler_never_draws_padded_ids_and_greedy_is_deterministic():
    torch.manual_seed(0)
    model = PaddedIdsWin(TINY)
    prompts = [[0]] * 3
    out = generate(model, prompts, 20, temperature=1.5, seed=0)
    assert out.shape == (3, 20) and out.max() < 100
    greedy = generate(model, prompts, 20, temperature=0)
    np.testing.assert_array_equal(greedy, generate(model, prompts, 20, temperature=0))
    np.testing.assert_array_equal(generate(model, prompts, 20, temperature=1.0, top_k=1), greedy)
    np.testing.assert_array_equal(generate(model, prompts, 20, temperature=1.0, top_p=1e-6), greedy)
    # longer than block_size: the context is cropped to the last block_size tokens
    assert generate(model, prompts, 20 + 16, temperature=0).shape == (3, 36)


def test_top_k_and_top_p_keep_the_expected_ids():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_logits(logits, 4, top_k=2)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, 4, top_p=0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, 4, top_p=0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(filter_logits(logits, 3)).tolist() == [[True, True, True, False]]
