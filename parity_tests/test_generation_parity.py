"""Greedy generation agrees across JAX, PyTorch and transformers from the same weights, with and without the KV
cache, also once the context runs past block_size (where both crop it as nanoGPT does)."""

import torch

from gpt2_common.config import ModelConfig
from gpt2_jax import sample as jax_sample
from gpt2_jax.model import GPT as JaxGPT
from gpt2_torch import sample as torch_sample
from parity_tests.conftest import hf_model, jax_params, random_weights, torch_model

MODEL = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=50257)  # padded to 50304
PROMPTS = [[464, 3290, 373, 257, 922, 1110, 11, 290], [40, 1101, 50256]]  # 8 and 3 tokens: both pass block_size
NEW = 32


def test_greedy_generation_agrees_across_frameworks_and_caches():
    weights = random_weights(MODEL)
    jax_model, params = JaxGPT(MODEL), jax_params(weights, MODEL)
    torch_gpt = torch_model(weights, MODEL)
    runs = {
        "jax cached": jax_sample.generate(jax_model, params, PROMPTS, NEW, temperature=0.0),
        "jax uncached": jax_sample.generate(jax_model, params, PROMPTS, NEW, temperature=0.0, use_cache=False),
        "torch cached": torch_sample.generate(torch_gpt, PROMPTS, NEW, temperature=0.0),
        "torch uncached": torch_sample.generate(torch_gpt, PROMPTS, NEW, temperature=0.0, use_cache=False),
        # what sample.py and serve.py decode with on a CPU: the blocks packed for oneDNN, the head column-major
        "torch cached, CPU decoding layout": torch_sample.generate(
            torch_sample.for_cpu_decoding(torch_model(weights, MODEL)), PROMPTS, NEW, temperature=0.0),
    }
    reference = runs["torch uncached"].tolist()
    for name, out in runs.items():
        assert out.tolist() == reference, f"{name} differs from torch without the cache"
    assert len(set(reference[0])) > 3  # a model that repeats one token would agree trivially

    # transformers' own cached greedy search, within the context it can hold (it does not crop)
    hf = hf_model(weights, MODEL)
    for prompt, expected in zip(PROMPTS, reference):
        room = MODEL.block_size - len(prompt)
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=room, min_new_tokens=room, do_sample=False, pad_token_id=0)
        assert out[0, len(prompt):].tolist() == expected[:room]
