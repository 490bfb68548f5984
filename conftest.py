"""Test-wide setup. JAX reads XLA_FLAGS once, when it is first imported: eight simulated CPU devices must be asked
for here, before any test module imports jax, so that the mesh tests (data, FSDP, tensor parallel) have devices."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
