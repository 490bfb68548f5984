#!/usr/bin/env python
"""Train GPT-2 with the PyTorch reference trainer (gpt2_torch/train.py).

  python scripts/train_torch.py --config shakespeare
  torchrun --standalone --nproc_per_node=8 scripts/train_torch.py --config small

The flags, the config and what files can tell are checked before PyTorch is imported (gpt2_formats/launch.py), so
that a mistake is answered at once; then gpt2_torch/train.py trains.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpt2_common.errors import run_cli  # noqa: E402
from gpt2_formats.launch import train_main  # noqa: E402

if __name__ == "__main__":
    run_cli(lambda: train_main("torch", sys.argv[1:]))
