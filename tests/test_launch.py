"""The trainers answer bad input before they import JAX or PyTorch (gpt2_formats/launch.py): in one process that
never loads a framework, each case below ends with the trainer's own line, and --help prints the flags. What is
timed is left to scripts/bench_errors.py; this checks that no framework was needed for the answer."""

import fcntl
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpt2_common.config import dumps_toml, load_config
from gpt2_common.data import write_shard
from gpt2_common.manifest import files_under, write_manifest
from gpt2_formats import launch
from gpt2_jax import layout as jax_layout
from gpt2_torch import layout as torch_layout

REPO = Path(__file__).resolve().parent.parent
TINY = ["train.max_steps=4", "train.warmup_steps=1"]


def jax_step_folder(run_dir: Path, step: int, config) -> None:
    """A JAX step folder as far as files can tell (orbax's meta record and the manifest over it): what the launch
    reads without JAX."""
    folder = run_dir / "checkpoints" / str(step)
    (folder / "state").mkdir(parents=True)
    (folder / "meta").mkdir()
    (folder / "meta" / "metadata").write_text(json.dumps({"step": step, "config_toml": dumps_toml(config)}))
    write_manifest(folder / jax_layout.MANIFEST_NAME, files_under(folder))


def torch_checkpoint(run_dir: Path, step: int, config) -> Path:
    import torch

    path = torch_layout.checkpoint_path(run_dir / "checkpoints", step)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": torch_layout.FORMAT, "step": step, "config": dumps_toml(config),
                "model": {"wte": torch.zeros(3, 2)}}, path)
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    tiny = load_config("tiny", TINY)
    jax_step_folder(root / "jax_run", 4, tiny)
    torch_checkpoint(root / "torch_run", 4, tiny)
    write_shard(root / "gpt2_ids" / "train.bin", np.array([1, 2, 50256] * 400))  # GPT-2's ids, 50256 among them
    return root


def answers(root: Path, cases: list[tuple[str, list[str], dict]]) -> dict:
    """Runs each (framework, argv, environment) through the trainers' command line in one fresh process; returns
    each case's line (or "exit N") and the frameworks that process had imported by the end."""
    program = f"""
import json, os, sys
sys.path.insert(0, {str(REPO)!r})
from gpt2_common.errors import UserError
from gpt2_formats.launch import train_main
out = []
for framework, argv, env in json.loads(sys.argv[1]):
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        train_main(framework, argv)
        out.append("returned")
    except UserError as err:
        out.append(str(err))
    except SystemExit as err:
        out.append(f"exit {{err.code}}")
    finally:
        os.environ.clear(); os.environ.update(saved)
loaded = [m for m in ("jax", "torch", "flax", "optax", "orbax") if m in sys.modules]
print(json.dumps({{"answers": out, "loaded": loaded}}))
"""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(root), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", program, json.dumps(cases)], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_bad_input_is_answered_before_a_framework_loads(root):
    tiny = ["--config", "tiny", "--set", *TINY]
    cases = [
        ("jax", ["--help"], {}),
        ("torch", ["--help"], {}),
        ("jax", ["--config", "tiny", "--set", "train.lrr=1"], {}),
        ("jax", [*tiny, "--run-dir", "torch_run"], {}),
        ("jax", [*tiny, "model.n_layer=3", "--run-dir", "jax_run"], {}),
        ("jax", [*tiny, "train.lr=0.5", "--run-dir", "jax_run"], {}),
        ("torch", [*tiny, "train.lr=0.5", "--run-dir", "torch_run"], {}),
        ("jax", [*tiny, "--run-dir", "jax_run", "--resume-from", "jax_run/checkpoints/9"], {}),
        ("torch", [*tiny, "model.n_embd=128", "--run-dir", "new_torch", "--init-from", "jax_run"], {}),
        ("jax", [*tiny, "model.n_embd=128", "--run-dir", "new_jax", "--init-from",
                 "torch_run/checkpoints/step_00000004.pt"], {}),
        ("jax", [*tiny, "train.micro_batch_size=4", "--run-dir", "new_jax"],
         {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}),
        ("torch", [*tiny, "--run-dir", "new_torch"], {"WORLD_SIZE": "3"}),
        ("jax", [*tiny, "model.vocab_size=1000", "data.train=gpt2_ids/train.bin",
                 "data.val=gpt2_ids/train.bin", "--run-dir", "new_jax"], {}),
    ]
    got = answers(root, cases)
    assert got["loaded"] == [], f"a framework was imported to answer: {got['loaded']}"
    expected = [
        "exit 0", "exit 0",
        "unknown config key 'train.lrr'; did you mean 'train.lr'?",
        "holds PyTorch checkpoints (step_00000004.pt), which this trainer cannot resume",
        "holds checkpoints of another model (model.n_layer: 2 -> 3)",
        "holds checkpoints of another config (train.lr: 0.001 -> 0.5)",
        "holds checkpoints of another config (train.lr: 0.001 -> 0.5)",
        "--resume-from 'jax_run/checkpoints/9' is not a checkpoint of this run",
        "--init-from 'jax_run' is a different GPT-2 than the config: set model.n_embd=64",
        "--init-from 'torch_run/checkpoints/step_00000004.pt' is a different GPT-2 than the config: set "
        "model.n_embd=64",
        "train.micro_batch_size=4 does not divide over 8 data-parallel devices",
        "train.micro_batch_size=8 does not divide over 3 processes",
        "holds token id 50256, outside model.vocab_size=1000",
    ]
    for (framework, argv, _), answer, fragment in zip(cases, got["answers"], expected):
        assert fragment in answer.replace(f"{root}/", ""), f"{framework} {argv}: {answer}"


