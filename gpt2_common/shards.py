"""Token shards from documents: the GPT-2 BPE in a pool of processes, documents kept whole and in order, the
validation split held out as they come, shards of a fixed size written atomically. The state between two documents
is small (`ShardBuilder.state`), so a long preparation can record it and resume (gpt2_common.prepare_hub)."""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from gpt2_common.data import write_shard
from gpt2_common.errors import UserError
from gpt2_common.files import share_like_open
from gpt2_common.tokenizer import encode_document

DEFAULT_SHARD_TOKENS = 100_000_000  # build-nanogpt's shard size: 200 MB of uint16


@dataclass
class PrepareResult:
    train_tokens: int
    val_tokens: int
    documents: int
    shards: list[Path]


class _ShardWriter:
    """Buffers tokens and writes numbered shards of at most `shard_tokens` tokens."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.buffer = np.empty(shard_tokens, dtype=np.uint16)
        self.filled = 0
        self.total = 0
        self.paths: list[Path] = []

    def add(self, tokens: np.ndarray) -> None:
        while tokens.size:
            take = min(tokens.size, self.shard_tokens - self.filled)
            self.buffer[self.filled:self.filled + take] = tokens[:take]
            self.filled += take
            self.total += take
            tokens = tokens[take:]
            if self.filled == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if self.filled:
            path = self.out_dir / f"{self.split}_{len(self.paths):06d}.bin"
            try:
                write_shard(path, self.buffer[:self.filled])
            except OSError as err:
                if err.errno != errno.ENOSPC:
                    raise
                raise UserError(f"no space left on the device for the shard '{path}' (its temporary file is removed); "
                                "free space and run the same command again") from None
            self.paths.append(path)
            self.filled = 0

    def restore(self, total: int, shards: int, pending: np.ndarray) -> None:
        """Picks up where a writer stopped: `shards` shards written, `pending` tokens not yet in one."""
        self.total, self.filled = total, pending.size
        self.buffer[:pending.size] = pending
        self.paths = [self.out_dir / f"{self.split}_{i:06d}.bin" for i in range(shards)]


class ShardBuilder:
    """Where tokenized documents go, in order: a document goes to validation while validation is short of its share
    of the tokens (so the split depends only on the documents' order), then into that split's shards. Its state
    (`state`, `restore`) is small enough to record after every source file, so that a long prepare resumes."""

    def __init__(self, out_dir: str | os.PathLike, val_fraction: float = 0.05,
                 shard_tokens: int = DEFAULT_SHARD_TOKENS):
        if not 0.0 <= val_fraction < 1.0:
            raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.val_fraction = val_fraction
        self.train = _ShardWriter(self.out_dir, "train", shard_tokens)
        self.val = _ShardWriter(self.out_dir, "val", shard_tokens)
        self.documents = 0

    @property
    def tokens(self) -> int:
        return self.train.total + self.val.total

    def add(self, tokens: np.ndarray) -> None:
        (self.val if self.val.total < self.val_fraction * self.tokens else self.train).add(tokens)
        self.documents += 1

    def state(self) -> tuple[dict, np.ndarray, np.ndarray]:
        """(counts, the train tokens not yet in a shard, the val ones): what `restore` needs."""
        counts = {"documents": self.documents, "train_tokens": self.train.total, "val_tokens": self.val.total,
                  "train_shards": len(self.train.paths), "val_shards": len(self.val.paths)}
        return counts, self.train.buffer[:self.train.filled], self.val.buffer[:self.val.filled]

    def restore(self, counts: dict, train_pending: np.ndarray, val_pending: np.ndarray) -> None:
        self.documents = counts["documents"]
        self.train.restore(counts["train_tokens"], counts["train_shards"], train_pending)
        self.val.restore(counts["val_tokens"], counts["val_shards"], val_pending)

    def finish(self, source: str = "", **meta) -> PrepareResult:
        """Writes the last shards and meta.json (`source` and `meta` recorded in it)."""
        if self.documents == 0:
            raise UserError("the inputs hold no documents")
        self.train.flush()
        self.val.flush()
        if self.val_fraction > 0 and not self.val.paths:
            raise UserError("too few documents to hold any out for validation; add data or pass --val-fraction 0")
        record = {"source": source, "documents": self.documents, "train_tokens": self.train.total,
                  "val_tokens": self.val.total, "tokenizer": "gpt2", "vocab_size": 50257, **meta}
        write_text_atomic(self.out_dir / "meta.json", json.dumps(record, indent=2) + "\n")
        return PrepareResult(self.train.total, self.val.total, self.documents, self.train.paths + self.val.paths)


@dataclass(frozen=True)
class Mark:
    """An item among the documents that comes back out of the tokenizer in its place: when it does, every document
    before it is in the builder. `prepare_hub` marks the end of each source file with one."""

    payload: object


def _encode_item(item: list[str] | Mark) -> list[np.ndarray] | Mark:
    return item if isinstance(item, Mark) else [np.asarray(encode_document(t), dtype=np.uint16) for t in item]


def _groups(documents: Iterable[str | Mark], chars: int = 1 << 20) -> Iterator[list[str] | Mark]:
    """Documents in groups of about a megabyte: large enough to pay for the trip to a worker, small enough to
    keep every worker busy whether the input is a few plays or millions of web pages. A Mark ends a group."""
    group, size = [], 0
    for item in documents:
        if isinstance(item, Mark):
            if group:
                yield group
                group, size = [], 0
            yield item
            continue
        group.append(item)
        size += len(item)
        if size >= chars:
            yield group
            group, size = [], 0
    if group:
        yield group


def tokenize_into(builder: ShardBuilder, documents: Iterable[str | Mark], *, workers: int | None = None,
                  bar=None, on_mark: Callable[[object], None] | None = None, max_tokens: int | None = None,
                  stop: threading.Event | None = None) -> bool:
    """Tokenizes documents in `workers` processes into the builder, in order; calls on_mark(payload) as each Mark
    comes back. Stops after the document that brings the builder to max_tokens, and then returns True. `stop` is
    set when it ends, before the pool is shut down, for a `documents` that waits on something (a download): the
    pool's shutdown waits for the thread that reads them."""
    workers = workers or max(1, (os.cpu_count() or 1))
    # One worker tokenizes in this process: a trainer that has started JAX or torch threads must not fork.
    pool = mp.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        groups = _groups(documents)
        for encoded in pool.imap(_encode_item, groups) if pool else map(_encode_item, groups):
            if isinstance(encoded, Mark):
                if on_mark is not None:
                    on_mark(encoded.payload)
                continue
            for tokens in encoded:
                builder.add(tokens)
                if bar is not None:
                    bar.update(tokens.size)
                if max_tokens is not None and builder.tokens >= max_tokens:
                    return True
    finally:
        if stop is not None:
            stop.set()
        if pool:
            pool.terminate()
    return False


def write_text_atomic(path: Path, text: str) -> None:
    """A reader sees the whole file or the one before it, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        share_like_open(tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
