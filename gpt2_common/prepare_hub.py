"""prepare_data.py --source hf:REPO --name CONFIG: a Hub dataset fetched and tokenized file by file, pinned to one
commit, through the same pool and shard writer as local files (gpt2_common.shards): the shards are byte for byte
those of `prepare_data.py --source` over the same files in the same order.

Before anything downloads it lists the files and their sizes and refuses, in one line, when the disk cannot hold
the downloads and the shards. While file i is tokenized, file i+1 downloads. After each file the state of the
shard writer is recorded in the output folder (PROGRESS, written atomically like the shards), so an interrupted
run started again goes on from the next file and fetches none of those already tokenized; --delete-downloads
removes each file from the cache once its documents are recorded, and --max-tokens stops early.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from gpt2_common import hub, hub_datasets
from gpt2_common.errors import UserError
from gpt2_common.files import share_like_open
from gpt2_common.prepare import file_documents
from gpt2_common.shards import DEFAULT_SHARD_TOKENS, Mark, PrepareResult, ShardBuilder, tokenize_into

PROGRESS = ".prepare_progress.npz"
# GPT-2 tokens a byte of each kind of file, for the disk check before the tokens are known: FineWeb-Edu's
# sample-10BT holds 10B tokens in ~28.5 GB of Parquet (0.35; 0.4 leaves room), English text ~4 bytes a token.
TOKENS_PER_BYTE = {".parquet": 0.4, ".jsonl": 0.3, ".txt": 0.3}
SETTINGS = ("repo", "revision", "config", "split", "text_field", "val_fraction", "shard_tokens", "max_tokens")


def prepare_named(text: str, out_dir: str | os.PathLike, *, config: str | None = None, split: str | None = None,
                  text_field: str = "text", val_fraction: float = 0.05, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                  workers: int | None = None, max_tokens: int | None = None, delete_downloads: bool = False,
                  progress: bool = True, log: Callable[[str], None] | None = None) -> PrepareResult:
    """Prepares config/split of the Hub dataset `text` (hf:OWNER/REPO[@REVISION]) into token shards in out_dir,
    resuming what an earlier run of the same command left there."""
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()  # its bar for each download would break the lines of ours, which counts files and tokens
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    out_dir = Path(out_dir)
    name = hub.parse(text)
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {max_tokens}")
    record = read_progress(out_dir)
    foreign = sorted(out_dir.glob("*.bin")) if record is None and out_dir.is_dir() else []
    if foreign:
        raise UserError(f"'{out_dir}' already holds shards that this did not write ({foreign[0].name}); give another "
                        "--out or empty it")
    pinned = text if record is None else name.pinned(record[0]["commit"])
    dataset = hub_datasets.resolve(pinned, config, split)
    settings = {"repo": name.repo, "revision": name.revision, "config": dataset.config, "split": dataset.split,
                "text_field": text_field, "val_fraction": val_fraction, "shard_tokens": shard_tokens,
                "max_tokens": max_tokens}
    builder = ShardBuilder(out_dir, val_fraction, shard_tokens)
    done = 0
    if record is not None:
        done = _resume(record, settings, dataset, builder, out_dir)
        if record[0]["finished"]:
            log(f"{as_shown(out_dir)} already holds {dataset.describe()}: {builder.documents} documents, "
                f"{builder.tokens:,} tokens; nothing to do")
            return PrepareResult(builder.train.total, builder.val.total, builder.documents,
                                 builder.train.paths + builder.val.paths)
        log(f"resuming {dataset.describe()} in {as_shown(out_dir)}: {done} of {len(dataset.files)} files tokenized "
            f"({builder.tokens:,} tokens)")
    log(check_disk(dataset, done, out_dir, delete_downloads, max_tokens, builder.tokens))
    write_progress(out_dir, settings, dataset, done, builder, finished=False)
    stopped = _run(dataset, done, builder, settings, out_dir, workers, delete_downloads, progress, log)
    result = builder.finish(dataset.pinned, name=dataset.config, split=dataset.split,
                            **({"max_tokens": max_tokens} if max_tokens else {}))
    write_progress(out_dir, settings, dataset, len(dataset.files), builder, finished=True)
    if stopped and max_tokens:
        log(f"stopped at --max-tokens {max_tokens:,}")
    return result


def _resume(record, settings: dict, dataset: hub_datasets.Dataset, builder: ShardBuilder, out_dir: Path) -> int:
    meta, train_pending, val_pending = record
    changed = [f"{key}: {meta['settings'].get(key)!r} -> {settings[key]!r}" for key in SETTINGS
               if meta["settings"].get(key) != settings[key]]
    if changed or meta["files"] != [f.path for f in dataset.files]:
        raise UserError(f"'{out_dir}' holds a preparation of {hub.PREFIX}{meta['settings']['repo']}@{meta['commit']} "
                        f"with other settings ({'; '.join(changed) or 'other files'}); run its own command to finish "
                        "it, or give another --out")
    builder.restore(meta["counts"], train_pending, val_pending)
    return meta["done"]


def _run(dataset, done, builder, settings, out_dir, workers, delete_downloads, progress, log) -> bool:
    files, max_tokens = dataset.files, settings["max_tokens"]
    stop = threading.Event()
    fetcher = _Fetcher(dataset, stop)
    local: dict[int, Path] = {}
    started, tokens_at_start = time.monotonic(), builder.tokens
    bytes_todo, bytes_done = sum(f.size for f in files[done:]), 0
    bar = _bar(progress, max_tokens or builder.tokens + sum(_estimated_tokens(f) for f in files[done:]),
               builder.tokens, f"file {done + 1}/{len(files)}")

    def wanted(index: int) -> bool:  # fetch ahead only what --max-tokens is likely to read
        expected = tokens_at_start + sum(_estimated_tokens(f) for f in files[done:index])
        return index < len(files) and (max_tokens is None or expected < max_tokens)

    def documents() -> Iterator[str | Mark]:
        for index in range(done, len(files)):
            path = fetcher.get(index)
            if path is None:
                return
            local[index] = path
            if wanted(index + 1):
                fetcher.start(index + 1)
            yield from file_documents([path], settings["text_field"])
            yield Mark(index)

    def file_done(index: int) -> None:
        nonlocal bytes_done
        write_progress(out_dir, settings, dataset, index + 1, builder, finished=False)
        deleted = ""
        if delete_downloads:
            hub.forget(local.pop(index))
            deleted = "; its download deleted"
        bytes_done += files[index].size
        new_tokens = builder.tokens - tokens_at_start
        rate = new_tokens / max(time.monotonic() - started, 1e-9)
        total = builder.tokens + new_tokens / max(bytes_done, 1) * (bytes_todo - bytes_done)
        total = min(total, max_tokens) if max_tokens else total
        bar.total = int(total)
        bar.set_description(f"file {index + 2}/{len(files)}" if index + 1 < len(files) else "done")
        line = (f"file {index + 1}/{len(files)} {files[index].path}: {builder.tokens:,} tokens so far, "
                f"{rate:,.0f} tokens/s, about {_duration((total - builder.tokens) / max(rate, 1e-9))} left{deleted}")
        if bar.disable:
            log(line)
        else:
            bar.write(line, file=sys.stderr)

    try:
        stopped = tokenize_into(builder, documents(), workers=workers, bar=bar, on_mark=file_done,
                                max_tokens=max_tokens, stop=stop)
    finally:
        bar.close()
    if stopped and delete_downloads:
        for path in local.values():
            hub.forget(path)
    return stopped


class _Fetcher:
    """Downloads files of the dataset in daemon threads, one ahead of the tokenizer; `get` waits for one, and gives
    None once `stop` is set (the tokenizer has ended), so that nobody waits for a download no one needs."""

    def __init__(self, dataset: hub_datasets.Dataset, stop: threading.Event):
        self.dataset, self.stop = dataset, stop
        self.threads: dict[int, threading.Thread] = {}
        self.results: dict[int, tuple[Path | None, BaseException | None]] = {}

    def start(self, index: int) -> None:
        if index not in self.threads:
            self.threads[index] = threading.Thread(target=self._fetch, args=(index,), daemon=True)
            self.threads[index].start()

    def _fetch(self, index: int) -> None:
        try:
            path = hub.fetch_file(self.dataset.name, "dataset", self.dataset.files[index].path, self.dataset.commit)
            self.results[index] = (path, None)
        except BaseException as err:  # handed to the tokenizer's thread by get()
            self.results[index] = (None, err)

    def get(self, index: int) -> Path | None:
        self.start(index)
        while self.threads[index].is_alive():
            if self.stop.is_set():
                return None
            self.threads[index].join(0.2)
        path, err = self.results.pop(index)
        if err is not None:
            raise err
        return path


# --- the disk ---------------------------------------------------------------------------------------------------------

def _estimated_tokens(file: hub_datasets.DataFile) -> int:
    return int(file.size * TOKENS_PER_BYTE.get(Path(file.path).suffix, 0.4))


def check_disk(dataset: hub_datasets.Dataset, done: int, out_dir: Path, delete_downloads: bool,
               max_tokens: int | None, tokens_done: int) -> str:
    """What the preparation will take, as one line; a UserError when the disk cannot hold it: the downloads (all of
    them, or two at a time with --delete-downloads) in the Hugging Face cache, and 2 bytes a token of shards."""
    needed, tokens = [], 0
    for file in dataset.files[done:]:
        if max_tokens is not None and tokens_done + tokens >= max_tokens:
            break
        needed.append(file)
        tokens += _estimated_tokens(file)
    tokens = min(tokens, max_tokens - tokens_done) if max_tokens is not None else tokens
    fetch = [f.size for f in needed if hub.cached_file(dataset.name, "dataset", f.path, dataset.commit) is None]
    downloads = sum(sorted(fetch)[-2:]) if delete_downloads else sum(fetch)
    shards = 2 * max(tokens, 0)
    cache, out = _existing(Path(hub.cache_dir())), _existing(out_dir)
    free_cache, free_out = shutil.disk_usage(cache).free, shutil.disk_usage(out).free
    same = os.stat(cache).st_dev == os.stat(out).st_dev
    short = downloads + shards > free_out if same else (downloads > free_cache or shards > free_out)
    reads = "all" if len(needed) == len(dataset.files) - done else f"{len(needed)} of them"
    parts = (f"{_size(sum(fetch))} to download into {hub.cache_dir()}, about {_size(shards)} of shards in "
             f"{as_shown(out_dir)} (estimated)")
    if short:
        free = f"{_size(free_out)} free" if same else f"{_size(free_cache)} free for the downloads and " \
            f"{_size(free_out)} for the shards"
        two = _size(sum(sorted(fetch)[-2:]))
        hint = "" if delete_downloads else f", pass --delete-downloads (downloads then take {two})"
        raise UserError(f"not enough disk space for {dataset.describe()}: it needs about {_size(downloads + shards)} "
                        f"({parts}) and there is {free}; free space{hint}, or pass --max-tokens N for a smaller sample")
    left = len(dataset.files) - done
    return (f"{dataset.describe()}: {left} file{'s' * (left != 1)} to go, {_size(dataset.size)} in all; reading "
            f"{reads}: {parts}")


def _existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, minutes = divmod(seconds // 60, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {seconds % 60:02d}s"


def as_shown(path: Path) -> str:
    from gpt2_common.errors import as_typed

    return as_typed(str(path))


def _bar(enabled: bool, total: int, initial: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="tok", unit_scale=True, desc=desc, smoothing=0.05,
                disable=not enabled or not sys.stderr.isatty())


# --- the record of progress -------------------------------------------------------------------------------------------

def write_progress(out_dir: Path, settings: dict, dataset: hub_datasets.Dataset, done: int, builder: ShardBuilder,
                   finished: bool) -> None:
    """What a resumed run needs, after each file: the settings, the commit, the files and how many are done, and the
    shard writer's state with its tokens not yet in a shard. Written to a temporary name, then renamed."""
    counts, train_pending, val_pending = builder.state()
    meta = {"version": 1, "settings": settings, "commit": dataset.commit, "files": [f.path for f in dataset.files],
            "done": done, "finished": finished, "counts": counts}
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f"{PROGRESS}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta)), train=train_pending, val=val_pending)
        share_like_open(tmp)
        os.replace(tmp, out_dir / PROGRESS)
    except BaseException:
        os.unlink(tmp)
        raise


def read_progress(out_dir: Path) -> tuple[dict, np.ndarray, np.ndarray] | None:
    path = out_dir / PROGRESS
    if not path.is_file():
        return None
    try:
        with np.load(path) as saved:
            return json.loads(str(saved["meta"])), saved["train"], saved["val"]
    except Exception as err:
        raise UserError(f"'{path}', the record of an earlier preparation, does not read ({type(err).__name__}); "
                        f"remove {as_shown(out_dir)} and prepare again") from None
