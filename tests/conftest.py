"""Fixtures shared by the unit tests."""

import pytest


@pytest.fixture
def torch_one_thread():
    """Tiny torch models run fastest on one thread, and on a busy two-core machine two threads wait for each other at
    every op (a 100x slowdown seen on the CI box); subprocesses run with OMP_NUM_THREADS=1, the same kernels."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
