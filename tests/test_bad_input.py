"""Bad input, through both trainers' command lines: each case ends with one line "error: ..." that says what to do,
exit status 2, and nothing lost (no run directory written over). The table here is the README's."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from gpt2_common.cli import train_parser
from gpt2_common.config import load_config
from gpt2_common.data import shard_header, write_shard
from gpt2_common.errors import UserError, run_cli
from gpt2_common.limits import MAX_NEW_TOKENS
from gpt2_common.metrics import RunLog, read_metrics
from gpt2_jax import checkpoint
from gpt2_jax.sharding import make_mesh
from gpt2_jax.step import build_trainer
from gpt2_jax.train import main as jax_main
from gpt2_torch.distributed import Distributed
from gpt2_torch.train import TorchBackend
from gpt2_torch.train import main as torch_main

REPO = Path(__file__).resolve().parent.parent
CONFIG = """name = "bad"
[model]
n_layer = 2
n_head = 2
n_embd = {n_embd}
block_size = 16
vocab_size = 100
[train]
batch_size = 8
micro_batch_size = 8
max_steps = 1
warmup_steps = 0
eval_interval = 0
eval_steps = 1
save_interval = 1
log_interval = 1
precision = "fp32"
[data]
train = "{root}/data/train.bin"
val = "{root}/data/val.bin"
"""


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Configs, data good and bad, a finished run of each trainer (plus a wider torch model)."""
    root = tmp_path_factory.mktemp("bad_input")
    rng = np.random.default_rng(0)
    write_shard(root / "data" / "train.bin", rng.integers(0, 100, 3000))
    write_shard(root / "data" / "val.bin", rng.integers(0, 100, 1000))
    write_shard(root / "empty" / "train.bin", np.zeros(0, np.int64))
    (root / "truncated").mkdir()
    (root / "truncated" / "train.bin").write_bytes(b"\0" * 100)
    write_shard(root / "bigvocab" / "train.bin", rng.integers(0, 50257, 3000))
    (root / "llmc").mkdir()  # llm.c's shards record no token ids in their header: checked as batches are read
    (root / "llmc" / "train.bin").write_bytes(shard_header(3000).tobytes() + rng.integers(0, 50257, 3000,
                                                                                          np.uint16).tobytes())
    (root / "none.jsonl").write_text("")
    (root / "c.toml").write_text(CONFIG.format(n_embd=32, root=root))
    (root / "wide.toml").write_text(CONFIG.format(n_embd=64, root=root))
    (root / "typo.toml").write_text(CONFIG.format(n_embd=32, root=root).replace("max_steps", "max_stepz"))
    torch_main(["--config", str(root / "c.toml"), "--run-dir", str(root / "torch_run")])
    torch_main(["--config", str(root / "wide.toml"), "--run-dir", str(root / "torch_wide")])
    jax_checkpoint(root / "c.toml", root / "jax_run")
    return root


def jax_checkpoint(config_path: Path, run_dir: Path) -> None:
    """A JAX run directory as the trainer leaves it after step 1, written by its own checkpoint code, without the
    half minute that compiling a training step takes on a busy two-core machine: only the refusals that come
    before any restore are tested with it."""
    config = load_config(str(config_path))
    trainer = build_trainer(config, make_mesh(config.mesh, jax.devices()[:1]))
    state = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), trainer.abstract_state).replace(step=np.int32(1))
    manager = checkpoint.checkpoint_manager(run_dir / "checkpoints", 3, async_save=False)
    checkpoint.save(manager, state, config, loader_position=1)
    manager.close()


