"""Processes and devices of the PyTorch trainer: joining a torchrun job (NCCL on GPUs, gloo on CPUs), the
collectives the run needs (a mean over ranks, gathering Python objects), and batches placed on the device;
gpt2_jax/distributed.py is its JAX twin."""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Distributed:
    """Joins the torchrun job when launched by torchrun (NCCL on GPUs, gloo on CPUs); else one process."""
    if not torch.cuda.is_available():
        keep_freed_memory_for_reuse()
    if "RANK" not in os.environ:
        return Distributed(0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return Distributed(rank, world_size, device)


def keep_freed_memory_for_reuse() -> None:
    """On a CPU, keep the step's large buffers in the process between steps, as jemalloc or tcmalloc would.

    glibc's malloc maps each block over 32 MB fresh from the kernel and unmaps it when freed, so a step's chunk of
    logits (8 x 32 x 50304 fp32 = 51 MB in shakespeare) page-faults in anew every time: 0.82 M page faults in seven
    steps, 1.7 s of system time. Blocks up to 1 GiB now come from the heap and stay for the next step (0.22 M
    faults, 0.6 s); the process keeps its peak memory, as a trainer does anyway. Elsewhere than glibc: nothing."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h>
    for option in (m_mmap_threshold, m_trim_threshold):
        mallopt(option, 1 << 30)


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over all ranks (gloo has no AVG reduction, hence SUM / world size)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


def to_device(batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader batch (int32 numpy) as int64 tensors on the device; pinned host memory lets the copy run async."""
    out = []
    for array in batch:
        tensor = torch.from_numpy(array)
        if device.type == "cuda":
            tensor = tensor.pin_memory().to(device, non_blocking=True)
        out.append(tensor.long())
    return out[0], out[1]


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (just [obj] outside a multi-process job)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
