"""The PyTorch trainer end to end: accumulation, DDP over two real processes, exact resume, schedule, precision,
and errors that reach the user as one line."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2_common.config import load_config
from gpt2_common.data import write_shard
from gpt2_common.errors import UserError
from gpt2_common.metrics import read_metrics
from gpt2_common.schedule import lr_at
from gpt2_torch.checkpoint import list_checkpoints, load_checkpoint
from gpt2_torch.model import GPT
from gpt2_torch.optim import make_optimizer
from gpt2_torch.step import train_step
from gpt2_torch.distributed import Distributed, to_device
from gpt2_torch.train import TorchBackend, main



pytestmark = pytest.mark.usefixtures("torch_one_thread")

REPO = Path(__file__).resolve().parent.parent
C = 64  # n_embd of the test model


def write_config(tmp_path, **sections) -> Path:
    """A tiny run on random tokens (vocab 100, padded to 128); keyword sections override keys."""
    rng = np.random.default_rng(0)
    write_shard(tmp_path / "data" / "train.bin", rng.integers(0, 100, 20_000))
    write_shard(tmp_path / "data" / "val.bin", rng.integers(0, 100, 2_000))
    config = {
        "model": {"n_layer": 2, "n_head": 4, "n_embd": C, "block_size": 16, "vocab_size": 100, "dropout": 0.0},
        "train": {"batch_size": 8, "micro_batch_size": 4, "max_steps": 4, "lr": 1e-3, "min_lr": 1e-4,
                  "warmup_steps": 1, "eval_interval": 2, "eval_steps": 2, "save_interval": 2, "log_interval": 1,
                  "keep_checkpoints": 10, "precision": "fp32", "seed": 7},
        "data": {"train": str(tmp_path / "data" / "train.bin"), "val": str(tmp_path / "data" / "val.bin")},
    }
    lines = ['name = "test"']
    for section, values in config.items():
        values = {**values, **sections.get(section, {})}
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    path = tmp_path / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def final_params(run_dir) -> dict[str, torch.Tensor]:
    return load_checkpoint(list_checkpoints(Path(run_dir) / "checkpoints")[-1])["model"]


def train_losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def assert_same_params(a, b, rtol):
    """Each tensor equal to rtol in norm. Element by element would be too strict: where a gradient is at the level of
    rounding noise, Adam divides the noise by itself and moves that element by ~lr whatever the summation order."""
    for name in a:
        x, y = a[name], b[name]
        if name.endswith("c_attn.bias"):
            # the key bias's true gradient is 0 (the softmax ignores a constant per row), so all of it is such noise,
            # and it affects nothing else: only the query and value biases are compared
            x, y = torch.cat([x[:C], x[2 * C:]]), torch.cat([y[:C], y[2 * C:]])
        error = torch.linalg.vector_norm(x - y) / torch.linalg.vector_norm(y).clamp(min=1e-12)
        assert error <= rtol, f"{name}: relative error {error:.2e}"


def test_accumulation_equals_one_step_on_the_whole_batch(tmp_path):
    config = load_config(str(write_config(tmp_path)))
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 100, (8, 17), generator=generator) for _ in range(3)]
    results = []
    for accum in (1, 2, 4):
        torch.manual_seed(0)
        model = GPT(config.model)
        optimizer = make_optimizer(model, config.train)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        losses = []
        for update, batch in enumerate(batches):
            micro = [(b[:, :-1], b[:, 1:]) for b in batch.chunk(accum)]
            loss, norm, _ = train_step(model, optimizer, scaler, micro, update, config)
            losses += [loss.item(), norm.item()]
        results.append((losses, model.state_dict()))
    for losses, params in results[1:]:
        assert losses == pytest.approx(results[0][0], rel=1e-5)
        assert_same_params(params, results[0][1], rtol=1e-5)


def test_two_process_ddp_equals_one_process_on_the_whole_batch(tmp_path):
    config = write_config(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the script puts the repository on sys.path itself
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(REPO / "scripts" / "train_torch.py"), "--config", str(config), "--run-dir", str(tmp_path / "ddp")],
        env=env, capture_output=True, text=True, timeout=600)
    assert launched.returncode == 0, f"{launched.stdout[-1500:]}\n{launched.stderr[:3000]}"  # how far, and the first error
    assert "2 x cpu" in launched.stdout
    main(["--config", str(config), "--run-dir", str(tmp_path / "one")])
    assert train_losses(tmp_path / "ddp") == pytest.approx(train_losses(tmp_path / "one"), rel=1e-5)
    val = [[r["val_loss"] for r in read_metrics(tmp_path / d) if "val_loss" in r] for d in ("ddp", "one")]
    assert len(val[0]) == 2 and val[0] == pytest.approx(val[1], rel=1e-5)
    assert_same_params(final_params(tmp_path / "ddp"), final_params(tmp_path / "one"), rtol=1e-5)
    ddp_rng = load_checkpoint(list_checkpoints(tmp_path / "ddp" / "checkpoints")[-1])["rng"]
    assert len(ddp_rng) == 2 and not torch.equal(ddp_rng[0]["torch"], ddp_rng[1]["torch"])  # per-rank dropout


@pytest.mark.slow
def test_compiled_ddp_trains_like_one_eager_process(tmp_path):
    """train.compile under torchrun: torch.compile inside DDP (two gloo processes) gives the eager single process's
    losses and weights, up to the compiled kernels' reordering of float sums (~2 minutes on 2 CPU cores)."""
    compiled = write_config(tmp_path, train={"compile": True})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(REPO / "scripts" / "train_torch.py"), "--config", str(compiled), "--run-dir", str(tmp_path / "ddp")],
        env=env, capture_output=True, text=True, timeout=900)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "2 x cpu" in launched.stdout and "compiled" in launched.stdout
    main(["--config", str(write_config(tmp_path)), "--run-dir", str(tmp_path / "one")])
    assert train_losses(tmp_path / "ddp") == pytest.approx(train_losses(tmp_path / "one"), rel=1e-4)
    assert_same_params(final_params(tmp_path / "ddp"), final_params(tmp_path / "one"), rtol=1e-4)


