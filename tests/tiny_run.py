"""The run config that the fault and hostile-world tests train: a 2-layer, 32-wide model over 100 token ids with
dropout (so that a resumed run's restored RNG and loader position matter), and random shards for it, written once
under the test's folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from gpt2_common.data import write_shard


def write_run_config(root: Path, name: str, train: dict, *, model: dict | None = None, train_tokens: int = 12_000,
                     file_name: str | None = None) -> Path:
    """A config TOML under root ([train] holds `train`; [model] the tiny model plus `model`), the shards
    root/data/train.bin and val.bin beside it; named after `train` unless file_name is given."""
    if not (root / "data" / "train.bin").exists():
        rng = np.random.default_rng(0)
        write_shard(root / "data" / "train.bin", rng.integers(0, 100, train_tokens))
        write_shard(root / "data" / "val.bin", rng.integers(0, 100, 1_000))
    model = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, "vocab_size": 100, "dropout": 0.1,
             **(model or {})}
    text = [f'name = "{name}"', "[model]", *(f"{k} = {json.dumps(v)}" for k, v in model.items()), "[train]"]
    text += [f"{k} = {json.dumps(v)}" for k, v in train.items()]
    text += ["[data]", f'train = "{root / "data" / "train.bin"}"', f'val = "{root / "data" / "val.bin"}"']
    path = root / (file_name or f"config_{abs(hash(json.dumps(train, sort_keys=True))) % 10**8}.toml")
    path.write_text("\n".join(text) + "\n")
    return path
