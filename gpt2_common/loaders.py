"""The train and validation loaders a config asks for, in the form both trainers consume: `batch(position)` ->
(inputs, targets) for this process's rows, pure in (seed, position, process)."""

from __future__ import annotations

from pathlib import Path

from gpt2_common.config import Config
from gpt2_common.data import TokenLoader, find_shards
from gpt2_common.errors import UserError
from gpt2_common.instruct import InstructLoader, read_records
from gpt2_common.prepare import EMBEDDED_SOURCES, ensure_embedded_prepared

VAL_HOLDOUT = 0.02  # alpaca without a validation file: this share of the records (at least one) is held out


def open_loaders(config: Config, process_index: int = 0, process_count: int = 1, progress: bool = True):
    """(train_loader, val_loader); the validation loader is not shuffled, so its first batches are fixed."""
    micro, seq_len, seed = config.train.micro_batch_size, config.model.block_size, config.train.seed
    where = dict(process_index=process_index, process_count=process_count)
    if config.data.format == "alpaca":
        records = read_records(config.data.train)
        if config.data.val:
            val_records = read_records(config.data.val)
        else:
            held_out = max(1, int(len(records) * VAL_HOLDOUT))
            records, val_records = records[:-held_out], records[-held_out:]
        pack = config.data.pack
        train = InstructLoader(records, micro, seq_len, pack=pack, seed=seed, shuffle=True, **where)
        try:
            val = InstructLoader(val_records, micro, seq_len, pack=pack, seed=seed, shuffle=False, **where)
        except UserError as err:
            where_from = f"'{config.data.val}'" if config.data.val else \
                f"the last {len(val_records)} records held out of data.train (2%)"
            raise UserError(f"validation data from {where_from}: {err}; set data.val to a file with more "
                            "records") from None
        return train, val
    train_paths, val_paths = data_paths(config, progress=progress)
    vocab = config.model.vocab_size
    return (TokenLoader(train_paths, micro, seq_len, seed=seed, shuffle=True, vocab_size=vocab, **where),
            TokenLoader(val_paths, micro, seq_len, seed=seed, shuffle=False, vocab_size=vocab, **where))


def data_paths(config: Config, progress: bool = True) -> tuple[list[Path], list[Path]]:
    """The train and validation shards a config names, preparing an embedded corpus into its home on first use."""
    data = config.data
    if data.source in EMBEDDED_SOURCES:
        ensure_embedded_prepared(data.source, data.train, progress=progress)
    elif data.source:
        raise UserError(
            f"data.source '{data.source}' is not an embedded corpus ({', '.join(EMBEDDED_SOURCES)}); "
            "for your own text, run scripts/prepare_data.py and set data.train/data.val"
        )
    return find_shards(data.train, "train"), find_shards(data.val, "val")