def test_resume_continues_exactly_like_the_uninterrupted_run(tmp_path, capsys):
    # dropout on, so that the restored RNG matters; two micro-steps, so that the loader position matters
    config = write_config(tmp_path, model={"dropout": 0.1})
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    main(["--config", str(config), "--run-dir", str(full)])
    assert [p.name for p in list_checkpoints(full / "checkpoints")] == ["step_00000002.pt", "step_00000004.pt"]

    # the same run killed after step 2: its checkpoint at step 2 and the metrics written up to then
    shutil.copytree(full, resumed)
    (resumed / "checkpoints" / "step_00000004.pt").unlink()
    kept = [r for r in read_metrics(resumed) if r["step"] <= 2]
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    torch.manual_seed(12345)  # the resumed run must not depend on the RNG it starts with
    main(["--config", str(config), "--run-dir", str(resumed)])
    assert "resumed from step" in capsys.readouterr().out

    assert read_metrics(resumed)[len(kept):] and train_losses(resumed) == train_losses(full)
    a, b = load_checkpoint(list_checkpoints(full / "checkpoints")[-1]), \
        load_checkpoint(list_checkpoints(resumed / "checkpoints")[-1])
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for key, state in a["optimizer"]["state"].items():
        assert all(torch.equal(state[k], b["optimizer"]["state"][key][k]) for k in state)
    assert a["step"] == b["step"] == 4 and a["loader_position"] == b["loader_position"] == 8


def test_metrics_follow_the_contract_and_lr_follows_the_schedule(tmp_path):
    config_path = write_config(tmp_path, train={"max_steps": 5, "log_interval": 2, "eval_interval": 0,
                                                "save_interval": 0, "warmup_steps": 2})
    main(["--config", str(config_path), "--run-dir", str(tmp_path / "run")])
    config = load_config(str(config_path))
    records = read_metrics(tmp_path / "run")
    train_lines = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_lines] == [2, 4, 5]  # every log_interval, and the last step
    assert [r["step"] for r in records if "val_loss" in r] == [5]  # eval_interval 0: at the end only
    for r in train_lines:
        assert set(r) == {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "step_time_s"}
        assert r["lr"] == lr_at(r["step"] - 1, config.train) and r["mfu"] is None  # no known peak for a CPU
    assert (tmp_path / "run" / "config.toml").read_text().startswith('name = "test"')
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_00000005.pt"]


