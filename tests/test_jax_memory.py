from gpt2_common.config import load_config
from gpt2_common.flops import num_params
import jax

from gpt2_jax import sharding
from gpt2_jax.memory import compiled_step_bytes, plan


def test_memory_plan_of_small_matches_parameter_count_and_fsdp_splits_it():
    config = load_config("small", ["train.accumulation=scan"])
    full = plan(config, data=8, fsdp=1)
    assert full.params == 4 * num_params(config.model)  # fp32 master weights, replicated under data parallel
    assert full.opt_state >= 2 * full.params  # Adam's two moments
    sharded = plan(config, data=1, fsdp=8)
    assert 0.12 < sharded.params / full.params < 0.13  # ~1/8; LayerNorm and bias vectors stay replicated
    assert 0.12 < sharded.opt_state / full.opt_state < 0.13
    assert sharded.activations == full.activations  # the same rows per device


def test_multisteps_adds_an_accumulator():
    scan = plan(load_config("tiny", ["train.accumulation=scan"]), 1, 1)
    multisteps = plan(load_config("tiny", ["train.accumulation=multisteps"]), 1, 1)
    assert multisteps.opt_state >= scan.opt_state + scan.params


def test_the_fused_loss_keeps_the_logits_out_of_the_compiled_step():
    """The compiler's own buffer sizes: the whole fp32 logits of tiny (8 x 64 x 50304 x 4 bytes = 103 MB, and their
    gradient) leave the step when the loss goes through the head 8 positions at a time."""
    mesh = sharding.make_mesh(load_config("tiny").mesh, jax.devices()[:1])
    whole = compiled_step_bytes(load_config("tiny", ["model.loss_chunk_size=0"]), mesh)
    chunked = compiled_step_bytes(load_config("tiny", ["model.loss_chunk_size=8"]), mesh)
    logits = 8 * 64 * 50304 * 4
    assert whole.temp > 2 * logits
    assert chunked.temp < whole.temp - logits
