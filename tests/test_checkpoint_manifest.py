"""Checksummed checkpoints (issue 19, item 1): damage that keeps a checkpoint's size (4 KiB XORed in the middle of
its largest file) is caught by the manifest written with it, skipped with a warning that names it, and the one
before is resumed; the damaged one is set aside under the run directory's set_aside/, so that the resumed run saves
its steps again and never rotates out a good checkpoint for it. A checkpoint is also what its name says: another
step's copied over it is damaged too. Checked below the training loops and through both trainers (a tiny model:
seconds)."""

import shutil
import struct
import subprocess
import zipfile
from pathlib import Path

import flax
import numpy as np
import pytest
import torch

from gpt2_common.config import Config, ModelConfig, dumps_toml
from gpt2_common.errors import UserError
from gpt2_common.manifest import DamagedCheckpoint, NoManifest, verify_manifest, write_manifest
from gpt2_jax import checkpoint as jax_checkpoint
from gpt2_torch.checkpoint import (checkpoint_path, link_or_save, list_checkpoints, load_checkpoint, manifest_path,
                                   newest_resumable, save_checkpoint)

CONFIG = Config(name="manifest", model=ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=8, vocab_size=100))


def xor_middle(path: Path, size: int = 4096) -> None:
    """Flips every bit of `size` bytes in the middle of a file; its size stays the same."""
    data = bytearray(path.read_bytes())
    assert len(data) > size, f"{path} is too small to damage in the middle"
    start = (len(data) - size) // 2
    data[start:start + size] = bytes(b ^ 0xFF for b in data[start:start + size])
    before = path.stat().st_size
    path.write_bytes(bytes(data))
    assert path.stat().st_size == before


