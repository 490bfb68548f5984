"""The trainer end to end, through the script's entry point: metrics, checkpoints, exact resume, two processes, the
end-of-training sample, one-line errors; and a tiny model memorising one batch."""

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

from gpt2_formats import init_weights
from gpt2_jax import weights as jw
from gpt2_common.config import load_config
from gpt2_common.data import TokenLoader, write_shard
from gpt2_common.errors import UserError, run_cli
from gpt2_common.metrics import read_metrics
from gpt2_common.schedule import lr_at
from gpt2_jax import distributed
from gpt2_jax.checkpoint import load_checkpoint_params
from gpt2_jax.model import build_model, cross_entropy
from gpt2_jax.train import main
from test_jax_optim import trained

def jax_init_weights(path, model):
    """--init-from as the JAX trainer reads it: any form, through gpt2_formats, as params."""
    return jw.from_canonical(init_weights(path, model), model)


REPO = Path(__file__).resolve().parent.parent
TWO_PROCESS_TIMEOUT = int(os.environ.get("TWO_PROCESS_TIMEOUT", 600))
CONFIG = """
name = "jax-train-test"
[model]
n_layer = 2
n_head = 4
n_embd = 64
block_size = 32
vocab_size = 128
[train]
batch_size = 16
micro_batch_size = 8
max_steps = 6
lr = 1e-3
min_lr = 1e-4
warmup_steps = 2
eval_interval = 3
eval_steps = 2
save_interval = 3
log_interval = 1
precision = "fp32"
[data]
train = "{data}/train_*.bin"
val = "{data}/val_*.bin"
"""


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("jax_train")
    rng = np.random.default_rng(0)
    write_shard(root / "data" / "train_000.bin", rng.integers(0, 128, 20_000))
    write_shard(root / "data" / "val_000.bin", rng.integers(0, 128, 3_000))
    path = root / "config.toml"
    path.write_text(CONFIG.format(data=root / "data"))
    return path


def run_main(*argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main([str(a) for a in argv])
    return out.getvalue()


@pytest.fixture(scope="module")
def reference(config_path):
    """One uninterrupted run of 6 steps on the 8 devices of this process."""
    run_dir = config_path.parent / "reference"
    stdout = run_main("--config", config_path, "--run-dir", run_dir, "--sample-tokens", 8)
    return run_dir, read_metrics(run_dir), stdout


def train_lines(metrics):
    return [m for m in metrics if "loss" in m]


def test_metrics_evaluation_checkpoints_and_sample(reference, config_path):
    run_dir, metrics, stdout = reference
    train = train_lines(metrics)
    assert [m["step"] for m in train] == [1, 2, 3, 4, 5, 6]
    assert set(train[0]) == {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "step_time_s"}
    config = load_config(str(config_path))
    assert [m["lr"] for m in train] == pytest.approx([lr_at(i, config.train) for i in range(6)])
    assert all(m["mfu"] is None and m["tokens_per_s"] > 0 and m["grad_norm"] > 0 for m in train)
    assert [(m["step"], round(m["val_loss"], 1)) for m in metrics if "val_loss" in m] == [(3, 4.9), (6, 4.9)]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "6"]
    assert (run_dir / "config.toml").is_file()
    assert "sample:" in stdout and "step      6/6" in stdout


def test_stopped_run_resumes_exactly(reference, config_path):
    run_dir = config_path.parent / "interrupted"
    run_main("--config", config_path, "--run-dir", run_dir, "--stop-at", 3, "--sample-tokens", 0)
    assert [m["step"] for m in train_lines(read_metrics(run_dir))] == [1, 2, 3]
    stdout = run_main("--config", config_path, "--run-dir", run_dir, "--sample-tokens", 0)
    assert "resumed from step 3" in stdout
    resumed, expected = read_metrics(run_dir), reference[1]
    assert [m["step"] for m in train_lines(resumed)] == [1, 2, 3, 4, 5, 6]
    for got, want in zip(resumed, expected):
        assert got.keys() == want.keys()
        for key in ("loss", "grad_norm", "val_loss", "lr"):
            if key in want:
                assert got[key] == pytest.approx(want[key], rel=1e-6), (got, want)