MAINS = {"torch": torch_main, "jax": jax_main}
# case | arguments after --config c.toml (R = the fixture's folder; {T} = this trainer's name) | start of the message
CASES = [
    ("unknown config key", "--set train.lrr=1e-3", "unknown config key 'train.lrr'; did you mean 'train.lr'?"),
    ("mistyped value", "--set train.max_steps=ten", "config key 'train.max_steps' must be an integer, got 'ten'"),
    ("unknown key in the config file", "--config R/typo.toml",
     "unknown config key 'train.max_stepz'; did you mean 'train.max_steps'?"),
    ("a choice that does not exist", "--set train.nan_policy=ignore",
     "config key 'train.nan_policy' is 'ignore'; choose one of stop, skip"),
    ("missing data", "--set data.train=R/missing/*.bin", "no train shards match 'R/missing/*.bin'"),
    ("empty data", "--set data.train=R/empty/train.bin",
     "the shards R/empty/train.bin hold 0 tokens, fewer than one batch of 8 x 17"),
    ("truncated shard", "--set data.train=R/truncated/train.bin", "shard 'R/truncated/train.bin' is truncated"),
    ("shards of another vocabulary", "--set data.train=R/bigvocab/train.bin",
     "shard 'R/bigvocab/train.bin' holds token id"),
    ("another vocabulary, met in the first batch", "--set data.train=R/llmc/train.bin",
     "shard 'R/llmc/train.bin' holds token id"),
    ("empty fine-tuning data", "--set data.format=alpaca data.train=R/none.jsonl", "'R/none.jsonl' holds no records"),
    ("--init-from that does not exist", "--init-from R/nowhere", "--init-from 'R/nowhere' does not exist"),
    ("--init-from of another shape", "--init-from R/torch_wide",
     "--init-from 'R/torch_wide' is a different GPT-2 than the config: set model.n_embd=64"),
    ("--init-from that holds no weights", "--init-from R/data", "'R/data' is not a weights source this reads"),
    ("a PyTorch run directory given to the JAX trainer", "jax:--run-dir R/torch_run",
     "'R/torch_run/checkpoints' holds PyTorch checkpoints (step_00000001.pt), which this trainer cannot resume"),
    ("a JAX run directory given to the PyTorch trainer", "torch:--run-dir R/jax_run",
     "'R/jax_run/checkpoints' holds JAX checkpoints (1), which this trainer cannot resume"),
    ("a run directory of another config", "--run-dir R/{T}_run --set train.lr=0.002",
     "run directory 'R/{T}_run' holds checkpoints of another config (train.lr: 0.0006 -> 0.002); pass "
     "--allow-config-change"),
    ("a run directory of another model", "--run-dir R/{T}_run --set model.n_layer=3 --allow-config-change",
     "run directory 'R/{T}_run' holds checkpoints of another model (model.n_layer: 2 -> 3)"),
    ("a batch that does not divide over the devices", "jax:--set train.micro_batch_size=4 train.batch_size=8",
     "train.micro_batch_size=4 does not divide over 8 data-parallel devices"),
    ("TensorBoard asked for, not installed", "--set logging.tensorboard=true",
     "logging.tensorboard=true needs tensorboardX: pip install '.[tensorboard]' (or pip install tensorboardX), "
     "or set logging.tensorboard=false"),
    ("W&B asked for, not installed", "--set logging.wandb=true", "logging.wandb=true needs Weights & Biases: pip install wandb"),
    ("--sample-tokens past its bound (hours of sampling after the last checkpoint)", "--sample-tokens 1000000000",
     "--sample-tokens 1000000000 is out of range; it must be in [0, 1000000] (0: no sample)"),
    ("--sample-tokens below 0", "--sample-tokens -1", "--sample-tokens -1 is out of range; it must be in [0, 1000000]"),
    ("--sample-tokens not a count", "--sample-tokens 1e9", "--sample-tokens must be a whole number of tokens, got '1e9'"),
]
PARAMS = [pytest.param(trainer, case, args, message, id=f"{trainer}: {case}")
          for case, args, message in CASES for trainer in ("torch", "jax")
          if not (":" in args.split()[0] and not args.startswith(f"{trainer}:"))]


@pytest.mark.parametrize("trainer, case, args, message", PARAMS)
def test_bad_input_is_one_line_and_exit_2(root, tmp_path, capsys, monkeypatch, trainer, case, args, message):
    if case.startswith(("TensorBoard", "W&B")):  # whatever this machine has installed: as if it had neither
        for name in ("tensorboardX", "wandb"):
            monkeypatch.setitem(sys.modules, name, None)
    args, message = (text.replace("R/", f"{root}/").replace("{T}", trainer) for text in (args, message))
    args = args.split(":", 1)[1] if args.startswith(f"{trainer}:") else args
    argv = ["--config", str(root / "c.toml"), "--run-dir", str(tmp_path / "run"), *args.split()]
    before = {p: p.stat().st_mtime_ns for p in root.glob("*_run*/**/*") if p.is_file()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: MAINS[trainer](argv))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert before == {p: p.stat().st_mtime_ns for p in root.glob("*_run*/**/*") if p.is_file()}  # nothing touched
    assert not (tmp_path / "run").exists()  # nor made


