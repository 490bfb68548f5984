"""How many bytes each device holds for a config on a mesh, from the trainer's real shardings and no allocation.

The parameter, gradient and optimizer-state shapes come from jax.eval_shape of the model and the optax chain; their
shardings from gpt2_jax.sharding's rule table over an AbstractMesh, so any device count can be planned on a laptop.
Activations are an estimate (the compiler decides what it keeps), stated with its formula; `compiled_step_bytes`
asks the compiler instead, for the devices at hand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, AxisType

from gpt2_common.config import Config
from gpt2_jax import sharding
from gpt2_jax.model import build_model
from gpt2_jax.optim import build_optimizer
from gpt2_jax.step import Trainer, build_trainer, compile_on_zeros


@dataclass(frozen=True)
class MemoryPlan:
    params: int  # fp32 master weights
    grads: int  # fp32, one gradient tree alive during the update
    opt_state: int  # Adam moments, and MultiSteps' accumulator when it is used
    activations: int  # estimate for one micro-batch's share on this device

    @property
    def total(self) -> int:
        return self.params + self.grads + self.opt_state + self.activations


def abstract_mesh(data: int, fsdp: int, tensor: int = 1) -> AbstractMesh:
    return AbstractMesh((data, fsdp, tensor), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def _bytes(shape_dtype, named_sharding) -> int:
    return math.prod(named_sharding.shard_shape(shape_dtype.shape)) * jnp.dtype(shape_dtype.dtype).itemsize


def activation_bytes(config: Config, rows_per_device: int, tensor: int = 1) -> int:
    """Korthikanti et al. (2022): 34·T·b·C bytes a layer in 16-bit with flash attention (no T² scores kept),
    split over tensor; plus the head's logits and their gradient in fp32, b·t·V·4 bytes each, where t is
    model.loss_chunk_size (gpt2_jax/loss.py: the fused loss also keeps an fp32 gradient of the hidden states and of
    the embedding) or the whole sequence T when the loss is not chunked."""
    m = config.model
    T, b, C, V = m.block_size, rows_per_device, m.n_embd, m.padded_vocab_size
    half = 2 if config.train.precision in ("bf16", "fp16") else 4
    per_layer = 34 * T * b * C * half // 2 // tensor
    if m.loss_chunk_size:
        head = (2 * b * min(m.loss_chunk_size, T) * V * 4 + V * C * 4) // tensor + b * T * C * 4
    else:
        head = 2 * b * T * V * 4 // tensor
    return m.n_layer * per_layer + head


def plan(config: Config, data: int, fsdp: int, tensor: int = 1) -> MemoryPlan:
    """Bytes on one device when `config` trains on a data x fsdp x tensor mesh."""
    mesh = abstract_mesh(data, fsdp, tensor)
    model = build_model(config.model, config.train.precision, backend="cpu")
    dummy = jnp.zeros((1, config.model.block_size), jnp.int32)
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), dummy)["params"]
    param_shardings = sharding.tree_shardings(boxed, mesh)
    params = jax.tree.map(lambda box: box.value, boxed, is_leaf=lambda x: hasattr(x, "names"))
    param_bytes = sum(jax.tree.leaves(jax.tree.map(_bytes, params, param_shardings)))

    optimizer = build_optimizer(config.train)
    opt_state = jax.eval_shape(optimizer.init, params)
    opt_shardings = sharding.opt_state_shardings(optimizer, opt_state, param_shardings, mesh)
    opt_bytes = sum(jax.tree.leaves(jax.tree.map(_bytes, opt_state, opt_shardings)))

    rows = max(1, config.train.micro_batch_size // (data * fsdp))
    return MemoryPlan(param_bytes, param_bytes, opt_bytes, activation_bytes(config, rows, tensor))


@dataclass(frozen=True)
class CompiledStepBytes:
    """XLA's own accounting of one device's buffers in the compiled train_step (jax's memory_analysis)."""

    arguments: int  # the state and the batch
    outputs: int  # the new state (donated: it reuses the arguments' buffers) and the metrics
    aliased: int  # outputs that reuse an argument's buffer (the donated state)
    temp: int  # everything else the step allocates: activations, gradients, the optimizer's temporaries

    @property
    def peak(self) -> int:
        """What the step holds at once: its arguments, its outputs less those that reuse an argument's buffer, and
        its temporaries."""
        return self.arguments + self.outputs - self.aliased + self.temp


def step_bytes(trainer: Trainer) -> CompiledStepBytes:
    """The compiler's buffer sizes for a trainer's step (compiled, not run).

    This is the compiler's word for the backend it compiles for: on a CPU, attention is XLA's and keeps the T x T
    scores that cuDNN's flash attention on a GPU does not, so a CPU's figure overstates a GPU's.
    """
    analysis = compile_on_zeros(trainer).memory_analysis()
    return CompiledStepBytes(analysis.argument_size_in_bytes, analysis.output_size_in_bytes,
                             analysis.alias_size_in_bytes, analysis.temp_size_in_bytes)


def compiled_step_bytes(config: Config, mesh: jax.sharding.Mesh) -> CompiledStepBytes:
    """step_bytes of the trainer that `config` builds on `mesh`."""
    return step_bytes(build_trainer(config, mesh))
