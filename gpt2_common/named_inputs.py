"""What a training run names rather than points at: --init-from hf:..., Alpaca's data.train / data.val hf:...,
data.hellaswag = "val". In a multi-process job the first process fetches them into the cache while the others wait
(both trainers call `fetch_named_inputs` there), so one process downloads and the others then find the files."""

from __future__ import annotations

from gpt2_common import hub
from gpt2_common.config import Config


def fetch_named_inputs(config: Config, init_from: str | None) -> None:
    if hub.is_name(init_from):
        hub.weights_folder(init_from)
    if config.data.format == "alpaca":
        from gpt2_common.hub_datasets import record_files

        for source in (config.data.train, config.data.val):
            if hub.is_name(source):
                record_files(source)
    if config.data.hellaswag:
        from gpt2_common.hellaswag_file import hellaswag_path

        hellaswag_path(config.data.hellaswag)
