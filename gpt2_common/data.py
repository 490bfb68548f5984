"""Token shards on disk and the loader that cuts them into batches.

A shard is a flat array of uint16 token ids, documents separated by <|endoftext|>. We write llm.c's `.bin` form (a
256-int32 header: magic 20240520, version 1, token count; then the tokens) and read it and build-nanogpt's `.npy`.

Opening a shard reads its header only, so that a run over 10B tokens starts as fast as one over 10M; the loader
reads each batch's rows with os.preadv (no memory map: no pages held, and a file cut short under a running job is a
short read and one line, not a SIGBUS) and checks their token ids against the model's vocabulary as it reads them.

The loader is a pure function of (seed, position, process index, process count): `loader.batch(position)` always
returns the same rows, so a checkpoint only needs the position to restart the stream exactly, and every process
computes its own rows of the same global batch without talking to the others.
"""

from __future__ import annotations

import glob
import os
import tempfile
import weakref
from pathlib import Path

import numpy as np

from gpt2_common.errors import UserError
from gpt2_common.files import share_like_open

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
# llm.c leaves the header after its first three ints zero. Where we write a shard, ints 3 and 4 record the largest
# token id in it (int 3 marks the record as there), so that opening it checks it against the model's vocabulary
# without reading it; llm.c's readers ignore them.
MAX_ID_MARK = 0x6D617869  # "maxi"
# A target the loss skips (torch's ignore_index): instruction prompts, padding, context already scored. Both
# frameworks' losses and the evaluation recipes compare targets with this one value.
IGNORE_INDEX = -1


def shard_header(count: int, max_id: int | None = None) -> np.ndarray:
    """The 256-int32 header of a `.bin` shard of `count` tokens whose largest id is `max_id` (None: not recorded)."""
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, count)
    if max_id is not None:
        header[3:5] = (MAX_ID_MARK, max_id)
    return header


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> None:
    """Writes tokens as an llm.c `.bin` shard, atomically (a reader never sees half a shard)."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise UserError(f"token ids must fit in uint16 to be written to '{path}'")
    header = shard_header(tokens.size, int(tokens.max()) if tokens.size else None)
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


class Shard:
    """A token shard, opened but not read: where its tokens lie in the file, their type and count, and the largest
    id it holds where its header records it.

    The file stays open (as a memory map held it) and `read_rows` reads it with os.preadv: nothing is mapped or
    held in memory between batches, so a process's memory does not grow with the data. A shard replaced by a rename
    (as prepare_data.py writes, e.g. two runs preparing the embedded corpus at once) or removed is read as it was
    when opened; one cut short or written over in place is an error that names it, never other tokens or a SIGBUS.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"shard '{self.path}' does not exist")
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as err:
            raise UserError(f"shard '{self.path}' cannot be read: {err.strerror}") from None
        weakref.finalize(self, os.close, self._fd)
        stat = os.fstat(self._fd)
        if self.path.suffix == ".npy":
            self.dtype, self.offset, self.count, self.max_id = _npy_layout(self.path, self._fd)
        else:
            self.dtype, self.offset, self.count, self.max_id = _bin_layout(self.path, self._fd, stat.st_size)
        if stat.st_size < self.offset + self.count * self.dtype.itemsize:  # (a .bin's size was checked exactly)
            raise UserError(
                f"shard '{self.path}' is truncated or corrupt: its header says {self.count} tokens "
                f"({self.offset + self.count * self.dtype.itemsize} bytes) but the file has {stat.st_size} bytes; "
                "prepare the data again")
        self._as_opened = (stat.st_size, stat.st_mtime_ns)

    def __len__(self) -> int:
        return self.count

    def read_rows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """[len(starts), length] tokens in the shard's own dtype: row i is tokens starts[i] .. starts[i]+length-1."""
        self._check_unchanged()
        rows = np.empty((len(starts), length), dtype=self.dtype)
        for row, start in zip(rows, starts):
            if _read_into(self._fd, row, self.offset + int(start) * self.dtype.itemsize) != row.nbytes:
                self._check_unchanged()
                raise UserError(self._changed("was cut short"))  # (and grew back since, to the size it had)
        return rows

    def read(self) -> np.ndarray:
        """All of the shard's tokens (for tools and tests; the loader reads rows)."""
        return self.read_rows(np.zeros(1, dtype=np.int64), self.count)[0]

    def _check_unchanged(self) -> None:
        """The file was not written since it was opened: its size and modification time are as they were."""
        stat = os.fstat(self._fd)
        (size, modified) = self._as_opened
        if stat.st_size < size:
            raise UserError(self._changed(f"was cut short ({stat.st_size} bytes now, {size} when it was opened)"))
        if stat.st_size != size:
            raise UserError(self._changed(f"changed size ({stat.st_size} bytes now, {size} when it was opened)"))
        if stat.st_mtime_ns != modified:
            raise UserError(self._changed("was written to"))

    def _changed(self, what: str) -> str:
        return (f"shard '{self.path}' {what} while this process read it; put back the shards the run started "
                "with (prepare new data into another folder, not over the shards of a running job), then run the "
                "same command again to resume from the last checkpoint")