def test_sample_tokens_takes_every_count_up_to_its_bound():
    parser = train_parser("the trainers' flags")
    assert [parser.parse_args(["--sample-tokens", n]).sample_tokens for n in ("0", "200", str(MAX_NEW_TOKENS))] == [
        0, 200, MAX_NEW_TOKENS]
    assert parser.parse_args([]).sample_tokens == 200


def test_the_scripts_print_only_the_line(root):
    """Through the real scripts: nothing but the one line on stderr (no warnings, no traceback)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "train_jax.py"), "--config", str(root / "c.toml"),
                           "--run-dir", str(root / "torch_run")], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"error: '{root}/torch_run/checkpoints' holds PyTorch checkpoints")


def test_a_batch_that_does_not_divide_over_torchrun_processes(root, tmp_path):
    config = load_config(str(root / "c.toml"))
    with pytest.raises(UserError, match="micro_batch_size=8 does not divide over 3 processes"):
        TorchBackend(config, tmp_path / "run", Distributed(0, 3, torch.device("cpu")))


def test_allow_config_change_resumes_with_a_warning(root, tmp_path, capsys):
    run_dir = tmp_path / "run"
    torch_main(["--config", str(root / "c.toml"), "--run-dir", str(run_dir)])
    config_text = (run_dir / "config.toml").read_text()
    # run-control keys need no flag: more steps, another log interval
    torch_main(["--config", str(root / "c.toml"), "--run-dir", str(run_dir), "--set", "train.max_steps=2",
                "train.log_interval=2"])
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [1, 2]
    with pytest.raises(UserError, match="--allow-config-change"):
        torch_main(["--config", str(root / "c.toml"), "--run-dir", str(run_dir), "--set", "train.max_steps=3",
                    "train.weight_decay=0.0"])
    assert "max_steps = 2" in (run_dir / "config.toml").read_text() != config_text  # a refusal rewrites nothing
    capsys.readouterr()
    torch_main(["--config", str(root / "c.toml"), "--run-dir", str(run_dir), "--set", "train.max_steps=3",
                "train.weight_decay=0.0", "--allow-config-change"])
    assert "warning: resuming" in capsys.readouterr().err and "train.weight_decay: 0.1 -> 0.0"
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [1, 2, 3]


def test_run_log_fans_out_to_tensorboard_and_wandb(tmp_path, monkeypatch):
    """With the packages present (stand-ins here), every record reaches both, W&B offline unless WANDB_MODE says."""
    events = []

    class Writer:
        def __init__(self, log_dir, purge_step):
            events.append(("tensorboard", log_dir, purge_step))

        def add_scalar(self, tag, value, step):
            events.append((tag, value, step))

        def close(self):
            events.append("tb closed")

    class Run:
        def log(self, values, step):
            events.append(("wandb", values, step))

        def finish(self):
            events.append("wandb finished")

    def init(**kwargs):
        events.append(("wandb.init", kwargs["mode"], kwargs["resume"], kwargs["id"]))
        return Run()

    monkeypatch.setitem(sys.modules, "tensorboardX", types.SimpleNamespace(SummaryWriter=Writer))
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    (tmp_path / "metrics.jsonl").write_text('{"step": 3, "loss": 1.0}\n{"step": 5, "loss": 0.5}\n{"step": 6, "lo')
    config = load_config("tiny", ["logging.tensorboard=true", "logging.wandb=true"])
    log = RunLog(tmp_path, config.logging, resume_step=4, config_dict={}, run_name="tiny")
    log.write({"step": 5, "loss": 0.25, "mfu": None})
    log.write({"step": 5, "val_loss": 0.5})
    log.close()
    run_id = (tmp_path / "wandb_id.txt").read_text()
    assert events == [("tensorboard", str(tmp_path / "tensorboard"), 5), ("wandb.init", "offline", "allow", run_id),
                      ("train/loss", 0.25, 5), ("wandb", {"train/loss": 0.25}, 5),
                      ("val/loss", 0.5, 5), ("wandb", {"val/loss": 0.5}, 5), "tb closed", "wandb finished"]
    # the lines after the resumed step (and the torn one) are gone; the new ones follow
    assert read_metrics(tmp_path) == [{"step": 3, "loss": 1.0}, {"step": 5, "loss": 0.25, "mfu": None},
                                      {"step": 5, "val_loss": 0.5}]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0]) == {"step": 3, "loss": 1.0}