def test_checkpoint_params_and_config_load_for_other_tools(reference, config_path):
    run_dir, metrics, _ = reference
    config, params = load_checkpoint_params(run_dir)
    assert config == load_config(str(config_path))
    assert config.model.n_layer == 2 and isinstance(params["wte"]["embedding"], np.ndarray)
    # The final validation loss again, from the loaded params: they are the trained ones.
    model = build_model(config.model, "fp32", backend="cpu")
    val = TokenLoader([config_path.parent / "data" / "val_000.bin"], 8, 32, shuffle=False)

    @jax.jit
    def loss(params, inputs, targets):
        return cross_entropy(model.apply({"params": params}, inputs), targets, config.model.vocab_size)

    val_loss = np.mean([loss(params, *val.batch(i)) for i in range(2)])
    assert val_loss == pytest.approx(metrics[-1]["val_loss"], rel=1e-5)
    fresh = jax_init_weights(run_dir / "checkpoints" / "3", config.model)  # the --init-from hook, from a step folder
    assert fresh["h_1"]["mlp"]["c_fc"]["kernel"].shape == (64, 256)
    assert not np.array_equal(fresh["h_1"]["mlp"]["c_fc"]["kernel"], params["h_1"]["mlp"]["c_fc"]["kernel"])


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_two_processes(config_path, run_dir) -> tuple[list, list[str] | None, str]:
    """Launches the two processes of the job; (processes, their outputs or None if they hung, their stacks if so)."""
    port = free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONFAULTHANDLER": "1"}  # so that SIGABRT prints every thread's stack
    procs = [
        subprocess.Popen(
            [sys.executable, str(REPO / "scripts" / "train_jax.py"), "--config", str(config_path), "--run-dir",
             str(run_dir), "--stop-at", "3", "--sample-tokens", "0", "--coordinator-address", f"localhost:{port}",
             "--num-processes", "2", "--process-id", str(i)],
            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    try:
        return procs, [proc.communicate(timeout=TWO_PROCESS_TIMEOUT)[0] for proc in procs], ""
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.send_signal(signal.SIGABRT)
        return procs, None, "\n---\n".join(proc.communicate()[0][-8000:] for proc in procs)
    finally:
        for proc in procs:
            proc.kill()


def test_two_processes_train_like_one(reference, config_path):
    """Two OS processes of 4 CPU devices each, joined over gloo, give the losses of one process with 8.

    The job normally takes ~20 s. Rarely (2 of ~50 runs in one session, never outside pytest) it hung and was not
    diagnosed: a hang is retried once with a fresh port and run directory, its stacks kept in a warning, and a
    second hang fails with them."""
    run_dir = config_path.parent / "two_processes"
    procs, outputs, stacks = run_two_processes(config_path, run_dir)
    if outputs is None:
        warnings.warn(f"the two-process job hung once and is retried; its output and stacks:\n{stacks}")
        run_dir = config_path.parent / "two_processes_retry"
        procs, outputs, stacks = run_two_processes(config_path, run_dir)
        if outputs is None:
            pytest.fail(f"the two processes hung twice; their output and stacks:\n{stacks}")
    assert all(p.returncode == 0 for p in procs), "\n".join(outputs)[-4000:]
    assert "8 cpu devices" in outputs[0] and "step      3" in outputs[0] and "step" not in outputs[1]
    got, want = read_metrics(run_dir), reference[1][:len(read_metrics(run_dir))]
    assert [m["step"] for m in train_lines(got)] == [1, 2, 3]
    for a, b in zip(got, want):
        for key in ("loss", "grad_norm", "val_loss"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5), (a, b)
    assert (run_dir / "checkpoints" / "3").is_dir()


@pytest.mark.parametrize("override, message", [
    ("train.micro_batch_size=4", "error: train.micro_batch_size=4 does not divide over 8 data-parallel devices"),
    ("mesh.data=3", "error: mesh data=3 x fsdp=1 x tensor=1 needs 3 devices but this job has 8"),
])
def test_bad_layout_is_a_one_line_error(config_path, tmp_path, capsys, override, message):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(["--config", str(config_path), "--run-dir", str(tmp_path), "--set", override]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


def test_multi_process_launch_settings():
    assert distributed.initialize(env={}) is False  # a plain run joins nothing
    with pytest.raises(UserError, match="needs --num-processes, --process-id too"):
        distributed.initialize(coordinator_address="localhost:1234", env={})
    with pytest.raises(UserError, match="needs --process-id too"):
        distributed.initialize(env={"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"})
    with pytest.raises(UserError, match=r"--process-id 2 must be in \[0, --num-processes 2\)"):
        distributed.initialize("h:1", 2, 2, env={})
    with pytest.raises(UserError, match="JAX_NUM_PROCESSES='two' must be an integer"):
        distributed.initialize(env={"JAX_NUM_PROCESSES": "two"})


def test_a_tiny_model_memorises_one_batch():
    _, _, history = trained("single", steps=40)  # 16 sequences of 32 random tokens, at lr 1e-2
    assert history[0, 0] > 4.5 and history[-1, 0] < 0.1, history[::5, 0]


@pytest.mark.slow
def test_gpt2_small_builds_compiles_and_steps(config_path, tmp_path):
    """The 124M preset on this CPU: one step of a shortened context (the full 1024 takes minutes on two cores)."""
    data = config_path.parent / "data"
    run_main("--config", "small", "--run-dir", tmp_path, "--sample-tokens", 0, "--set", "train.max_steps=1",
             "train.warmup_steps=0", "train.batch_size=8", "train.micro_batch_size=8", "model.block_size=64",
             "train.precision=fp32", "train.eval_steps=1", f"data.train={data}/train_*.bin",
             f"data.val={data}/val_*.bin")
    [line] = train_lines(read_metrics(tmp_path))
    assert line["step"] == 1 and 10.0 < line["loss"] < 11.5  # ~ln(50257) at GPT-2's init
