"""Datasets by name: which files of a Hub dataset repository make a config and split, read as the `datasets` library
reads them (the card's YAML `configs:` with their `data_files`, or, without them, the files' own names), without
the `datasets` library itself (~95 MB, and a second copy of the data as Arrow).

Everything is pinned to one commit: the card, the listing and every file are read at the commit that the revision
(default: main) pointed to when the name was first resolved, so that a preparation that resumes later reads the
same bytes even if the repository has moved on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from gpt2_common import hub
from gpt2_common.errors import UserError

CARD = "README.md"
# What prepare_data.py tokenizes; Alpaca by name reads .parquet and .json/.jsonl records (gpt2_common.instruct)
TEXT_SUFFIXES = (".parquet", ".jsonl", ".txt")
RECORD_SUFFIXES = (".parquet", ".jsonl", ".json")
# Without a card's configs, a file belongs to the split its name says (datasets' own convention), else to train.
_SPLIT_WORDS = {"train": "train", "training": "train", "test": "test", "testing": "test", "validation": "validation",
                "valid": "validation", "val": "validation", "dev": "validation"}


@dataclass(frozen=True)
class DataFile:
    path: str  # in the repository
    size: int  # bytes


@dataclass(frozen=True)
class Dataset:
    """The files of one config and split of a dataset repository at one commit."""

    name: hub.HubName
    commit: str
    config: str
    split: str
    files: tuple[DataFile, ...]

    @property
    def pinned(self) -> str:
        return self.name.pinned(self.commit)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def describe(self) -> str:
        return f"{self.pinned} ({self.config}/{self.split})"


def resolve(text: str, config: str | None = None, split: str | None = None,
            suffixes: tuple[str, ...] = TEXT_SUFFIXES) -> Dataset:
    """The files of `config` (default: the card's default) and `split` (default: train) of the dataset `text`
    (hf:OWNER/REPO[@REVISION]); one line naming the configs or splits there are if the one asked for is not."""
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    name = hub.parse(text)
    folder = hub.snapshot(name, "dataset", [CARD])  # also caches the repository's listing at that commit
    commit = hub.commit_of(folder)
    try:
        tree = {f.path: f.size for f in get_cached_repo_tree(name.repo, repo_type="dataset", revision=commit)}
    except CachedRepoTreeNotFoundError:
        raise UserError(f"{text}: the listing of its files is not in the Hugging Face cache; run once without "
                        "HF_HUB_OFFLINE to fetch it") from None
    configs = card_configs((folder / CARD).read_text(encoding="utf-8") if (folder / CARD).is_file() else "")
    if not configs:
        configs = inferred_configs(tree)
    config_name, entry = _choose_config(text, configs, config)
    splits = entry["splits"]
    split = split or ("train" if "train" in splits else next(iter(splits)) if len(splits) == 1 else None)
    if split not in splits:
        raise UserError(f"config '{config_name}' of {text} has no split '{split}'; its splits: "
                        f"{', '.join(splits)} (choose one with --split)")
    paths = sorted(p for p in tree if any(_matches(pattern, p) for pattern in splits[split]))
    if not paths:
        raise UserError(f"{text}: no file of the repository matches config '{config_name}', split '{split}' "
                        f"({', '.join(splits[split])})")
    unread = sorted({Path(p).suffix or p for p in paths if not p.endswith(suffixes)})
    if unread:
        raise UserError(f"{text} ({config_name}/{split}) holds {', '.join(unread)} files, which this does not read "
                        f"(it reads {', '.join(suffixes)})")
    return Dataset(name, commit, config_name, split, tuple(DataFile(p, tree[p]) for p in paths))


def _choose_config(text: str, configs: dict[str, dict], wanted: str | None) -> tuple[str, dict]:
    if wanted is not None:
        if wanted not in configs:
            raise UserError(f"{text} has no config '{wanted}'; its configs: {', '.join(configs)}")
        return wanted, configs[wanted]
    defaults = [n for n, c in configs.items() if c.get("default")] or [n for n in configs if n == "default"]
    if defaults:
        return defaults[0], configs[defaults[0]]
    if len(configs) == 1:
        return next(iter(configs.items()))
    raise UserError(f"{text} has several configs and no default; choose one with --name: {', '.join(configs)}")


# --- the card -------------------------------------------------------------------------------------------------------

def card_configs(card: str) -> dict[str, dict]:
    """{config name: {"default": bool, "splits": {split: [patterns]}}} from a dataset card's YAML front matter."""
    import yaml

    match = re.match(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", card, flags=re.S)
    if not match:
        return {}
    try:
        meta = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError as err:
        raise UserError(f"the dataset card's YAML does not parse ({str(err).splitlines()[0]})") from None
    configs = {}
    for entry in (meta.get("configs") or []) if isinstance(meta, dict) else []:
        if not isinstance(entry, dict) or "config_name" not in entry:
            continue
        data_dir = str(entry.get("data_dir") or "").strip("/")
        splits = _splits(entry.get("data_files", f"{data_dir}/**" if data_dir else "**"))
        if data_dir and "data_files" in entry:
            splits = {s: [f"{data_dir}/{p}" for p in patterns] for s, patterns in splits.items()}
        configs[str(entry["config_name"])] = {"default": bool(entry.get("default")), "splits": splits}
    return configs


def _splits(data_files) -> dict[str, list[str]]:
    """The card's data_files, in any of its three spellings: a pattern, a list of them (both: split train), or a
    list of {split, path} where path is a pattern or a list."""
    if isinstance(data_files, str):
        return {"train": [data_files]}
    splits: dict[str, list[str]] = {}
    for item in data_files or []:
        if isinstance(item, str):
            splits.setdefault("train", []).append(item)
        elif isinstance(item, dict):
            paths = item.get("path", [])
            splits.setdefault(str(item.get("split", "train")), []).extend(
                [paths] if isinstance(paths, str) else [str(p) for p in paths])
    return splits


def inferred_configs(tree: dict[str, int]) -> dict[str, dict]:
    """A repository without configs in its card: one config, `default`, its splits named by its files."""
    splits: dict[str, list[str]] = {}
    for path in sorted(tree):
        if not path.endswith(RECORD_SUFFIXES + TEXT_SUFFIXES) or path.startswith("."):
            continue
        words = re.split(r"[/_.\-]", path.lower())
        split = next((_SPLIT_WORDS[w] for w in words if w in _SPLIT_WORDS), "train")
        splits.setdefault(split, []).append(path)
    return {"default": {"default": True, "splits": splits}} if splits else {}


def _matches(pattern: str, path: str) -> bool:
    """A data_files pattern as the Hub's fsspec globs read it: `*` within a folder, `**` across them; a pattern
    without wildcards names a file or everything under a folder."""
    pattern = pattern.strip("/")
    if not any(c in pattern for c in "*?["):
        return path == pattern or path.startswith(pattern + "/")
    regex, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            regex, i = regex + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            regex, i = regex + ".*", i + 2
        elif pattern[i] == "*":
            regex, i = regex + "[^/]*", i + 1
        elif pattern[i] == "?":
            regex, i = regex + "[^/]", i + 1
        else:
            regex, i = regex + re.escape(pattern[i]), i + 1
    return re.fullmatch(regex, path) is not None


# --- records (Alpaca by name) ---------------------------------------------------------------------------------------

def record_files(text: str) -> list[Path]:
    """The local files of a dataset's default config, train split, fetched into the cache: what `data.train =
    "hf:tatsu-lab/alpaca"` reads as instruction records."""
    dataset = resolve(text, suffixes=RECORD_SUFFIXES)
    return [hub.fetch_file(dataset.name, "dataset", f.path, dataset.commit) for f in dataset.files]
