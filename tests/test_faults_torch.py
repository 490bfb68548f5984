"""The PyTorch trainer under faults, as real processes: SIGKILL at random moments and in the middle of a checkpoint
write, then the same command again, must give exactly the losses of an uninterrupted run; SIGTERM/SIGINT stop with a
checkpoint and exit 0; damaged checkpoints, and a step file holding another step's checkpoint, are skipped and set
aside; a NaN loss is skipped or stops the run by train.nan_policy."""

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2_common.data import write_shard
from gpt2_common.errors import UserError, run_cli
from gpt2_common.config import load_config
from gpt2_common.manifest import file_digest
from gpt2_common.metrics import read_metrics
from gpt2_torch.checkpoint import list_checkpoints, load_checkpoint
from gpt2_torch.train import main
from nan_injection import train_with_nan_at
from tiny_run import killed_after, records, train_steps, wait_for, write_run_config

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "train_torch.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# Runs the trainer with every os.fsync slowed down, so that a checkpoint's temporary file stays there long
# enough for the test to kill the process in the middle of writing it.
SLOW_SAVES = ("import os, runpy, sys, time; real = os.fsync; "
              "os.fsync = lambda fd: (time.sleep(3), real(fd))[1]; "
              "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def write_config(root: Path, **train) -> Path:
    """12 steps of 2 micro-batches with dropout (so the restored RNG and loader position matter)."""
    return write_run_config(root, "faults", {
        "batch_size": 8, "micro_batch_size": 4, "max_steps": 12, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 2,
        "eval_interval": 4, "eval_steps": 1, "save_interval": 3, "log_interval": 1, "keep_checkpoints": 10,
        "precision": "fp32", "seed": 3, **train})


def command(config: Path, run_dir: Path) -> list[str]:
    return [sys.executable, str(SCRIPT), "--config", str(config), "--run-dir", str(run_dir)]


def start(config: Path, run_dir: Path, slow_saves: bool = False) -> subprocess.Popen:
    argv = command(config, run_dir)
    if slow_saves:
        argv = [sys.executable, "-c", SLOW_SAVES, *argv[1:]]
    return subprocess.Popen(argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def saving(run_dir: Path) -> bool:
    return any((run_dir / "checkpoints").glob(".step_*.partial"))


def finish(config: Path, run_dir: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(command(config, run_dir), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run, as a process like the interrupted ones (in pytest's process the last bits of a
    gradient norm can differ: compare processes with processes)."""
    root = tmp_path_factory.mktemp("torch_faults")
    config = write_config(root)
    finish(config, root / "reference")
    return config, records(root / "reference")


def test_killed_at_random_moments_and_mid_save_resumes_exactly(reference, tmp_path):
    config, expected = reference
    run_dir = tmp_path / "run"
    # 1: SIGKILL after a random number of logged steps, with step 3's checkpoint on disk so that the last run below
    # resumes whatever the draw
    killed_after(command(config, run_dir), ENV, run_dir, random.randint(4, 7))
    # 2: the same command again, killed while it writes a checkpoint (its temporary file is on disk)
    proc = start(config, run_dir, slow_saves=True)
    wait_for(lambda: saving(run_dir), proc)
    proc.kill()
    proc.wait()
    partial = list((run_dir / "checkpoints").glob(".step_*.partial"))
    assert partial, "the kill should have cut a save short"
    # 3: and once more, to the end
    done = finish(config, run_dir)
    assert "resumed from step" in done.stdout
    assert f"skipping partial checkpoint {partial[0]}" in done.stderr
    assert records(run_dir) == expected  # bit for bit, and no step twice in metrics.jsonl
    assert not list((run_dir / "checkpoints").glob(".*.tmp")) + list((run_dir / "checkpoints").glob(".*.partial"))


def test_sigterm_and_sigint_stop_with_a_checkpoint_and_exit_0(reference, tmp_path):
    config, expected = reference
    for sig in (signal.SIGTERM, signal.SIGINT):
        run_dir = tmp_path / sig.name
        proc = start(config, run_dir)
        wait_for(lambda: train_steps(run_dir) >= 2, proc)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        stopped = int(out.split(f"{sig.name}: stopped at step ")[1].split()[0])
        assert stopped < 12 and "--- sample" not in out  # stopped early, without the end-of-training sample
        newest = list_checkpoints(run_dir / "checkpoints")[-1]
        assert load_checkpoint(newest)["step"] == stopped == train_steps(run_dir)
    finish(config, run_dir)
    assert records(run_dir) == expected


def test_damaged_checkpoints_are_skipped_for_the_one_before(reference, tmp_path, capsys):
    config, expected = reference
    run_dir = tmp_path / "run"
    main(["--config", str(config), "--run-dir", str(run_dir)])
    expected = records(run_dir)
    files = list_checkpoints(run_dir / "checkpoints")
    assert [p.name for p in files] == [f"step_{s:08d}.pt" for s in (3, 6, 9, 12)]
    data = files[-1].read_bytes()
    files[-1].write_bytes(data[: len(data) // 2])  # truncated
    garbled = bytearray(files[-2].read_bytes())
    garbled[: 4096] = os.urandom(4096)
    files[-2].write_bytes(bytes(garbled))
    capsys.readouterr()
    main(["--config", str(config), "--run-dir", str(run_dir), "--set", "train.max_steps=12"])
    out, err = capsys.readouterr()
    assert f"warning: skipping checkpoint {files[-1]}" in err and f"warning: skipping checkpoint {files[-2]}" in err
    assert f"resumed from step 6 ({files[-3]})" in out
    assert records(run_dir) == expected
    for path in files[-2:]:
        path.write_bytes(b"garbage")
    files[-3].write_bytes(b"")
    files[-4].write_bytes(b"PK")
    with pytest.raises(UserError, match="none of the 4 checkpoints"):
        main(["--config", str(config), "--run-dir", str(run_dir)])


def test_a_step_file_holding_another_steps_checkpoint_is_set_aside_and_saved_again(reference, tmp_path, capsys):
    """Issue 32's repro: step 6's file and its .sha256 copied over step 12's verified (the checksum file named step
    6's file) and resumed as step 6 with no warning. Now the checksum file must name the file it sits beside and the
    file must hold its name's step: step 12 is damaged, set aside, step 6 resumed, and step 12 saved again."""
    import shutil

    config, _ = reference
    run_dir = tmp_path / "run"
    main(["--config", str(config), "--run-dir", str(run_dir)])
    expected = records(run_dir)
    checkpoints = run_dir / "checkpoints"
    for step in (9, 12):
        (checkpoints / f"step_{step:08d}.pt").unlink()
        (checkpoints / f"step_{step:08d}.pt.sha256").unlink()
    for suffix in ("", ".sha256"):  # cp -a step_00000006.pt* over step 12
        shutil.copy2(checkpoints / f"step_00000006.pt{suffix}", checkpoints / f"step_00000012.pt{suffix}")
    capsys.readouterr()
    main(["--config", str(config), "--run-dir", str(run_dir)])
    out, err = capsys.readouterr()
    twelve = checkpoints / "step_00000012.pt"
    assert f"warning: skipping checkpoint {twelve}: it is damaged: its checksum file step_00000012.pt.sha256 lists " \
           "step_00000006.pt, not step_00000012.pt" in err
    assert f"resumed from step 6 ({checkpoints / 'step_00000006.pt'})" in out
    [aside] = [p for p in (run_dir / "set_aside").iterdir() if p.name.startswith("damaged_step_12_")]
    assert sorted(p.name for p in aside.iterdir()) == ["step_00000012.pt", "step_00000012.pt.sha256"]
    assert records(run_dir) == expected and load_checkpoint(twelve)["step"] == 12
    # the file alone, with a checksum file made for it by hand: its own step still gives it away
    shutil.copy2(checkpoints / "step_00000006.pt", twelve)
    (checkpoints / "step_00000012.pt.sha256").write_text(f"{file_digest(twelve)}  step_00000012.pt\n")
    with pytest.raises(UserError, match="is damaged: it holds step 6, not 12"):
        load_checkpoint(twelve)


def test_best_checkpoint_and_one_per_pass_over_the_data(reference, tmp_path):
    config, _ = reference
    config = write_config(config.parent, keep_checkpoints=1, save_every_epoch=True, save_interval=0,
                          eval_interval=2)
    main(["--config", str(config), "--run-dir", str(tmp_path / "run")])
    checkpoints = tmp_path / "run" / "checkpoints"
    val = [(r["step"], r["val_loss"]) for r in read_metrics(tmp_path / "run") if "val_loss" in r]
    best_step, best_loss = min(val, key=lambda sv: sv[1])
    best = load_checkpoint(checkpoints / "best.pt")
    assert best["step"] == best_step and best["best_val_loss"] == best_loss
    # 12000 tokens make 749 windows of 16: 187 micro-batches of 4 a pass, more than 12 steps use; so no pass ends,
    # and keep_checkpoints=1 leaves the last step's checkpoint beside best.pt
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step_00000012.pt"]
    small = write_config(config.parent / "small", keep_checkpoints=10, save_every_epoch=True, save_interval=0)
    write_shard(config.parent / "small" / "data" / "train.bin", np.random.default_rng(1).integers(0, 100, 600))
    main(["--config", str(small), "--run-dir", str(tmp_path / "small")])
    # 600 tokens: 37 windows of 16, 9 micro-batches of 4 a pass (2 a step): passes end in steps 5 and 9 (and 12
    # is the last step)
    assert [load_checkpoint(p)["step"] for p in list_checkpoints(tmp_path / "small" / "checkpoints")] == [5, 9, 12]


def test_a_nan_loss_stops_the_run_keeping_the_last_good_checkpoint(reference, tmp_path, capsys):
    config, _ = reference
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: train_with_nan_at("torch", load_config(str(config)), tmp_path / "run", 5))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: training diverged at step 5: loss nan") and err.count("\n") == 1, err
    assert str(tmp_path / "run" / "checkpoints" / "step_00000003.pt") in err
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_00000003.pt"]
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r] == [1, 2, 3, 4]


def test_a_nan_loss_is_skipped_and_counted_with_nan_policy_skip(reference, tmp_path, capsys):
    config, _ = reference
    skip = write_config(config.parent, nan_policy="skip", save_interval=1)
    train_with_nan_at("torch", load_config(str(skip)), tmp_path / "run", 5)
    assert "step 5: loss nan, grad norm nan: update skipped" in capsys.readouterr().out
    lines = {r["step"]: r for r in read_metrics(tmp_path / "run") if "loss" in r}
    assert lines[5]["loss"] is None and [lines[s]["skipped_steps"] for s in (4, 5, 12)] == [0, 1, 1]
    assert all(np.isfinite(lines[s]["loss"]) for s in lines if s != 5)
    files = {load_checkpoint(p)["step"]: load_checkpoint(p) for p in list_checkpoints(tmp_path / "run" / "checkpoints")}
    before, after = files[4], files[5]
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])  # no update at step 5
    assert after["loader_position"] == before["loader_position"] + 2  # but its batch was used up
    assert not torch.equal(files[6]["model"]["transformer.wte.weight"], after["model"]["transformer.wte.weight"])
    assert files[12]["skipped_steps"] == 1


@pytest.mark.slow
def test_sigterm_under_torchrun_stops_every_rank_at_the_same_step(reference, tmp_path):
    config, _ = reference
    run_dir = tmp_path / "ddp"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             *command(config, run_dir)[1:]], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(lambda: train_steps(run_dir) >= 2, proc, timeout=600)
    os.killpg(proc.pid, signal.SIGTERM)  # as a batch scheduler does: torchrun and both ranks get it
    out, err = proc.communicate(timeout=600)
    stopped = int(out.split("stopped at step ")[1].split()[0])
    checkpoint = load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])
    assert checkpoint["step"] == stopped and len(checkpoint["rng"]) == 2  # both ranks took part in the save
    assert "exitcode  : -9" not in err  # no rank had to be killed
