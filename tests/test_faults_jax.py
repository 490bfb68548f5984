"""The JAX trainer under faults, as real processes: SIGKILL at a random moment and in the middle of an orbax save,
then the same command again, must give exactly the losses of an uninterrupted run; SIGTERM stops with a checkpoint
and exit 0; damaged checkpoints, and a step folder holding another step's checkpoint, are skipped and set aside; a
NaN loss is skipped or stops the run by train.nan_policy."""

import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from gpt2_common.config import load_config
from gpt2_common.errors import UserError, run_cli
from gpt2_common.metrics import read_metrics
from gpt2_jax.checkpoint import load_checkpoint_params, read_meta
from gpt2_jax.train import train
from nan_injection import train_with_nan_at
from tiny_run import killed_after, records, train_steps, wait_for, write_run_config

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "train_jax.py"
# One CPU device per process: the quickest to compile on two cores, and the same in every run compared.
ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu",
       "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
# Runs the trainer with orbax's final rename delayed, so that a save stays half-written (a *.orbax-checkpoint-tmp*
# folder) long enough for the test to kill the process in the middle of it.
SLOW_SAVES = """
import asyncio, runpy, sys
from orbax.checkpoint._src.path import atomicity
real = atomicity.AtomicRenameTemporaryPath.finalize
async def slow(self, *args, **kwargs):
    await asyncio.sleep(5)
    return await real(self, *args, **kwargs)
atomicity.AtomicRenameTemporaryPath.finalize = slow
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def write_config(root: Path, **train_keys) -> Path:
    """12 steps of one micro-batch (the quickest step to compile) with dropout (so the dropout keys and the loader
    position matter)."""
    return write_run_config(root, "faults", {
        "batch_size": 4, "micro_batch_size": 4, "max_steps": 12, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 2,
        "eval_interval": 4, "eval_steps": 1, "save_interval": 3, "log_interval": 1, "keep_checkpoints": 10,
        "precision": "fp32", "seed": 3, **train_keys})


def command(config: Path, run_dir: Path) -> list[str]:
    return [sys.executable, str(SCRIPT), "--config", str(config), "--run-dir", str(run_dir), "--sample-tokens", "0"]


def start(config: Path, run_dir: Path, slow_saves: bool = False) -> subprocess.Popen:
    argv = command(config, run_dir)
    if slow_saves:
        argv = [sys.executable, "-c", SLOW_SAVES, *argv[1:]]
    return subprocess.Popen(argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(config: Path, run_dir: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(command(config, run_dir), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def partial_saves(run_dir: Path) -> list[Path]:
    return list((run_dir / "checkpoints").glob("*.orbax-checkpoint-tmp*"))


def steps_saved(run_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("jax_faults")
    # The processes after this one load its compiled steps from a persistent cache: seconds instead of ~10 s each
    # on a busy two-core machine. The kill test compares them with this one bit for bit.
    ENV.update(JAX_COMPILATION_CACHE_DIR=str(root / "compiled"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    config = write_config(root)
    finish(config, root / "reference")
    return config, records(root / "reference")


def test_killed_at_a_random_moment_and_mid_save_resumes_exactly(reference, tmp_path):
    config, expected = reference
    run_dir = tmp_path / "run"
    proc = start(config, run_dir, slow_saves=True)
    wait_for(lambda: bool(partial_saves(run_dir)), proc)  # the save of step 3 is being written
    proc.kill()
    proc.wait()
    partial = partial_saves(run_dir)
    assert partial and steps_saved(run_dir) == []
    killed = killed_after(command(config, run_dir), ENV, run_dir, random.randint(4, 10))  # with a save to resume from
    done = finish(config, run_dir)
    assert f"warning: skipping partial checkpoint {partial[0]}" in (done.stderr + killed.stderr)
    assert "resumed from step" in done.stdout
    assert records(run_dir) == expected  # bit for bit, and no step twice in metrics.jsonl
    assert not partial_saves(run_dir) and steps_saved(run_dir) == [3, 6, 9, 12]


def test_sigterm_stops_with_a_checkpoint_and_exit_0(reference, tmp_path):
    config, expected = reference
    run_dir = tmp_path / "run"
    proc = start(config, run_dir)
    wait_for(lambda: train_steps(run_dir) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    stopped = int(out.split("SIGTERM: stopped at step ")[1].split()[0])
    assert stopped < 12 and steps_saved(run_dir)[-1] == stopped == train_steps(run_dir)
    assert read_meta(run_dir)["step"] == stopped


# --- in this process, on one device ---------------------------------------------------------------------------------

def run(config_path: Path, run_dir: Path, **kwargs):
    return train(load_config(str(config_path)), run_dir, sample_tokens=0, devices=jax.devices()[:1],
                 log=print, **kwargs)


def test_damaged_checkpoints_are_skipped_for_the_one_before(reference, tmp_path, capsys):
    config, _ = reference
    run_dir = tmp_path / "run"
    run(config, run_dir)
    expected = records(run_dir)
    checkpoints = run_dir / "checkpoints"
    assert steps_saved(run_dir) == [3, 6, 9, 12]
    for file in (checkpoints / "12" / "state").rglob("*"):  # the arrays of step 12 lost
        if file.is_file():
            file.write_bytes(b"")
    shutil.rmtree(checkpoints / "9" / "meta")  # the record of step 9 gone
    capsys.readouterr()
    run(config, run_dir)
    out, err = capsys.readouterr()
    assert f"warning: skipping checkpoint {checkpoints / '12'}: it is damaged: file 'state/" in err
    assert f"warning: skipping checkpoint {checkpoints / '9'}: its meta does not read" in err
    assert "resumed from step 6" in out
    assert records(run_dir) == expected
    # the best checkpoint: the lowest validation loss, in checkpoints/best/<step>
    val = [(r["step"], r["val_loss"]) for r in read_metrics(run_dir) if "val_loss" in r]
    best_step, best_loss = min(val, key=lambda sv: sv[1])
    assert [p.name for p in (checkpoints / "best").iterdir()] == [str(best_step)]
    assert read_meta(checkpoints / "best")["best_val_loss"] == best_loss
    assert load_checkpoint_params(checkpoints / "best")[0].model.n_embd == 32
    # the damaged steps were set aside under set_aside/, each named for why, and saved again by the resumed run;
    # so was the best one newer than step 6 (the replay saved it again)
    aside = {p.name.rsplit("_", 1)[0]: p for p in (run_dir / "set_aside").iterdir()}
    assert (aside["damaged_step_12"] / "12").is_dir() and (aside["damaged_step_9"] / "9").is_dir()
    assert set(aside) <= {"damaged_step_12", "damaged_step_9", "after_step_6"}
    assert best_step <= 6 or (aside["after_step_6"] / "best" / str(best_step)).is_dir()
    for step in (3, 6, 9, 12):
        shutil.rmtree(checkpoints / str(step) / "meta")
    with pytest.raises(UserError, match="none of the 4 checkpoints"):
        run(config, run_dir)


def test_a_step_folder_holding_another_steps_checkpoint_is_set_aside_and_saved_again(reference, tmp_path, capsys):
    """Issue 32's repro: another step's folder copied over a step folder (a restore from backup, a sync tool, a hand
    mistake) was resumed as if it were that step, with no warning, and the save of that step was then skipped while
    the run said it saved, so every rerun went back. Now the folder is damaged (its meta holds another step), set
    aside, the step before resumed, and the step saved again: the losses are an uninterrupted run's."""
    config, _ = reference
    run_dir = tmp_path / "run"
    run(config, run_dir)
    expected = records(run_dir)
    checkpoints = run_dir / "checkpoints"
    for step in (9, 12):
        shutil.rmtree(checkpoints / str(step))
    shutil.copytree(checkpoints / "6", checkpoints / "12", symlinks=True)  # cp -a 6 12
    capsys.readouterr()
    run(config, run_dir)
    out, err = capsys.readouterr()
    assert f"warning: skipping checkpoint {checkpoints / '12'}: it is damaged: it holds step 6, not 12" in err
    assert f"resumed from step 6 ({checkpoints / '6'})" in out
    [aside] = [p for p in (run_dir / "set_aside").iterdir() if p.name.startswith("damaged_step_12_")]
    assert (aside / "12" / "state").is_dir()  # kept for a look, as it was
    assert records(run_dir) == expected and steps_saved(run_dir) == [3, 6, 9, 12]
    assert read_meta(checkpoints / "12")["step"] == 12
    run(config, run_dir)
    assert f"resumed from step 12 ({checkpoints / '12'})" in capsys.readouterr().out  # and not back to 6


