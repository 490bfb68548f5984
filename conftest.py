"""Test-wide setup. JAX reads XLA_FLAGS once, when it is first imported: eight simulated CPU devices must be asked
for here, before any test module imports jax, so that the mesh tests (data, FSDP, tensor parallel) have devices.

The session's JAX processes (this one, pytest-xdist's workers and every trainer, sampler and evaluator a test starts)
share one persistent compilation cache, a folder of the session removed at its end: the tests start the same few
programs in process after process, and a compile on two cores takes seconds. The environment carries it to them
(xdist's workers and the tests' subprocesses inherit it), and only a compile of over a second is written (JAX's
default), so the in-process tests' many small programs stay in memory only."""

import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="gpt2-tests-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_collection(session):
    """Collection imports every test module and with them JAX, torch, flax and transformers: with Python's cyclic
    collector paused meanwhile, and what they built frozen after (gc.freeze), no later collection in this long
    process scans them again (the scripts' processes do the same: gpt2_common/startup.py)."""
    from gpt2_common.startup import paused_then_frozen

    with paused_then_frozen():
        yield
