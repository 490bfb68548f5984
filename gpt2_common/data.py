"""Token shards on disk and the loader that cuts them into batches.

A shard is a flat array of uint16 token ids, documents separated by <|endoftext|>. We write llm.c's `.bin` form (a
256-int32 header: magic 20240520, version 1, token count; then the tokens) and read it and build-nanogpt's `.npy`.

The loader is a pure function of (seed, position, process index, process count): `loader.batch(position)` always
returns the same rows, so a checkpoint only needs the position to restart the stream exactly, and every process
computes its own rows of the same global batch without talking to the others.
"""

from __future__ import annotations

import glob
import os
import tempfile
from pathlib import Path

import numpy as np

from gpt2_common.errors import UserError
from gpt2_common.files import share_like_open

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
# A target the loss skips (torch's ignore_index): instruction prompts, padding, context already scored. Both
# frameworks' losses and the evaluation recipes compare targets with this one value.
IGNORE_INDEX = -1


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> None:
    """Writes tokens as an llm.c `.bin` shard, atomically (a reader never sees half a shard)."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise UserError(f"token ids must fit in uint16 to be written to '{path}'")
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, tokens.size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header.tobytes())
            f.write(tokens.astype(np.uint16).tobytes())
        share_like_open(tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_shard(path: str | os.PathLike) -> np.ndarray:
    """Memory-maps a `.bin` or `.npy` shard as a 1-D uint16 array, checking its header against its size."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"shard '{path}' does not exist")
    if path.suffix == ".npy":
        try:
            tokens = np.load(path, mmap_mode="r")
        except ValueError as err:
            raise UserError(f"shard '{path}' is not a valid .npy file ({err}); prepare the data again") from None
        if tokens.ndim != 1 or tokens.dtype.kind not in "ui":
            raise UserError(f"shard '{path}' must hold a 1-D integer array, got {tokens.dtype}{list(tokens.shape)}")
        return tokens
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise UserError(f"shard '{path}' is truncated ({size} bytes, shorter than its 1024-byte header)")
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise UserError(
            f"shard '{path}' has magic {header[0]}, not {SHARD_MAGIC}: not an llm.c token shard; "
            "make shards with scripts/prepare_data.py"
        )
    if header[1] != SHARD_VERSION:
        raise UserError(f"shard '{path}' has version {header[1]}; only version {SHARD_VERSION} (uint16 tokens) is read")
    count = int(header[2])
    if size != HEADER_BYTES + 2 * count:
        raise UserError(
            f"shard '{path}' is truncated or corrupt: its header says {count} tokens "
            f"({HEADER_BYTES + 2 * count} bytes) but the file has {size} bytes; prepare the data again"
        )
    return np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_BYTES, shape=(count,))


def find_shards(pattern: str, what: str = "data", setting: str | None = None) -> list[Path]:
    """Shard files from a glob or a directory, sorted so that every process sees the same order. `setting`: what
    the user set the pattern with, for the messages (default data.<what>)."""
    setting = setting or f"data.{what}"
    pattern = os.path.expanduser(pattern)
    if not pattern:
        raise UserError(f"no {what} shards are configured; set {setting} to a glob or directory of .bin/.npy shards")
    if os.path.isdir(pattern):
        paths = [p for p in Path(pattern).iterdir() if p.suffix in (".bin", ".npy")]
    else:
        paths = [Path(p) for p in glob.glob(pattern)]
    paths = sorted(p for p in paths if p.is_file())
    if not paths:
        raise UserError(
            f"no {what} shards match '{pattern}'; run scripts/prepare_data.py --out DIR and point {setting} at DIR"
        )
    return paths


def check_vocab(tokens: np.ndarray, vocab_size: int, path) -> None:
    """Token ids at or above the model's vocabulary mean the shard came from another tokenizer; a negative id (a
    signed .npy) is no token at all."""
    chunk = 1 << 24
    for start in range(0, tokens.size, chunk):
        top = int(tokens[start:start + chunk].max())
        low = int(tokens[start:start + chunk].min()) if tokens.dtype.kind == "i" else 0
        if low < 0:
            raise UserError(f"shard '{path}' holds token id {low}; token ids are 0 or more: it is not a token shard "
                            "(prepare it with scripts/prepare_data.py)")
        if top >= vocab_size:
            raise UserError(
                f"shard '{path}' holds token id {top}, outside model.vocab_size={vocab_size}; "
                "it was made with another tokenizer: prepare it again with scripts/prepare_data.py"
            )