def test_fp16_skips_the_update_on_overflow_and_halves_the_scale(tmp_path):
    config = load_config(str(write_config(tmp_path, train={"precision": "fp16"})))
    torch.manual_seed(0)
    model = GPT(config.model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = make_optimizer(model, config.train)
    batch = torch.randint(0, 100, (4, 17))
    micro = [(batch[:, :-1], batch[:, 1:])]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # float16 gradients overflow at this scale
    _, norm, _ = train_step(model, optimizer, scaler, micro, 0, config)
    assert not torch.isfinite(norm) and scaler.get_scale() == 2.0**39
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for _ in range(30):  # the scale falls until the gradients fit, then the updates go through
        loss, norm, _ = train_step(model, optimizer, scaler, micro, 0, config)
        if torch.isfinite(norm):
            break
    assert torch.isfinite(loss) and not torch.equal(before["transformer.wte.weight"], model.transformer.wte.weight)


def test_bf16_autocast_trains(tmp_path):
    config_path = write_config(tmp_path, train={"precision": "bf16", "max_steps": 2})
    main(["--config", str(config_path), "--run-dir", str(tmp_path / "run")])
    losses = train_losses(tmp_path / "run")
    assert len(losses) == 2 and all(np.isfinite(losses)) and abs(losses[0] - np.log(100)) < 0.5
    assert final_params(tmp_path / "run")["transformer.wte.weight"].dtype == torch.float32  # fp32 master weights


@pytest.mark.parametrize("args, message", [
    (["--set", "train.lr=fast"], "train.lr"),
    (["--set", "train.micro_batch_sise=2"], "did you mean 'train.micro_batch_size'"),
    (["--set", "data.train=/nonexistent/*.bin"], "no train shards match"),
    (["--init-from", "/nonexistent"], "--init-from"),
])
def test_bad_inputs_raise_user_errors(tmp_path, args, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        main(["--config", str(write_config(tmp_path)), "--run-dir", str(tmp_path / "run"), *args])


def test_a_micro_batch_that_does_not_divide_over_the_processes_is_a_user_error(tmp_path):
    config = load_config(str(write_config(tmp_path)), ["train.micro_batch_size=4", "train.batch_size=8"])
    with pytest.raises(UserError, match="does not divide over 3 processes"):
        TorchBackend(config, tmp_path / "run", Distributed(0, 3, torch.device("cpu")))


def test_resuming_another_model_or_starting_from_no_weights_are_user_errors(tmp_path):
    config = write_config(tmp_path, train={"max_steps": 2})
    main(["--config", str(config), "--run-dir", str(tmp_path / "run")])
    with pytest.raises(UserError, match="checkpoints of another model"):
        main(["--config", str(config), "--run-dir", str(tmp_path / "run"), "--set", "model.n_layer=3"])
    (tmp_path / "hf").mkdir()
    with pytest.raises(UserError, match="is not a weights source"):
        main(["--config", str(config), "--run-dir", str(tmp_path / "new"), "--init-from", str(tmp_path / "hf")])
    # a gpt2_torch checkpoint is a valid starting point: the new run begins at step 0 from its weights
    main(["--config", str(config), "--run-dir", str(tmp_path / "new"), "--init-from", str(tmp_path / "run"),
          "--set", "train.max_steps=1"])
    assert [r["step"] for r in read_metrics(tmp_path / "new") if "loss" in r] == [1]


def test_the_script_reports_a_bad_input_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "train_torch.py"), "--config", "tiny",
                           "--set", "train.batch_size=10", "train.micro_batch_size=4"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: train.batch_size=10"), done.stderr


def test_to_device_gives_int64_tensors():
    inputs, targets = to_device((np.zeros((2, 3), np.int32), np.ones((2, 3), np.int32)), torch.device("cpu"))
    assert inputs.dtype == targets.dtype == torch.int64 and targets.sum() == 6
