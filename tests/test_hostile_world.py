"""Runs in a hostile world, through both trainers: stepping back on purpose (--resume-from), a second trainer on the
same run directory, a save that fails, a full disk, and (slow) all of it in turn with random kills and a flipped
byte and a step copied over another."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpt2_common.config import load_config
from gpt2_common.metrics import read_metrics
from gpt2_common.runlock import lock_holder
from tiny_run import train_steps, write_run_config

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "XLA_FLAGS": "", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
FRAMEWORKS = ["jax", "torch"]


def write_config(root: Path, **train) -> Path:
    """8 steps of 2 micro-batches with dropout, a checkpoint every 2 (so that RNG and loader position matter)."""
    return write_run_config(root, "hostile", {
        "batch_size": 8, "micro_batch_size": 4, "max_steps": 8, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 2,
        "eval_interval": 4, "eval_steps": 1, "save_interval": 2, "log_interval": 1, "keep_checkpoints": 10,
        "precision": "fp32", "seed": 5, **train}, model={"loss_chunk_size": 0}, train_tokens=6_000,
        file_name="config.toml")


def command(framework: str, config: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "scripts" / f"train_{framework}.py"), "--config", str(config), "--run-dir",
            str(run_dir), "--sample-tokens", "0", *extra]


def train_in_process(framework: str, config: Path, run_dir: Path, **kwargs):
    import importlib

    train = importlib.import_module(f"gpt2_{framework}.train").train
    extra = {"devices": __import__("jax").devices()[:1]} if framework == "jax" else {}
    kwargs.setdefault("log", lambda _: None)
    return train(load_config(str(config)), run_dir, sample_tokens=0, **extra, **kwargs)


def losses(run_dir: Path) -> list[tuple]:
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in read_metrics(run_dir)]


def step_checkpoint(framework: str, run_dir: Path, step: int) -> Path:
    name = str(step) if framework == "jax" else f"step_{step:08d}.pt"
    return run_dir / "checkpoints" / name


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_resume_from_an_earlier_checkpoint_replays_the_steps_after_it_exactly(framework, tmp_path, torch_one_thread):
    config = write_config(tmp_path)
    run_dir = tmp_path / "run"
    train_in_process(framework, config, run_dir)
    expected = losses(run_dir)
    assert [s for s, loss, _ in expected if loss is not None] == list(range(1, 9))
    train_in_process(framework, config, run_dir, resume_from=str(step_checkpoint(framework, run_dir, 4)))
    assert losses(run_dir) == expected  # steps 5-8 again, bit for bit, and each once
    aside = list((run_dir / "set_aside").iterdir())
    assert len(aside) == 1 and aside[0].name.startswith("after_step_4_")
    assert {p.name for p in aside[0].iterdir()} >= {step_checkpoint(framework, run_dir, s).name for s in (6, 8)}


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_shard_cut_short_mid_run_ends_the_run_with_one_line_naming_it(framework, tmp_path, torch_one_thread):
    """The PyTorch trainer died of SIGBUS there (exit 135, no message) while it memory-mapped its shards."""
    from gpt2_common.errors import UserError

    config, shard, run_dir = write_config(tmp_path), tmp_path / "data" / "train.bin", tmp_path / "run"
    size = shard.stat().st_size

    def log(line: str) -> None:
        if line.split()[:2] == ["step", "3/8"]:
            os.truncate(shard, size // 2)

    with pytest.raises(UserError) as err:
        train_in_process(framework, config, run_dir, log=log)
    assert str(err.value).startswith(f"shard '{shard}' was cut short ({size // 2} bytes now, {size} when it was "
                                     "opened) while this process read it; put back the shards")
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [1, 2, 3]
    assert step_checkpoint(framework, run_dir, 2).exists()


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_resume_from_must_name_a_checkpoint_of_the_run(framework, tmp_path, torch_one_thread):
    from gpt2_common.errors import UserError

    config = write_config(tmp_path)  # the config of the test above (whose compiled step the JAX cache holds)
    train_in_process(framework, config, tmp_path / "run", stop_at=2)
    with pytest.raises(UserError, match="is not a checkpoint of this run"):
        train_in_process(framework, config, tmp_path / "run", resume_from=str(tmp_path / "elsewhere"))


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_second_trainer_on_the_same_run_directory_gets_one_line(framework, tmp_path):
    config = write_config(tmp_path, max_steps=100_000, save_interval=0)  # it must still be training at the end
    run_dir = tmp_path / "run"
    first = subprocess.Popen(command(framework, config, run_dir), env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while not (run_dir / "metrics.jsonl").exists():  # the first holds the directory once it writes there
            assert first.poll() is None, first.communicate()[1][-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        second = subprocess.run(command(framework, config, run_dir), env=ENV, capture_output=True, text=True,
                                timeout=600)
        assert second.returncode == 2
        assert second.stderr == (f"error: run directory '{run_dir}' is in use by process {first.pid}; wait for it "
                                 "to finish, stop it, or give another --run-dir\n")
        assert first.poll() is None  # the first trains on
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=600)
    assert first.returncode == 0
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert steps == sorted(set(steps))  # each line once


def _immutable(path: Path, on: bool) -> bool:
    """chattr +i (root on ext4, tmpfs and most Linux filesystems): not even root can add files to it."""
    return subprocess.run(["chattr", "+i" if on else "-i", str(path)], capture_output=True).returncode == 0


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_save_that_fails_ends_the_run_with_one_line_and_keeps_the_last_good_checkpoint(framework, tmp_path):
    config = write_config(tmp_path, max_steps=100_000, eval_interval=0, log_interval=1)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(command(framework, config, run_dir), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    checkpoints = run_dir / "checkpoints"
    try:
        deadline = time.monotonic() + 600
        while not step_checkpoint(framework, run_dir, 2).exists():
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        if not _immutable(checkpoints, True):
            proc.kill()
            pytest.skip("chattr +i is not available here (it needs root on a Linux filesystem)")
        out, err = proc.communicate(timeout=600)
    finally:
        _immutable(checkpoints, False)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, err[-3000:]
    assert err.count("\n") == 1 and err.startswith("error: could not write checkpoint "), err[-3000:]
    assert "Operation not permitted" in err and "; the last good checkpoint (" in err
    kept = err.split("; the last good checkpoint (")[1].split(")")[0]
    assert Path(kept).exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs: room for two or three checkpoints of the test's model. Root mounts one; elsewhere the test that
    asks for it is skipped, saying why."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True,
                                 text=True)
    except OSError as err:
        pytest.skip(f"a full disk is a small tmpfs, and mount cannot run here ({err})")
    if mounted.returncode != 0:
        pytest.skip(f"a full disk is a small tmpfs, and mounting one needs root: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_full_disk_ends_the_run_at_the_first_failed_save_with_one_true_line(framework, small_disk, capfd,
                                                                              monkeypatch, torch_one_thread):
    """Issue 32: on a full disk the JAX trainer printed ~540 lines of tracebacks, trained on past the failed save and
    named as last good a checkpoint that was only a -tmp folder. Now, as PyTorch: the first failed save ends the run
    (before another save), as one error naming it and its cause, the newest checkpoint that verifies named as kept,
    nothing else printed."""
    from gpt2_common.run import SaveError

    # no evaluation, so no best checkpoint: the failed save is a step's, and the next (its manager waits for the
    # one before) comes 2 steps later at the latest, whenever the background write ends
    config = write_config(small_disk.parent, max_steps=100_000, eval_interval=0, keep_checkpoints=100)
    run_dir = small_disk / "run"
    unraisable = []  # what a process prints as a bare traceback (orbax's abandoned callbacks: "Event loop is closed")
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    capfd.readouterr()
    with pytest.raises(SaveError) as err:
        train_in_process(framework, config, run_dir)
    assert capfd.readouterr() == ("", "") and unraisable == []  # no traceback, no warning: the one line is the error
    match = re.fullmatch(r"could not write checkpoint (\S+): No space left on device(: '[^']+')?; the last good "
                         r"checkpoint \((\S+)\) is kept", str(err.value))
    assert match, str(err.value)
    failed, kept = Path(match.group(1)), Path(match.group(3))
    saved = [p for p in (run_dir / "checkpoints").iterdir() if step_of(framework, p) is not None]
    good = [p for p in saved if verifies(framework, p)]
    assert good and kept == max(good, key=lambda p: step_of(framework, p)) and failed not in good
    assert max(r["step"] for r in read_metrics(run_dir)) <= step_of(framework, failed) + 2  # no save after it


def finished_checkpoints(run_dir: Path) -> list[Path]:
    """The step checkpoints of either trainer that a save finished: orbax's step folders (digits only; a killed
    save leaves N.orbax-checkpoint-tmp-*) and step_N.pt files."""
    return [p for p in (run_dir / "checkpoints").iterdir()
            if p.name.isdigit() or re.fullmatch(r"step_\d+\.pt", p.name)]


def step_of(framework: str, path: Path) -> int | None:
    if framework == "jax":
        return int(path.name) if path.name.isdigit() else None
    from gpt2_torch.layout import step_of as torch_step_of

    return torch_step_of(path)


def verifies(framework: str, path: Path) -> bool:
    if framework == "jax":
        from gpt2_jax.saves import verified
    else:
        from gpt2_torch.checkpoint import verified
    return verified(str(path))


@pytest.mark.slow
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_kills_a_flipped_byte_a_failing_save_and_a_second_trainer_lose_nothing(framework, tmp_path):
    """In turn: three SIGKILLs at random moments, one flipped byte in the newest checkpoint, one save that fails
    (the checkpoints made immutable mid-run), the newest step's checkpoint replaced by the one before it, and one
    second trainer on the directory; then the run to its end has the losses of an uninterrupted run."""
    # 40 steps: the stages below (a failing save among them) must find the run still going whatever the kills left
    config = write_config(tmp_path, max_steps=40, eval_interval=4)
    subprocess.run(command(framework, config, tmp_path / "reference"), env=ENV, check=True, capture_output=True,
                   timeout=900)
    expected = losses(tmp_path / "reference")
    run_dir, rng = tmp_path / "run", random.Random()

    def start():
        proc = subprocess.Popen(command(framework, config, run_dir), env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        proc.started_at = time.time()
        return proc

    def started(proc) -> bool:
        """It holds the run directory and has written metrics since: restored, and training."""
        metrics = run_dir / "metrics.jsonl"
        return lock_holder(run_dir / ".lock") == f"process {proc.pid}" and metrics.stat().st_mtime > proc.started_at

    def wait(proc, predicate):
        deadline = time.monotonic() + 900
        while not predicate():
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.02)

    for _ in range(3):  # SIGKILL at a random moment
        proc = start()
        target = min(train_steps(run_dir) + rng.randint(1, 4), 15)
        wait(proc, lambda: train_steps(run_dir) >= target)
        time.sleep(rng.uniform(0, 0.2))
        proc.kill()
        proc.communicate()
    newest = max(finished_checkpoints(run_dir), key=lambda p: p.stat().st_mtime)  # not a killed save's folder
    files = [p for p in ([newest] if newest.is_file() else newest.rglob("*")) if p.is_file()]
    victim = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, the size unchanged
    victim.write_bytes(bytes(data))
    proc = start()  # a save that fails: resumes from the one before the damaged, then meets immutable checkpoints
    wait(proc, lambda: started(proc))
    if _immutable(run_dir / "checkpoints", True):
        out, err = proc.communicate(timeout=900)
        _immutable(run_dir / "checkpoints", False)
        assert proc.returncode == 2 and err.strip().splitlines()[-1].startswith("error: could not write"), err
    else:
        proc.kill()
        proc.communicate()
    # a step's checkpoint replaced by an earlier step's (a restore from backup, a sync tool, a hand mistake): the
    # next run sets it aside as damaged and resumes from the one before it
    subprocess.run(command(framework, config, run_dir, "--stop-at", "12"), env=ENV, check=True, capture_output=True,
                   timeout=900)  # at least two checkpoints, whatever the kills left
    saved = sorted(int(re.sub(r"\D", "", p.name)) for p in finished_checkpoints(run_dir))
    older, newer = (step_checkpoint(framework, run_dir, step) for step in saved[-2:])
    if framework == "jax":
        shutil.rmtree(newer)
        shutil.copytree(older, newer)
    else:
        for suffix in ("", ".sha256"):
            shutil.copyfile(f"{older}{suffix}", f"{newer}{suffix}")
    proc = start()  # and a second trainer beside it, while the first is held still (holding its lock)
    wait(proc, lambda: started(proc))
    proc.send_signal(signal.SIGSTOP)
    try:
        second = subprocess.run(command(framework, config, run_dir), env=ENV, capture_output=True, text=True,
                                timeout=900)
    finally:
        proc.send_signal(signal.SIGCONT)
    assert second.returncode == 2 and f"is in use by process {proc.pid}" in second.stderr, second.stderr
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    assert any(p.name.startswith(f"damaged_step_{saved[-1]}_") for p in (run_dir / "set_aside").iterdir())
    assert losses(run_dir) == expected
