"""The repositories the fake Hub (tests/fake_hub.py) serves, made by the tests: a GPT-2 (a small random model, as
openai-community/gpt2), a FineWeb-Edu-like dataset (a card with configs, Parquet files in subfolders), a
WikiText-like one, an Alpaca-like one without configs in its card, a dataset with no card at all (its files'
names say its splits), and HellaSwag's val file where
raw.githubusercontent.com keeps it. Each is built once a session (tests/conftest.py)."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fake_hub import FakeHub

GPT2 = "openai-community/gpt2"
FINEWEB = "HuggingFaceFW/fineweb-edu"
WIKITEXT = "Salesforce/wikitext"
ALPACA = "tatsu-lab/alpaca"
NO_CARD = "someone/no-card"  # no README.md: one config, `default`, its splits named by its files
NO_CARD_FILES = ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet",
                 "data/test-00000-of-00001.parquet"]
HELLASWAG_PATH = "/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
FINEWEB_SAMPLE = ["sample/10BT/000_00000.parquet", "sample/10BT/001_00000.parquet", "sample/10BT/002_00000.parquet"]

FINEWEB_CARD = """---
license: odc-by
task_categories:
- text-generation
configs:
- config_name: default
  data_files:
  - split: train
    path: data/*/*
- config_name: sample-10BT
  data_files:
  - split: train
    path: sample/10BT/*
- config_name: sample-100BT
  data_files:
  - split: train
    path: sample/100BT/*
- config_name: CC-MAIN-2024-10
  data_files:
  - split: train
    path: data/CC-MAIN-2024-10/*
---
# FineWeb-Edu (a stand-in made by the tests)
"""
WIKITEXT_CARD = """---
configs:
- config_name: wikitext-103-raw-v1
  data_files:
  - split: test
    path: wikitext-103-raw-v1/test-*
  - split: train
    path: wikitext-103-raw-v1/train-*
  - split: validation
    path: wikitext-103-raw-v1/validation-*
- config_name: wikitext-2-raw-v1
  data_files:
  - split: test
    path: wikitext-2-raw-v1/test-*
  - split: train
    path: wikitext-2-raw-v1/train-*
---
"""
ALPACA_CARD = """---
license: cc-by-nc-4.0
dataset_info:
  features:
  - name: instruction
    dtype: string
---
# Alpaca (a stand-in made by the tests)
"""
WORDS = ("the of and to in is was for that on as with by he at from his an were are which this be or first new "
         "school learning students water energy history science children world system cells body plants light "
         "teachers earth research health during between through years people study university century").split()
# HellaSwag's JSONL shape (ctx, endings, label): the fake server's val file (tests/test_hellaswag_training.py adds two)
HELLASWAG = [
    ("A man is sitting on a roof. He", ["is using wrap to wrap a pair of skis.", "starts pulling up roofing.",
                                        "is ripping level tiles off.", "is holding a rope."], 3),
    ("The chef cracks two eggs into a bowl. She", ["whisks them with a fork.", "paints the bowl blue.",
                                                   "throws the bowl away.", "sings to the eggs."], 0),
    ("A dog runs across the park. It", ["catches the ball.", "reads a newspaper.", "flies away.",
                                        "sits down on the grass quietly."], 0),
]


def hellaswag_jsonl(examples=HELLASWAG) -> str:
    return "".join(json.dumps({"ctx": c, "endings": e, "label": label}) + "\n" for c, e, label in examples)


@dataclass
class HubRepos:
    hub: FakeHub
    commits: dict[str, str] = field(default_factory=dict)
    files: dict[str, dict[str, bytes]] = field(default_factory=dict)  # repo -> its files
    hellaswag_base: str = ""
    hellaswag: bytes = b""

    def write(self, repo: str, paths: list[str], to: Path) -> list[Path]:
        """Local copies of a repository's files (to prepare them as local files and compare)."""
        out = []
        for path in paths:
            (to / path).parent.mkdir(parents=True, exist_ok=True)
            (to / path).write_bytes(self.files[repo][path])
            out.append(to / path)
        return out


def parquet(columns: dict[str, list]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer, row_group_size=64)
    return buffer.getvalue()


def web_documents(seed: int, count: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(40, 400)))).capitalize() + "." for _ in range(count)]


def fineweb_file(seed: int, count: int = 120) -> bytes:
    texts = web_documents(seed, count)
    return parquet({"text": texts, "id": [f"<urn:uuid:{seed}-{i}>" for i in range(count)],
                    "dump": ["CC-MAIN-2024-10"] * count, "token_count": [len(t) // 4 for t in texts],
                    "score": [3.1] * count, "int_score": [3] * count})


def gpt2_files(tmp: Path) -> dict[str, bytes]:
    """A random GPT-2 of 2 layers, 64 wide, with GPT-2's vocabulary, as transformers saves one; and the other
    frameworks' copies a model repository carries, which a fetch of the weights must leave alone."""
    from gpt2_common import weights as cw
    from gpt2_common.config import ModelConfig

    model = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=64)
    rng = np.random.default_rng(0)
    weights = {k: (0.02 * rng.standard_normal(s)).astype(np.float32) for k, s in cw.canonical_shapes(model).items()}
    cw.save_hf(weights, model, tmp / "gpt2")
    files = {p.name: p.read_bytes() for p in (tmp / "gpt2").iterdir()}
    files |= {"pytorch_model.bin": b"\0" * 2048, "tf_model.h5": b"\0" * 2048, "README.md": b"# GPT-2\n"}
    return files


def build(hub: FakeHub, tmp: Path) -> HubRepos:
    repos = HubRepos(hub)
    fineweb = {"README.md": FINEWEB_CARD.encode(), ".gitattributes": b"*.parquet filter=lfs\n"}
    fineweb |= {path: fineweb_file(seed) for seed, path in enumerate(FINEWEB_SAMPLE)}
    fineweb |= {"sample/100BT/000_00000.parquet": fineweb_file(10), "data/CC-MAIN-2024-10/000_00000.parquet":
                fineweb_file(11)}
    wikitext = {"README.md": WIKITEXT_CARD.encode()}
    for config, seed in (("wikitext-103-raw-v1", 20), ("wikitext-2-raw-v1", 30)):
        for offset, split in enumerate(("test", "train", "validation")):
            lines = [line for doc in web_documents(seed + offset, 30) for line in ("", f" {doc} \n")]
            wikitext[f"{config}/{split}-00000-of-00001.parquet"] = parquet({"text": lines})
    rng = np.random.default_rng(5)
    alpaca_records = [{"instruction": f"Write {i} words about {rng.choice(WORDS)}.",
                       "input": "" if i % 3 else f"context {i}", "output": " ".join(rng.choice(WORDS, 12))}
                      for i in range(600)]
    alpaca = {"README.md": ALPACA_CARD.encode(), "data/train-00000-of-00001-a09b74b3ef9c3b56.parquet": parquet({
        key: [r[key] for r in alpaca_records] for key in ("instruction", "input", "output")})}
    no_card = {path: fineweb_file(40 + seed, count=30) for seed, path in enumerate(NO_CARD_FILES)}
    for kind, repo, files in (("model", GPT2, gpt2_files(tmp)), ("dataset", FINEWEB, fineweb),
                              ("dataset", WIKITEXT, wikitext), ("dataset", ALPACA, alpaca),
                              ("dataset", NO_CARD, no_card)):
        repos.commits[repo] = hub.add_commit(kind, repo, files)
        repos.files[repo] = files
    repos.files["alpaca records"] = {"records.json": json.dumps(alpaca_records).encode()}
    repos.hellaswag = hellaswag_jsonl().encode()
    url = hub.serve_file(HELLASWAG_PATH, repos.hellaswag)
    repos.hellaswag_base = url.rsplit("/", 1)[0]
    return repos
