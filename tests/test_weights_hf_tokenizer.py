"""convert.py --to hf writes GPT-2's tokenizer beside the weights: AutoTokenizer and pipeline("text-generation")
load the directory offline and tokenize exactly as gpt2_common.tokenizer does. (Before, AutoTokenizer quietly
returned an empty tokenizer: encode('ROMEO:') == [].)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from gpt2_common import weights as cw
from gpt2_common.config import ModelConfig

ROOT = Path(__file__).resolve().parent.parent
GPT2_VOCAB = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=50257)
TEXT = "ROMEO:\nBut, soft! what light through yonder window breaks?  It is the east, and Juliet is the sun.\n"

PROBE = """
import json, sys
import transformers
from gpt2_common.tokenizer import get_tokenizer
directory, text = sys.argv[1], sys.argv[2]
tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
generator = transformers.pipeline("text-generation", model=directory)
out = generator("ROMEO:", max_new_tokens=4, do_sample=False)
print(json.dumps({"hf": tokenizer.encode(text), "ours": get_tokenizer().encode_ordinary(text),
                  "eos": tokenizer.eos_token_id, "vocab": len(tokenizer), "text": out[0]["generated_text"]}))
"""


def random_weights(model: ModelConfig) -> cw.Weights:
    rng = np.random.default_rng(0)
    return {k: (0.02 * rng.standard_normal(s)).astype(np.float32) for k, s in cw.canonical_shapes(model).items()}


def test_autotokenizer_and_pipeline_load_the_export_offline(tmp_path):
    cw.save_hf(random_weights(GPT2_VOCAB), GPT2_VOCAB, tmp_path / "hf")
    files = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert files == ["config.json", "generation_config.json", "merges.txt", "model.safetensors",
                     "tokenizer_config.json", "vocab.json"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "hf"), TEXT], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["hf"] == result["ours"] and len(result["ours"]) > 20
    assert result["eos"] == 50256 and result["vocab"] == 50257
    assert result["text"].startswith("ROMEO:") and len(result["text"]) > len("ROMEO:")


def test_a_toy_vocabulary_gets_no_gpt2_tokenizer(tmp_path):
    model = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=100)
    cw.save_hf(random_weights(model), model, tmp_path / "hf")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
