"""The PyTorch reference: the same GPT-2 as gpt2_jax, trained with nn.Module, fused AdamW and DDP."""