def xor_largest_tensor(path: Path) -> None:
    """XORs 4 KiB in the middle of the largest tensor of a torch.save file (a zip of uncompressed records), where
    the zip's own headers do not notice it: what a flip in the middle of a large model's checkpoint hits."""
    with zipfile.ZipFile(path) as archive:
        record = max(archive.infolist(), key=lambda info: info.file_size)
    with path.open("rb") as f:
        f.seek(record.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", f.read(4))
    start = record.header_offset + 30 + name_length + extra_length + (record.file_size - 4096) // 2
    data = bytearray(path.read_bytes())
    data[start:start + 4096] = bytes(b ^ 0xFF for b in data[start:start + 4096])
    path.write_bytes(bytes(data))


# --- the manifest itself ---------------------------------------------------------------------------------------------

def test_manifest_catches_damage_that_keeps_the_size(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "big.bin").write_bytes(np.arange(10_000, dtype=np.int64).tobytes())
    (tmp_path / "small.json").write_text("{}")
    manifest = tmp_path / "manifest.sha256"
    write_manifest(manifest, [tmp_path / "a" / "big.bin", tmp_path / "small.json"])
    verify_manifest(manifest)
    if shutil.which("sha256sum"):  # the format is sha256sum's: a user can check a checkpoint by hand
        subprocess.run(["sha256sum", "--quiet", "-c", manifest.name], cwd=tmp_path, check=True)
    xor_middle(tmp_path / "a" / "big.bin")
    with pytest.raises(DamagedCheckpoint, match="file 'a/big.bin' does not match its SHA-256 in manifest.sha256"):
        verify_manifest(manifest)
    verify_manifest(manifest, only="small")  # a subset is checked alone (JAX's meta/ before its config is read)
    (tmp_path / "small.json").unlink()
    with pytest.raises(DamagedCheckpoint, match="file 'small.json' is missing"):
        verify_manifest(manifest, only="small")
    manifest.write_text("not a manifest\n")
    with pytest.raises(DamagedCheckpoint, match="line 1 is not"):
        verify_manifest(manifest)
    with pytest.raises(NoManifest):
        verify_manifest(tmp_path / "none.sha256")


# --- PyTorch -----------------------------------------------------------------------------------------------------

def torch_state(step: int) -> dict:
    from gpt2_torch.model import GPT

    torch.manual_seed(step)
    return {"step": step, "loader_position": step, "model": GPT(CONFIG.model).state_dict(), "optimizer": {},
            "scaler": {}, "rng": [], "config": dumps_toml(CONFIG)}


def test_torch_damaged_checkpoint_is_skipped_and_set_aside(tmp_path, capsys):
    directory = tmp_path / "checkpoints"
    for step in (2, 4):
        save_checkpoint(torch_state(step), checkpoint_path(directory, step), keep=2)
    newest = checkpoint_path(directory, 4)
    assert manifest_path(newest).read_text().endswith(f"  {newest.name}\n")
    xor_largest_tensor(newest)
    with pytest.raises(UserError, match=f"checkpoint '{newest}' is damaged: file '{newest.name}' does not match"):
        load_checkpoint(newest)
    capsys.readouterr()
    path, checkpoint = newest_resumable(directory)
    err = capsys.readouterr().err
    assert path == checkpoint_path(directory, 2) and checkpoint["step"] == 2
    assert f"warning: skipping checkpoint {newest}: it is damaged: file '{newest.name}' does not match its SHA-256" \
           in err
    [aside] = (tmp_path / "set_aside").iterdir()  # under the run directory, named for why
    assert aside.name.startswith("damaged_step_4_") and f"warning: set checkpoint {newest} aside in {aside} " in err
    assert sorted(p.name for p in aside.iterdir()) == ["step_00000004.pt", "step_00000004.pt.sha256"]
    # the resumed run saves step 4 again, and keeping 2 rotates out nothing it needs
    for step in (4, 6):
        save_checkpoint(torch_state(step), checkpoint_path(directory, step), keep=2)
    assert sorted(p.name for p in directory.iterdir()) == [
        "step_00000004.pt", "step_00000004.pt.sha256", "step_00000006.pt", "step_00000006.pt.sha256"]
    assert load_checkpoint(newest)["step"] == 4


def test_torch_best_link_gets_its_own_checksum_and_old_files_read_unverified(tmp_path, capsys):
    directory = tmp_path / "checkpoints"
    step_file = checkpoint_path(directory, 3)
    save_checkpoint(torch_state(3), step_file, keep=2)
    link_or_save(torch_state(3), directory / "best.pt", same_as=step_file)
    assert manifest_path(directory / "best.pt").read_text() == \
        manifest_path(step_file).read_text().replace(step_file.name, "best.pt")
    assert load_checkpoint(directory / "best.pt")["step"] == 3
    manifest_path(step_file).unlink()  # as written before checksums
    capsys.readouterr()
    assert newest_resumable(directory)[1]["step"] == 3
    assert "has no checksum file step_00000003.pt.sha256" in capsys.readouterr().err


def test_torch_trainer_resumes_from_the_checkpoint_before_a_damaged_one(tmp_path, capsys, torch_one_thread):
    """The issue's repro: XOR 4 KiB in the newest checkpoint (step 6) of a finished run and run it again with more
    steps; it used to resume from the damaged step and train on at a loss of 8e9. Now it resumes from step 4, and
    its losses are those of the first run."""
    from gpt2_common.data import write_shard
    from gpt2_common.metrics import read_metrics
    from gpt2_torch.train import main

    rng = np.random.default_rng(0)
    write_shard(tmp_path / "train.bin", rng.integers(0, 100, 4000))
    write_shard(tmp_path / "val.bin", rng.integers(0, 100, 1000))
    config = tmp_path / "c.toml"
    config.write_text("\n".join([
        'name = "manifest"', "[model]", "n_layer = 1", "n_head = 2", "n_embd = 32", "block_size = 16",
        "vocab_size = 100", "[train]", "batch_size = 4", "micro_batch_size = 4", "max_steps = 6", "warmup_steps = 0",
        "eval_interval = 0", "eval_steps = 1", "save_interval = 2", "log_interval = 1", "keep_checkpoints = 2",
        'precision = "fp32"', "keep_best = false", "[data]", f'train = "{tmp_path / "train.bin"}"',
        f'val = "{tmp_path / "val.bin"}"']) + "\n")

    def losses(run_dir):
        return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if "loss" in r]

    run_dir = tmp_path / "run"
    main(["--config", str(config), "--run-dir", str(run_dir)])
    first = losses(run_dir)
    damaged = checkpoint_path(run_dir / "checkpoints", 6)
    xor_largest_tensor(damaged)
    capsys.readouterr()
    main(["--config", str(config), "--run-dir", str(run_dir)])
    err = capsys.readouterr().err
    assert f"warning: skipping checkpoint {damaged}: it is damaged: file" in err
    assert losses(run_dir) == first and len(first) == 6
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step_00000004.pt", "step_00000006.pt"]
    for path in list_checkpoints(run_dir / "checkpoints"):
        verify_manifest(manifest_path(path))


