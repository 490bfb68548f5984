"""Instruction fine-tuning data: Alpaca-style records (`instruction`, optional `input`, `output`) turned into rows
whose targets are -1 on the prompt, so that the loss (which ignores -1) learns only the response.

Rows are either packed (examples back to back in windows of block_size+1 tokens, the most tokens per step) or padded
(one example a row, padded with <|endoftext|> whose targets are -1). The loader follows the same EpochOrder as the
token-shard loader, so resume and multi-process slicing work the same way.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from gpt2_common.data import IGNORE_INDEX, EpochOrder
from gpt2_common import hub
from gpt2_common.errors import UserError
from gpt2_common.hub_datasets import record_files
from gpt2_common.tokenizer import EOT_TOKEN, get_tokenizer

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def format_prompt(instruction: str, input: str = "") -> str:
    """Alpaca's template: what the model sees before it answers (also what to sample from after fine-tuning)."""
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def read_records(path: str | Path) -> list[dict]:
    """Records from a JSON array (Alpaca's release), JSONL or Parquet (the Hub's form), each checked; errors name
    the line (the row of a Parquet file). A Hub dataset's name (hf:tatsu-lab/alpaca) reads its train split."""
    if hub.is_name(str(path)):
        return [record for file in record_files(str(path)) for record in read_records(file)]
    path = Path(path)
    if not path.is_file():
        raise UserError(f"instruction data '{path}' does not exist")
    if path.suffix == ".parquet":
        return _checked(path, _parquet_records(path))
    text = path.read_text(encoding="utf-8")
    records: list[tuple[int, object]] = []
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
        # A record's line is where its object starts in the file, so that the user can find it.
        decoder, lines, index = json.JSONDecoder(), [], text.index("[") + 1
        for _ in items:
            while text[index] in " \t\r\n,":
                index += 1
            lines.append(text.count("\n", 0, index) + 1)
            index = decoder.raw_decode(text, index)[1]
        records = list(zip(lines, items))
    else:
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{number}: not valid JSON ({err.msg})") from None
    return _checked(path, records)


def _parquet_records(path: Path) -> list[tuple[int, object]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:
        raise UserError(f"'{path}' is not a readable Parquet file ({err})") from None
    # a record without input has "" in Alpaca's Parquet, null in some copies of it
    return [(row, {**record, "input": record.get("input") or ""} if isinstance(record, dict) else record)
            for row, record in enumerate(table.to_pylist(), 1)]


def _checked(path: Path, records: list[tuple[int, object]]) -> list[dict]:
    checked = []
    for number, record in records:
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number}: a record must be a JSON object with 'instruction' and 'output'")
        for key in ("instruction", "output"):
            if not isinstance(record.get(key), str):
                raise UserError(f"{path}:{number}: the record has no string '{key}'")
        if not isinstance(record.get("input", ""), str):
            raise UserError(f"{path}:{number}: 'input' must be a string")
        checked.append(record)
    if not checked:
        raise UserError(f"'{path}' holds no records")
    return checked


def encode_example(record: dict) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, learn): the prompt, the response and <|endoftext|>; learn is True where the token is to be learned
    (the response and the closing <|endoftext|>, so the model learns to stop)."""
    enc = get_tokenizer()
    prompt = enc.encode_ordinary(format_prompt(record["instruction"], record.get("input", "")))
    response = enc.encode_ordinary(record["output"]) + [EOT_TOKEN]
    tokens = np.array(prompt + response, dtype=np.int32)
    learn = np.concatenate([np.zeros(len(prompt), bool), np.ones(len(response), bool)])
    return tokens, learn


def build_rows(records: list[dict], seq_len: int, pack: bool) -> tuple[np.ndarray, np.ndarray]:
    """Rows of inputs and targets, [N, seq_len] each; targets are -1 where nothing is to be learned."""
    examples = [encode_example(r) for r in records]
    too_long = sum(len(t) > seq_len + 1 for t, _ in examples)
    if too_long:
        print(f"warning: {too_long} of {len(examples)} examples are longer than model.block_size+1 and are cut",
              file=sys.stderr)
    if pack:
        tokens = np.concatenate([t for t, _ in examples])
        learn = np.concatenate([m for _, m in examples])
        n = (len(tokens) - 1) // seq_len
        index = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
        window, window_learn = tokens[index], learn[index]
    else:
        n = len(examples)
        window = np.full((n, seq_len + 1), EOT_TOKEN, dtype=np.int32)
        window_learn = np.zeros((n, seq_len + 1), dtype=bool)
        for row, (t, m) in enumerate(examples):
            window[row, :len(t[:seq_len + 1])] = t[:seq_len + 1]
            window_learn[row, :len(m[:seq_len + 1])] = m[:seq_len + 1]
    inputs = window[:, :-1]
    targets = np.where(window_learn[:, 1:], window[:, 1:], IGNORE_INDEX).astype(np.int32)
    return inputs, targets


class InstructLoader:
    """The token loader's interface (`batch(position)`, `batches_per_epoch`) over instruction rows."""

    def __init__(self, records: list[dict], global_batch_size: int, seq_len: int, *, pack: bool = True,
                 process_index: int = 0, process_count: int = 1, seed: int = 0, shuffle: bool = True):
        self.inputs, self.targets = build_rows(records, seq_len, pack)
        self.order = EpochOrder(len(self.inputs), global_batch_size, process_index, process_count, seed, shuffle)
        self.batches_per_epoch = self.order.batches_per_epoch
        if self.batches_per_epoch == 0:
            raise UserError(
                f"{len(records)} instruction records make {len(self.inputs)} rows, fewer than one batch of "
                f"{global_batch_size}; add records or lower train.micro_batch_size"
            )

    def batch(self, position: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self.order.row_ids(position)
        return self.inputs[rows], self.targets[rows]

    def epoch_of(self, position: int) -> int:
        return self.order.epoch_of(position)