class EpochOrder:
    """The order in which a loader visits its rows: every row once an epoch, drawn from (seed, epoch), and global
    batch i = rows [i*B, (i+1)*B) of that order, of which process p takes its contiguous share.

    Pure: the same (seed, position, process) gives the same rows in any process, before or after a restart.
    """

    def __init__(self, num_rows: int, global_batch_size: int, process_index: int, process_count: int,
                 seed: int, shuffle: bool):
        if global_batch_size % process_count:
            raise UserError(
                f"a batch of {global_batch_size} sequences does not divide over {process_count} processes; "
                f"make train.micro_batch_size a multiple of {process_count}"
            )
        self.num_rows = num_rows
        self.global_batch_size = global_batch_size
        self.rows = global_batch_size // process_count
        self.process_index = process_index
        self.seed, self.shuffle = seed, shuffle
        self.batches_per_epoch = num_rows // global_batch_size
        self._cached_epoch, self._cached_order = -1, None

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._cached_epoch:
            if self.shuffle:
                self._cached_order = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
            else:
                self._cached_order = np.arange(self.num_rows)
            self._cached_epoch = epoch
        return self._cached_order

    def row_ids(self, position: int) -> np.ndarray:
        """The global row ids of this process's share of batch `position`."""
        epoch, index = divmod(position, self.batches_per_epoch)
        start = index * self.global_batch_size + self.process_index * self.rows
        return self._order(epoch)[start:start + self.rows]

    def epoch_of(self, position: int) -> int:
        return position // self.batches_per_epoch


class TokenLoader:
    """Cuts shards into [rows, seq_len] input/target batches.

    The shards are split into non-overlapping windows of seq_len+1 tokens (the last token of a window is the first of
    the next, as in nanoGPT); an EpochOrder says which windows make batch `position` on this process.
    """

    def __init__(self, paths, global_batch_size: int, seq_len: int, *, process_index: int = 0,
                 process_count: int = 1, seed: int = 0, shuffle: bool = True, vocab_size: int | None = None):
        self.paths = [Path(p) for p in paths]
        self.shards = [read_shard(p) for p in self.paths]
        if vocab_size is not None:
            for tokens, path in zip(self.shards, self.paths):
                check_vocab(tokens, vocab_size, path)
        self.seq_len = seq_len
        windows_per_shard = np.array([max(0, (len(s) - 1) // seq_len) for s in self.shards], dtype=np.int64)
        self._first_window = np.concatenate([[0], np.cumsum(windows_per_shard)])
        self.num_windows = int(self._first_window[-1])
        self.order = EpochOrder(self.num_windows, global_batch_size, process_index, process_count, seed, shuffle)
        self.batches_per_epoch = self.order.batches_per_epoch
        if self.batches_per_epoch == 0:
            total = sum(len(s) for s in self.shards)
            raise UserError(
                f"the shards {', '.join(map(str, self.paths[:3]))} hold {total} tokens, fewer than one batch of "
                f"{global_batch_size} x {seq_len + 1}; add data or lower train.micro_batch_size or model.block_size"
            )

    def window_ids(self, position: int) -> np.ndarray:
        return self.order.row_ids(position)

    def batch(self, position: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets), each int32 [rows, seq_len], for batch number `position` (0, 1, 2, ... forever)."""
        windows = self.window_ids(position)
        shard_ids = np.searchsorted(self._first_window, windows, side="right") - 1
        rows = np.empty((len(windows), self.seq_len + 1), dtype=np.int32)
        for row, (window, shard) in enumerate(zip(windows, shard_ids)):
            offset = (window - self._first_window[shard]) * self.seq_len
            rows[row] = self.shards[shard][offset:offset + self.seq_len + 1]
        return rows[:, :-1], rows[:, 1:]

    def epoch_of(self, position: int) -> int:
        return self.order.epoch_of(position)