# --- JAX ---------------------------------------------------------------------------------------------------------

@flax.struct.dataclass
class State:
    step: np.ndarray
    params: dict


def jax_state(step: int) -> State:
    w = np.random.default_rng(step).standard_normal(1 << 14).astype(np.float32)  # random: orbax compresses
    return State(np.int32(step), {"w": w, "b": np.arange(8.0) + step})


def abstract_state() -> State:
    import jax

    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype, sharding=device),
                        jax_state(0))


def largest_array_file(step_dir: Path) -> Path:
    return max((p for p in (step_dir / "state" / "ocdbt.process_0" / "d").iterdir()), key=lambda p: p.stat().st_size)


def test_jax_damaged_checkpoint_is_refused_by_restore_and_its_step_saved_again_once_moved(tmp_path):
    directory = tmp_path / "checkpoints"
    manager = jax_checkpoint.checkpoint_manager(directory, keep=2)  # async saves, as the trainer makes them
    for step in (2, 4):
        jax_checkpoint.save(manager, jax_state(step), CONFIG, loader_position=step)
    manager.wait_until_finished()
    for step in (2, 4):  # sealed before orbax renamed the folder into place
        verify_manifest(directory / str(step) / jax_checkpoint.MANIFEST_NAME)
    xor_middle(largest_array_file(directory / "4"))
    abstract = abstract_state()
    with pytest.raises(DamagedCheckpoint, match=f"checkpoint '{directory / '4'}' is damaged: file 'state/ocdbt"):
        jax_checkpoint.restore(manager, abstract, 4)
    state, meta = jax_checkpoint.restore(manager, abstract, 2)
    assert int(state.step) == 2 and meta["loader_position"] == 2
    np.testing.assert_array_equal(state.params["w"], jax_state(2).params["w"])
    # orbax saves no step at or below its newest: with the damaged 4 in place, a save of step 4 (or 3) was silently
    # dropped; now it raises, and the trainer's resume moves the damaged step aside first (gpt2_jax/resume.py)
    with pytest.raises(FileExistsError, match="step 4 is there already, at or after step 3"):
        jax_checkpoint.save(manager, jax_state(3), CONFIG, loader_position=3)
    (tmp_path / "aside").mkdir()
    (directory / "4").rename(tmp_path / "aside" / "4")
    manager.reload()
    for step in (4, 6):
        jax_checkpoint.save(manager, jax_state(step), CONFIG, loader_position=step)
    manager.wait_until_finished()
    assert manager.all_steps() == [4, 6]
    state, _ = jax_checkpoint.restore(manager, abstract, 4)
    assert int(state.step) == 4
    manager.close()


def test_jax_damaged_meta_and_params_are_refused_by_the_readers(tmp_path):
    directory = tmp_path / "checkpoints"
    manager = jax_checkpoint.checkpoint_manager(directory, keep=2, async_save=False)  # as the converter saves
    jax_checkpoint.save(manager, jax_state(1), CONFIG, loader_position=1)
    manager.close()
    assert jax_checkpoint.read_meta(directory)["step"] == 1
    meta = directory / "1" / "meta" / "metadata"
    meta.write_bytes(meta.read_bytes().replace(b"n_layer = 1", b"n_layer = 7"))  # parses, and would mislead
    with pytest.raises(DamagedCheckpoint, match=f"checkpoint '{directory / '1'}' is damaged: file 'meta/metadata'"):
        jax_checkpoint.read_meta(directory)