def test_a_run_directory_held_by_another_run_is_refused_before_a_framework_loads(root):
    (root / "held").mkdir()
    with open(root / "held" / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        got = answers(root, [("torch", ["--config", "tiny", "--set", *TINY, "--run-dir", "held"], {})])
    assert got["loaded"] == []
    assert "run directory" in got["answers"][0] and "is in use by process" in got["answers"][0], got


def test_what_the_launch_lets_through_is_what_the_trainer_resumes(root):
    """The checks refuse nothing that the trainer accepts: the run's own config resumes, --allow-config-change lets a
    changed one through (the trainer warns), a new run directory and matching --init-from start."""
    def check(framework, run_dir, *overrides, init_from=None, allow=False):
        args = launch.build_parser(framework).parse_args(
            ["--config", "tiny", "--set", *TINY, *overrides, "--run-dir", str(root / run_dir)]
            + (["--init-from", str(root / init_from)] if init_from else []) + (["--allow-config-change"] if allow else []))
        config = load_config("tiny", [*TINY, *overrides])
        launch.check_training(config, root / run_dir, framework, args)

    check("jax", "jax_run")
    check("torch", "torch_run", "train.max_steps=8")  # a run-control key: the same config
    check("jax", "jax_run", "train.lr=0.5", allow=True)
    check("torch", "fresh", init_from="jax_run")
    check("jax", "fresh", init_from="torch_run")


def test_the_cpu_device_count_is_known_only_where_no_accelerator_can_be(monkeypatch):
    monkeypatch.setattr(launch, "_accelerator_plugin_installed", lambda: False)
    monkeypatch.delenv("JAX_NUM_CPU_DEVICES", raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_foo=1 --xla_force_host_platform_device_count=4")
    assert launch._jax_cpu_device_count() == 4
    monkeypatch.setenv("XLA_FLAGS", "")
    assert launch._jax_cpu_device_count() == 1
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    assert launch._jax_cpu_device_count() is None  # a GPU's devices are JAX's to count
    monkeypatch.delenv("JAX_PLATFORMS")
    monkeypatch.setattr(launch, "_accelerator_plugin_installed", lambda: True)
    assert launch._jax_cpu_device_count() is None
