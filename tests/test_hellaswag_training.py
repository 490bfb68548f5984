"""HellaSwag during training (data.hellaswag): both trainers log its accuracy with every evaluation, and the figure
at the last step is what scripts/evaluate.py's scoring gives on the checkpoint that step wrote; two torchrun ranks,
each scoring its share of the examples, log what one process does."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from gpt2_common.config import load_config
from gpt2_common.data import write_shard
from gpt2_common.errors import UserError
from gpt2_common.evaluation import hellaswag_accuracy, read_hellaswag
from gpt2_common.metrics import read_metrics
from gpt2_formats import read_canonical
from hub_repos import HELLASWAG, hellaswag_jsonl

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = HELLASWAG + [
    ("Two kids build a sandcastle. They", ["add a moat.", "eat the sand.", "fly a plane.", "file taxes."], 0),
    ("She opens the window. The", ["wind blows in.", "window eats lunch.", "room turns into a boat.",
                                   "curtains move in the breeze."], 3),
]


def write_config(tmp_path, **train) -> Path:
    """The tiny preset's model (GPT-2's vocabulary, which HellaSwag's text needs) on random tokens."""
    rng = np.random.default_rng(0)
    write_shard(tmp_path / "data" / "train.bin", rng.integers(0, 50257, 20_000))
    write_shard(tmp_path / "data" / "val.bin", rng.integers(0, 50257, 2_000))
    (tmp_path / "hellaswag.jsonl").write_text(hellaswag_jsonl(EXAMPLES))
    train = {"batch_size": 4, "micro_batch_size": 4, "max_steps": 2, "warmup_steps": 1, "eval_interval": 1,
             "eval_steps": 1, "save_interval": 0, "log_interval": 1, **train}
    path = tmp_path / "config.toml"
    path.write_text("\n".join([
        'name = "hellaswag"', "[model]", "n_layer = 2", "n_head = 4", "n_embd = 64", "block_size = 32", "[train]",
        *[f"{k} = {json.dumps(v)}" for k, v in train.items()], "[data]",
        f'train = "{tmp_path / "data" / "train.bin"}"', f'val = "{tmp_path / "data" / "val.bin"}"',
        f'hellaswag = "{tmp_path / "hellaswag.jsonl"}"']) + "\n")
    return path


def scores(run_dir) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "hellaswag_acc" in r]


def offline_scores(run_dir, framework: str, examples: int = len(EXAMPLES)) -> dict:
    """scripts/evaluate.py --hellaswag's computation, on the run's final checkpoint."""
    config, weights = read_canonical(run_dir)
    if framework == "jax":
        from gpt2_jax.evaluate import token_nll_fn
    else:
        from gpt2_torch.evaluate import token_nll_fn
    return hellaswag_accuracy(read_hellaswag(config.data.hellaswag)[:examples], config.model.block_size,
                              token_nll_fn(config, weights))


def test_jax_logs_hellaswag_with_every_evaluation(tmp_path):
    from gpt2_jax.train import train

    config = load_config(str(write_config(tmp_path, hellaswag_examples=4)))
    train(config, tmp_path / "run", sample_tokens=0, devices=jax.devices()[:2], log=lambda _: None)
    logged = scores(tmp_path / "run")
    assert [r["step"] for r in logged] == [1, 2] and all("val_loss" in r for r in logged)
    expected = offline_scores(tmp_path / "run", "jax", examples=4)
    assert (logged[-1]["hellaswag_acc"], logged[-1]["hellaswag_acc_norm"]) == pytest.approx(
        (expected["acc"], expected["acc_norm"]), abs=1e-9)


@pytest.mark.usefixtures("torch_one_thread")
def test_torch_ranks_split_hellaswag_and_log_what_one_process_does(tmp_path):
    from gpt2_torch.train import main

    config = write_config(tmp_path)
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(REPO / "scripts" / "train_torch.py"), "--config", str(config), "--run-dir", str(tmp_path / "ddp")],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "hellaswag acc_norm" in launched.stdout + launched.stderr
    main(["--config", str(config), "--run-dir", str(tmp_path / "one")])
    ddp, one = scores(tmp_path / "ddp"), scores(tmp_path / "one")
    assert [r["step"] for r in ddp] == [r["step"] for r in one] == [1, 2]
    for a, b in zip(ddp, one):
        assert (a["hellaswag_acc"], a["hellaswag_acc_norm"]) == pytest.approx(
            (b["hellaswag_acc"], b["hellaswag_acc_norm"]), abs=1e-9)
    expected = offline_scores(tmp_path / "one", "torch")
    assert (one[-1]["hellaswag_acc"], one[-1]["hellaswag_acc_norm"]) == pytest.approx(
        (expected["acc"], expected["acc_norm"]), abs=1e-9)


def test_hellaswag_with_a_small_vocabulary_is_a_user_error(tmp_path):
    from gpt2_common.evaluation import training_hellaswag

    config = load_config(str(write_config(tmp_path)), ["model.vocab_size=100"])
    with pytest.raises(UserError, match="model.vocab_size=100 cannot read"):
        training_hellaswag(config)
    missing = load_config(str(write_config(tmp_path)), [f"data.hellaswag={json.dumps(str(tmp_path / 'no.jsonl'))}"])
    with pytest.raises(UserError, match="does not exist"):
        training_hellaswag(missing)


@pytest.mark.slow
def test_two_jax_processes_log_the_hellaswag_of_one(tmp_path):
    """Under jax.distributed (two processes of 4 CPU devices, as tests/test_jax_train.py runs them), each process
    scores the examples on the model spread over both, and the figures logged are one process's (~70 s)."""
    import socket

    config = write_config(tmp_path, batch_size=8, micro_batch_size=8)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "train_jax.py"), "--config", str(config), "--run-dir",
         str(tmp_path / "two"), "--sample-tokens", "0", "--coordinator-address", f"localhost:{port}",
         "--num-processes", "2", "--process-id", str(i)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    assert all(proc.returncode == 0 for proc in procs), "\n".join(outputs)[-4000:]
    assert "hellaswag acc_norm" in outputs[0] and "hellaswag" not in outputs[1]  # the first process logs
    from gpt2_jax.train import train

    train(load_config(str(config)), tmp_path / "one", sample_tokens=0, log=lambda _: None)
    two, one = scores(tmp_path / "two"), scores(tmp_path / "one")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2]
    for a, b in zip(two, one):
        assert (a["hellaswag_acc"], a["hellaswag_acc_norm"]) == pytest.approx(
            (b["hellaswag_acc"], b["hellaswag_acc_norm"]), abs=1e-9)
    expected = offline_scores(tmp_path / "two", "jax")
    assert (two[-1]["hellaswag_acc"], two[-1]["hellaswag_acc_norm"]) == pytest.approx(
        (expected["acc"], expected["acc_norm"]), abs=1e-9)
