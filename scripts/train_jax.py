"""Train GPT-2 with the JAX trainer: python scripts/train_jax.py --config shakespeare [--run-dir DIR] [--set K=V ...]

Multi-host: start one process per host with --coordinator-address HOST:PORT --num-processes N --process-id I
(or the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment variables).
"""

import sys

from gpt2_common.errors import run_cli
from gpt2_jax.train import main

if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
