"""One code path for every layout: a single device, data parallel, FSDP and data x FSDP x tensor parallel train
identically; FSDP really splits the parameters and optimizer state; bad layouts are one-line errors."""

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from gpt2_common.config import MeshConfig, load_config
from gpt2_common.errors import UserError
from gpt2_jax.hlo import collectives
from gpt2_jax.sharding import bytes_per_device, logical_sharding, make_mesh, mesh_shape, process_rows
from gpt2_jax.step import build_trainer, compile_on_zeros
from test_jax_optim import RowLoader, host_params, random_tokens, tiny_config, trained, trainer_for


def layout_config(mesh):
    return dataclasses.replace(tiny_config(), mesh=MeshConfig(**mesh))


@pytest.mark.parametrize("layout", ["data8", "fsdp8", "data2_fsdp2_tensor2"])
def test_every_layout_trains_like_a_single_device(layout):
    _, _, expected = trained("single")
    trainer, state, history = trained(layout)
    np.testing.assert_allclose(history, expected, rtol=1e-5)  # the loss and gradient norm of each of 3 steps
    assert len({s.device for leaf in jax.tree.leaves(state.params) for s in leaf.addressable_shards}) == 8


def test_replicas_with_unequal_ignored_positions_train_like_a_single_device():
    """The scanned step splits each micro-batch over the data replicas, and each replica's loss is a mean over its
    own rows: weighted by their share of the micro-batch's positions, the replicas' losses and gradients add up to
    the micro-batch's mean. Here each replica (one row) ignores a different number of positions."""
    tokens = random_tokens(16)
    targets = tokens[:, 1:].copy()
    for row in range(16):
        targets[row, 31 - 2 * row:] = -1  # row r keeps 31 - 2r of its 32 positions

    class MaskedLoader(RowLoader):
        def batch(self, position):
            rows = slice(position * self.rows, (position + 1) * self.rows)
            return self.tokens[rows, :-1], targets[rows]

    histories = []
    for layout in ("single", "data8"):
        trainer = trainer_for(layout, 8, "scan")
        state = trainer.init(jax.random.PRNGKey(0), host_params(trainer.model))
        history = []
        for _ in range(3):
            state, metrics = trainer.step(state, MaskedLoader(tokens, 8), 0)
            history.append((float(metrics["loss"]), float(metrics["grad_norm"])))
        histories.append(history)
    np.testing.assert_allclose(histories[1], histories[0], rtol=1e-5)


def test_data_parallel_gradients_cross_devices_once_a_step():
    """Each replica sums its own micro-batches' gradients, and the sums are all-reduced once, after the loop. With
    the parameters' (replicated) sharding on the sum, XLA all-reduced every micro-batch's gradient inside the loop,
    and the embedding's two gradients (the lookup's and the head's) each on its own: 3.9x these bytes here."""
    config = load_config("tiny", ["mesh.data=8", "train.batch_size=32", "train.micro_batch_size=16"])
    trainer = build_trainer(config, make_mesh(config.mesh))
    found = collectives(compile_on_zeros(trainer).as_text())
    reductions = [c for c in found if c.op in ("all-reduce", "reduce-scatter")]
    assert sum(c.bytes for c in reductions if c.runs > 1) == 0
    param_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(trainer.abstract_state.params))
    assert sum(c.bytes for c in reductions) == pytest.approx(param_bytes, rel=1e-3)


def test_fsdp_splits_parameters_and_optimizer_state_eight_ways():
    _, state, _ = trained("fsdp8")
    for tree in (state.params, state.opt_state):
        total = sum(leaf.nbytes for leaf in jax.tree.leaves(tree))
        per_device = bytes_per_device(tree)
        assert len(per_device) == 8
        # What stays whole on every device is vectors (LayerNorm, biases that split over the tensor axis, counters):
        # 1.4% of this 64-wide model, which makes a device hold 13.7% instead of 12.5%.
        replicated = [leaf for leaf in jax.tree.leaves(tree) if leaf.sharding.is_fully_replicated]
        assert all(leaf.ndim <= 1 for leaf in replicated)
        assert max(per_device.values()) < total / 8 * 1.12, (max(per_device.values()), total)
    kernel = state.params["h_0"]["mlp"]["c_fc"]["kernel"]
    assert kernel.sharding.spec == P("fsdp", None) and kernel.addressable_shards[0].data.shape == (8, 256)


def test_tensor_parallel_splits_heads_and_mlp():
    _, state, _ = trained("data2_fsdp2_tensor2")
    attn = state.params["h_0"]["attn"]
    assert attn["c_attn"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert attn["c_proj"]["kernel"].sharding.spec == P("tensor", "fsdp")
    assert state.params["wte"]["embedding"].sharding.spec == P("tensor", "fsdp")


def test_mesh_sizes_and_the_rest_axis():
    assert mesh_shape(MeshConfig(data=-1), 8) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert mesh_shape(MeshConfig(data=2, fsdp=-1, tensor=2), 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(UserError, match="needs 6 devices but this job has 8"):
        mesh_shape(MeshConfig(data=3, fsdp=2, tensor=1), 8)
    with pytest.raises(UserError, match="do not divide by 3"):
        mesh_shape(MeshConfig(data=-1, fsdp=3), 8)


def test_batch_or_heads_not_dividing_over_the_mesh_are_user_errors():
    mesh = make_mesh(MeshConfig(data=8))
    config = layout_config({"data": 8})
    small_batches = dataclasses.replace(config, train=dataclasses.replace(config.train, micro_batch_size=4))
    with pytest.raises(UserError, match="micro_batch_size=4 does not divide over 8"):
        build_trainer(small_batches, mesh)
    with pytest.raises(UserError, match="n_head=4 does not divide over mesh.tensor=8"):
        build_trainer(layout_config({"data": 1, "tensor": 8}), make_mesh(MeshConfig(data=1, tensor=8)))


def test_a_dimension_that_does_not_divide_is_replicated():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert logical_sharding(("vocab", "embed"), (50304, 768), mesh).spec == P("tensor", "fsdp")
    assert logical_sharding(("vocab", "embed"), (50257, 768), mesh).spec == P(None, "fsdp")
    assert logical_sharding(("norm",), (768,), mesh).spec == P(None)


def test_one_process_feeds_every_row():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert process_rows(jax.sharding.NamedSharding(mesh, P(("data", "fsdp"))), (8, 32)) == (0, 1)