def test_a_nan_loss_stops_the_run_keeping_the_last_good_checkpoint(reference, tmp_path, capsys):
    config, _ = reference
    stop = write_config(config.parent, log_interval=4)  # the check runs a step late: step 6 saves nothing
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: train_with_nan_at("jax", load_config(str(stop)), tmp_path / "run", 5, log=print))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: training diverged at step 5: loss nan") and err.count("\n") == 1, err
    assert str(tmp_path / "run" / "checkpoints" / "3") in err
    assert steps_saved(tmp_path / "run") == [3]
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r] == [4]


def test_a_nan_loss_is_skipped_and_counted_with_nan_policy_skip(reference, tmp_path, capsys):
    config, _ = reference
    skip = write_config(config.parent, nan_policy="skip", save_interval=1)
    train_with_nan_at("jax", load_config(str(skip)), tmp_path / "run", 5, log=print)
    assert "step 5: loss nan, grad norm nan: update skipped" in capsys.readouterr().out
    lines = {r["step"]: r for r in read_metrics(tmp_path / "run") if "loss" in r}
    assert lines[5]["loss"] is None and [lines[s]["skipped_steps"] for s in (4, 5, 12)] == [0, 1, 1]
    assert all(np.isfinite(lines[s]["loss"]) for s in lines if s != 5)
    params = {s: load_checkpoint_params(tmp_path / "run" / "checkpoints" / str(s))[1] for s in (4, 5, 6)}
    same = jax.tree.map(np.array_equal, params[4], params[5])
    assert all(jax.tree.leaves(same))  # no update at step 5
    assert not np.array_equal(params[6]["wte"]["embedding"], params[5]["wte"]["embedding"])
    assert read_meta(tmp_path / "run" / "checkpoints" / "5")["loader_position"] == 5  # its batch was used up
