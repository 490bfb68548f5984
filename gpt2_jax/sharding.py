"""The device mesh, the rule table from logical axis names to mesh axes, and placing batches on the mesh.

Data parallel, FSDP and tensor parallel are one code path: `mesh.data`, `mesh.fsdp` and `mesh.tensor` size the
axes, and the rules below say which parameter and activation dimensions split over which axis. The batch splits
over (data, fsdp); parameters and optimizer state split their model width over fsdp (ZeRO-3: gathered per layer
by XLA) and their heads / MLP hidden / vocabulary over tensor (Megatron-style).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from gpt2_common.config import MeshConfig, mesh_shape
from gpt2_common.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axis. Names not listed ("seq", "pos", "norm", "head_dim", "act_embed") are replicated.
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),  # the model width of every matrix and embedding
    ("vocab", "tensor"),
    ("qkv", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def make_mesh(config: MeshConfig, devices: list | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(config, len(devices))
    # Auto axes: jit's in/out shardings plus XLA's propagation place everything in between (jax.make_mesh
    # defaults to Explicit axes, a different programming model).
    return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=devices)


def batch_shards(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def logical_sharding(names: tuple | P, shape: tuple[int, ...], mesh: Mesh, rules=RULES) -> NamedSharding:
    """A NamedSharding for an array with these logical axis names. A dimension that does not divide over its
    mesh axes is replicated instead (a 50257-row vocabulary over 2 tensor devices, say), so that any model fits
    any mesh, just less evenly spread."""
    mesh_axes = nn.logical_to_mesh_axes(tuple(names), rules)
    spec = []
    for dim, axes in zip(shape, mesh_axes):
        axes_tuple = axes if isinstance(axes, tuple) else (axes,) if axes else ()
        size = math.prod(mesh.shape[a] for a in axes_tuple)
        spec.append(axes if size > 1 and dim % size == 0 else None)
    return NamedSharding(mesh, P(*spec))


def tree_shardings(abstract_boxed: Any, mesh: Mesh, rules=RULES) -> Any:
    """Shardings for a tree of nn.LogicallyPartitioned leaves (as from jax.eval_shape(model.init, ...))."""
    return jax.tree.map(
        lambda box: logical_sharding(box.names, box.value.shape, mesh, rules),
        abstract_boxed,
        is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def opt_state_shardings(optimizer: optax.GradientTransformation, abstract_opt_state: Any, param_shardings: Any,
                        mesh: Mesh) -> Any:
    """Each parameter-shaped part of the optimizer state (Adam moments, accumulated gradients) shards as its
    parameter does; counters and scalars are replicated."""
    return optax.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        abstract_opt_state,
        param_shardings,
        transform_non_params=lambda _: replicated(mesh),
    )


def batch_sharding(mesh: Mesh, leading_dims: int = 0) -> NamedSharding:
    """Rows over (data, fsdp); `leading_dims` unsharded axes in front (the micro-batch axis of a scanned step)."""
    return NamedSharding(mesh, P(*([None] * leading_dims), BATCH_AXES))


def process_rows(sharding: NamedSharding, global_shape: tuple[int, ...], row_axis: int = 0) -> tuple[int, int]:
    """(index, count): this process feeds rows [index*n/count, (index+1)*n/count) of the global batch.

    Usually (jax.process_index(), jax.process_count()); it differs when processes share batch rows (a tensor
    axis spanning hosts), and then processes that hold the same rows load the same data.
    """
    n = global_shape[row_axis]
    slices = [idx[row_axis] for idx in sharding.addressable_devices_indices_map(global_shape).values()]
    start = min(s.start or 0 for s in slices)
    stop = max(n if s.stop is None else s.stop for s in slices)
    covered = np.zeros(n, bool)
    for s in slices:
        covered[s] = True
    if not covered[start:stop].all() or n % (stop - start):
        raise UserError("this process's devices do not hold one contiguous block of the batch; "
                        "order the mesh so that each host's devices are adjacent on the data axes")
    return start // (stop - start), n // (stop - start)


def put_batch(local: np.ndarray, sharding: NamedSharding, global_shape: tuple[int, ...]) -> jax.Array:
    """This process's rows -> one global array on the mesh (each process passes only its own rows)."""
    return jax.make_array_from_process_local_data(sharding, local, global_shape)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules=RULES):
    """Makes the model's nn.with_logical_constraint calls real constraints; enter it inside the jitted function
    (the constraints are fixed when the step is traced, and jax.set_mesh is not allowed under jit)."""
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
        yield


def bytes_per_device(tree: Any) -> dict:
    """Bytes of `tree` held on each device, read from the arrays' shards."""
    total: dict = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            total[shard.device] = total.get(shard.device, 0) + shard.data.nbytes
    return total


# For a function vmapped over the data axis (each data-parallel replica's own rows, jax.vmap's spmd_axis_name):
# inside it, the rows split over fsdp only.
REPLICA_RULES = (("batch", "fsdp"), *(rule for rule in RULES if rule[0] != "batch"))


def replica_rules():
    """The rules for the body of a function vmapped over the data axis; enter inside activation_sharding."""
    return nn.logical_axis_rules(REPLICA_RULES)


def replica_shardings(param_shardings: Any) -> Any:
    """Shardings of a [replicas, *param] array per parameter: one slice per data-parallel replica."""
    return jax.tree.map(lambda s: NamedSharding(s.mesh, P("data", *s.spec)), param_shardings)