def _read_into(fd: int, buffer: np.ndarray, offset: int) -> int:
    """Reads buffer.nbytes bytes at `offset` into a contiguous `buffer`, up to the end of the file; returns how many
    it read. os.preadv reads straight into it (no copy) where the system has it."""
    into, done = memoryview(buffer).cast("B"), 0
    while done < len(into):
        if hasattr(os, "preadv"):
            got = os.preadv(fd, [into[done:]], offset + done)
        else:
            data = os.pread(fd, len(into) - done, offset + done)
            got = len(data)
            into[done:done + got] = data
        if got == 0:  # the end of the file
            break
        done += got
    return done


def _bin_layout(path: Path, fd: int, size: int) -> tuple[np.dtype, int, int, int | None]:
    if size < HEADER_BYTES:
        raise UserError(f"shard '{path}' is truncated ({size} bytes, shorter than its 1024-byte header)")
    header = np.frombuffer(os.pread(fd, HEADER_BYTES, 0), dtype=np.int32)
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
    max_id = int(header[4]) if header[3] == MAX_ID_MARK else None
    return np.dtype(np.uint16), HEADER_BYTES, count, max_id


def _npy_layout(path: Path, fd: int) -> tuple[np.dtype, int, int, None]:
    """build-nanogpt's shards: numpy's own header (read_magic, then the dict of dtype, order and shape)."""
    with os.fdopen(os.dup(fd), "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read_header:
                raise ValueError(f"format version {version[0]}.{version[1]} is not that of a token array")
            shape, _, dtype = read_header[version](f)
        except ValueError as err:
            raise UserError(f"shard '{path}' is not a valid .npy file ({err}); prepare the data again") from None
        offset = f.tell()
    if len(shape) != 1 or dtype.kind not in "ui":
        raise UserError(f"shard '{path}' must hold a 1-D integer array, got {dtype}{list(shape)}")
    return dtype, offset, int(shape[0]), None


def read_shard(path: str | os.PathLike) -> np.ndarray:
    """A `.bin` or `.npy` shard's tokens as a 1-D array, its header checked against its size (the whole shard is
    read: for tools and tests; the loader opens shards with Shard and reads rows)."""
    return Shard(path).read()


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


def check_ids(path, low: int, high: int, vocab_size: int | None) -> None:
    """Token ids `low`..`high` read from a shard: at or above the model's vocabulary they mean the shard came from
    another tokenizer; a negative id (a signed .npy) is no token at all."""
    if low < 0:
        raise UserError(f"shard '{path}' holds token id {low}; token ids are 0 or more: it is not a token shard "
                        "(prepare it with scripts/prepare_data.py)")
    if vocab_size is not None and high >= vocab_size:
        raise UserError(
            f"shard '{path}' holds token id {high}, outside model.vocab_size={vocab_size}; "
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
    the next, as in nanoGPT); an EpochOrder says which windows make batch `position` on this process. Opening reads
    the shards' headers only: a shard whose header records a token id outside `vocab_size` is refused here, and
    every batch's rows are checked as they are read (llm.c's and build-nanogpt's shards record nothing).
    """

    def __init__(self, paths, global_batch_size: int, seq_len: int, *, process_index: int = 0,
                 process_count: int = 1, seed: int = 0, shuffle: bool = True, vocab_size: int | None = None):
        self.paths = [Path(p) for p in paths]
        self.shards = [Shard(p) for p in self.paths]
        self.vocab_size = vocab_size
        for shard in self.shards:
            if shard.max_id is not None:
                check_ids(shard.path, 0, shard.max_id, vocab_size)
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
        starts = (windows - self._first_window[shard_ids]) * self.seq_len
        rows = np.empty((len(windows), self.seq_len + 1), dtype=np.int32)
        by_shard = np.argsort(shard_ids, kind="stable")  # each shard opened once a batch, for all its rows
        for picked in np.split(by_shard, np.flatnonzero(np.diff(shard_ids[by_shard])) + 1):
            shard = self.shards[shard_ids[picked[0]]]
            tokens = shard.read_rows(starts[picked], self.seq_len + 1)
            check_ids(shard.path, int(tokens.min()) if tokens.dtype.kind == "i" else 0, int(tokens.max()),
                      self.vocab_size)
            rows[picked] = tokens
        return rows[:, :-1], rows[:, 1:]

    def epoch_of(self, position: int) -> int:
        return self.order.epoch_of(position)
