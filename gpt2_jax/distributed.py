"""Joining a multi-process (multi-host) job: jax.distributed.initialize when the launch asks for it.

The launcher says so with the train script's flags or the matching environment variables; a plain run (one process,
all local devices) initializes nothing. Must run before anything touches a JAX backend.
"""

from __future__ import annotations

import argparse
import os
from typing import Mapping

from gpt2_common.errors import UserError

ENV_VARS = {
    "coordinator_address": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("multi-host (or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)")
    group.add_argument("--coordinator-address", default=None, help="host:port of process 0's coordinator")
    group.add_argument("--num-processes", type=int, default=None, help="processes in the job")
    group.add_argument("--process-id", type=int, default=None, help="this process's index, 0 .. num-processes-1")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, env: Mapping[str, str] = os.environ) -> bool:
    """Joins the job described by the arguments, else by the environment; returns whether it did."""
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    for key, var in ENV_VARS.items():
        if given[key] is None and env.get(var):
            given[key] = env[var] if key == "coordinator_address" else _int(var, env[var])
    if all(v is None for v in given.values()):
        return False
    missing = [f"--{k.replace('_', '-')}" for k, v in given.items() if v is None]
    if missing:
        raise UserError(f"a multi-process launch needs {', '.join(missing)} too (or {', '.join(ENV_VARS.values())})")
    if not 0 <= given["process_id"] < given["num_processes"]:
        raise UserError(f"--process-id {given['process_id']} must be in [0, --num-processes {given['num_processes']})")
    import jax  # here, not above: the launch adds this module's flags before any framework loads

    # CPU processes need a collectives library to form one job (GPUs and TPUs bring their own); without it a
    # multi-process CPU computation fails at its first all-reduce.
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError):  # a JAX where the option is gone: gloo is the default there
        pass
    jax.distributed.initialize(given["coordinator_address"], given["num_processes"], given["process_id"])
    return True


def _int(var: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UserError(f"environment variable {var}={text!r} must be an integer") from None