def test_jax_step_folder_holding_another_step_is_refused_by_the_readers(tmp_path):
    """The manifest binds the step and the name: a folder copied over another step's verifies file by file, but
    its meta and state hold their own step, which must be the folder's name."""
    directory = tmp_path / "checkpoints"
    manager = jax_checkpoint.checkpoint_manager(directory, keep=2, async_save=False)
    jax_checkpoint.save(manager, jax_state(2), CONFIG, loader_position=2)
    shutil.copytree(directory / "2", directory / "4")
    manager.reload()
    verify_manifest(directory / "4" / jax_checkpoint.MANIFEST_NAME)  # every file as it was written
    with pytest.raises(DamagedCheckpoint, match=f"checkpoint '{directory / '4'}' is damaged: it holds step 2, not 4"):
        jax_checkpoint.read_meta(directory)
    with pytest.raises(DamagedCheckpoint, match="it holds step 2, not 4"):
        jax_checkpoint.restore(manager, abstract_state(), 4)
    assert int(jax_checkpoint.restore(manager, abstract_state(), 2)[0].step) == 2
    manager.close()


def test_jax_checkpoint_without_manifest_restores_with_a_warning(tmp_path, capsys):
    directory = tmp_path / "checkpoints"
    manager = jax_checkpoint.checkpoint_manager(directory, keep=2)
    jax_checkpoint.save(manager, jax_state(3), CONFIG, loader_position=3)
    manager.wait_until_finished()
    (directory / "3" / jax_checkpoint.MANIFEST_NAME).unlink()  # as written before checksums
    capsys.readouterr()
    state, _ = jax_checkpoint.restore(manager, abstract_state(), 3)
    assert int(state.step) == 3
    assert f"checkpoint {directory / '3'} has no checksum manifest (written before checksums): restoring it " \
           "unverified" in capsys.readouterr().err
    manager.close()


def test_jax_trainer_resumes_from_the_checkpoint_before_a_damaged_one(tmp_path, capsys):
    """The issue's repro: XOR 4 KiB in the largest file under checkpoints/<newest>/state/ocdbt.process_0/d/ of a
    finished run, and run it again with more steps. It used to resume from the damaged state (and report divergence,
    or train on). Now it resumes from the step before, saves the damaged step again, and its losses are the first
    run's (one CPU device, the smallest model: one compile a run)."""
    import jax

    from gpt2_common.config import load_config
    from gpt2_common.data import write_shard
    from gpt2_common.metrics import read_metrics
    from gpt2_jax.train import train

    rng = np.random.default_rng(0)
    write_shard(tmp_path / "train.bin", rng.integers(0, 100, 4000))
    write_shard(tmp_path / "val.bin", rng.integers(0, 100, 1000))
    (tmp_path / "c.toml").write_text("\n".join([
        'name = "manifest"', "[model]", "n_layer = 1", "n_head = 2", "n_embd = 32", "block_size = 16",
        "vocab_size = 100", "[train]", "batch_size = 4", "micro_batch_size = 4", "max_steps = 6", "warmup_steps = 0",
        "eval_interval = 0", "eval_steps = 1", "save_interval = 2", "log_interval = 1", "keep_checkpoints = 2",
        'precision = "fp32"', "keep_best = false", "[data]", f'train = "{tmp_path / "train.bin"}"',
        f'val = "{tmp_path / "val.bin"}"']) + "\n")
    config, run_dir = load_config(str(tmp_path / "c.toml")), tmp_path / "run"

    def losses():
        return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if "loss" in r]

    train(config, run_dir, sample_tokens=0, devices=jax.devices()[:1], log=print)
    first = losses()
    checkpoints = run_dir / "checkpoints"
    xor_middle(largest_array_file(checkpoints / "6"))
    capsys.readouterr()
    train(config, run_dir, sample_tokens=0, devices=jax.devices()[:1], log=print)
    err = capsys.readouterr().err
    assert f"warning: skipping checkpoint {checkpoints / '6'}: it is damaged: file 'state/ocdbt.process_0/d/" in err
    [aside] = (run_dir / "set_aside").iterdir()
    assert aside.name.startswith("damaged_step_6_") and (aside / "6" / "state").is_dir()
    assert f"warning: set checkpoint {checkpoints / '6'} aside in {aside} (it did not read back)" in err
    assert losses() == first and len(first) == 6
    assert sorted(p.name for p in checkpoints.iterdir()) == ["4", "6"]
    for step in (4, 6):
        verify_manifest(checkpoints / str(step) / jax_checkpoint.MANIFEST_NAME)
