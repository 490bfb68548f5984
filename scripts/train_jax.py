"""Train GPT-2 with the JAX trainer: python scripts/train_jax.py --config shakespeare [--run-dir DIR] [--set K=V ...]

Multi-host: start one process per host with --coordinator-address HOST:PORT --num-processes N --process-id I
(or the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment variables).

The flags, the config and what files can tell are checked before JAX is imported (gpt2_formats/launch.py), so that
a mistake is answered at once; then gpt2_jax/train.py trains.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpt2_common.errors import run_cli  # noqa: E402
from gpt2_formats.launch import train_main  # noqa: E402

if __name__ == "__main__":
    run_cli(lambda: train_main("jax", sys.argv[1:]))
