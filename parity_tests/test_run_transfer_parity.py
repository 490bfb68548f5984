"""A run moves between the trainers with its whole training state (convert.py --to torch-run | jax-run) and goes on
as if it had not moved: JAX steps 0-10, converted, then PyTorch steps 10-20 log the losses that PyTorch 0-20 logs,
and the other way round; the converted optimizer state is the other trainer's own after the same steps; and a
state converted there and back is the same bit for bit. Every run here is in-process, on the curve test's config."""

from __future__ import annotations

import dataclasses
import errno
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from gpt2_common.config import Config, dumps_toml, from_dict, loads_toml
from gpt2_common.errors import UserError
from gpt2_formats import read_canonical, write
from gpt2_formats.runs import convert_run
from gpt2_jax import checkpoint as jax_checkpoint
from gpt2_jax import train_state as jax_side
from gpt2_torch import train_state as torch_side
from gpt2_torch.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint, write_weights
from parity_tests.conftest import assert_close_to_scale, random_weights
from parity_tests.test_training_parity import STEPS, WEIGHT_ATOL, make_config, train_lines

HALF = STEPS // 2
# Tighter than the curve test's LOSS_RTOL: a converted run's steps 11-20 and the other trainer's own agreed to 1.5e-7
# on the project's 2-core CPU dev machine (the two trainers' curves themselves differ by as much).
CONTINUED_LOSS_RTOL = 1e-5
MOMENT_RTOL = 1e-6  # of each tensor's scale


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each trainer 0-20 from the same weights (with a checkpoint at step 10), and each one's step-10 checkpoint
    converted to the other trainer, which trains it on to 20."""
    from gpt2_jax.train import train as train_jax
    from gpt2_torch.train import train as train_torch

    tmp = tmp_path_factory.mktemp("transfer")
    config = make_config(tmp, "scan")
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, save_interval=HALF))
    write_weights(random_weights(config.model), config, tmp / "init.pt")
    quiet = {"sample_tokens": 0, "log": lambda _: None}
    one_device = {"devices": jax.devices()[:1]}
    train_jax(config, tmp / "jax", init_from=str(tmp / "init.pt"), **one_device, **quiet)
    train_torch(config, tmp / "torch", init_from=str(tmp / "init.pt"), **quiet)
    convert_run(tmp / "jax", tmp / "jax-then-torch", "torch-run", step=HALF)
    convert_run(tmp / "torch", tmp / "torch-then-jax", "jax-run", step=HALF)
    train_torch(config, tmp / "jax-then-torch", **quiet)
    train_jax(config, tmp / "torch-then-jax", **one_device, **quiet)
    return tmp


def losses(lines: list[dict]) -> np.ndarray:
    return np.array([line["loss"] for line in lines])


@pytest.mark.parametrize("moved, stayed, first", [("jax-then-torch", "torch", "jax"),
                                                   ("torch-then-jax", "jax", "torch")])
def test_a_converted_run_continues_the_other_trainers_curve(runs, moved, stayed, first):
    moved_lines, stayed_lines, first_lines = (train_lines(runs / name) for name in (moved, stayed, first))
    assert [line["step"] for line in moved_lines] == list(range(1, STEPS + 1))
    assert moved_lines[:HALF] == first_lines[:HALF], "metrics.jsonl up to the converted step, copied as it was"
    np.testing.assert_allclose(losses(moved_lines[HALF:]), losses(stayed_lines[HALF:]), rtol=CONTINUED_LOSS_RTOL,
                               err_msg=f"{moved} vs {stayed}, steps {HALF + 1}-{STEPS}")
    np.testing.assert_allclose([line["lr"] for line in moved_lines[HALF:]],
                               [line["lr"] for line in stayed_lines[HALF:]], rtol=1e-6, err_msg="the schedule")
    (_, moved_final), (_, stayed_final) = read_canonical(runs / moved), read_canonical(runs / stayed)
    c = moved_final["transformer.wpe.weight"].shape[1]
    for name, value in moved_final.items():
        expected = stayed_final[name]
        if name.endswith("attn.c_attn.bias"):  # its key part has no gradient: see test_training_parity
            value, expected = np.delete(value, np.s_[c:2 * c]), np.delete(expected, np.s_[c:2 * c])
        np.testing.assert_allclose(value, expected, atol=WEIGHT_ATOL, err_msg=name)


def test_the_converted_optimizer_state_is_the_other_trainers_after_the_same_updates():
    """Three updates of each trainer's optimizer from the same weights with the same gradients (clipped, decayed,
    warming up: test_optimizer_parity's), each state converted to the other trainer's form: the other's own state,
    count for count and moment for moment."""
    import jax.numpy as jnp
    import optax
    import torch
    from optax.tree_utils import tree_get

    from gpt2_jax import weights as jw
    from gpt2_jax.optim import build_optimizer
    from gpt2_jax.step import TrainState
    from gpt2_torch import weights as tw
    from gpt2_torch.optim import clip_gradients, make_optimizer, set_lr
    from parity_tests.conftest import CASES, jax_params, torch_model
    from parity_tests.test_optimizer_parity import TRAIN

    model = CASES[1].model  # vocabulary 100, padded to 128
    config = Config(name="updates", model=model, train=TRAIN)
    weights, updates = random_weights(model), 3
    grads = [random_weights(model, seed=10 + i) for i in range(updates)]

    optimizer = build_optimizer(TRAIN)
    params = jax_params(weights, model)
    opt_state, update = optimizer.init(params), jax.jit(optimizer.update)
    for g in grads:
        step_updates, opt_state = update(jax_params(g, model), opt_state, params)
        params = optax.apply_updates(params, step_updates)
    jax_state = TrainState(step=jnp.array(updates, jnp.int32), params=params, opt_state=opt_state,
                           rng=jax.random.PRNGKey(0), loss_scale=None)

    gpt = torch_model(weights, model).train()
    torch_optimizer = make_optimizer(gpt, TRAIN)
    for step, g in enumerate(grads):
        for name, p in gpt.named_parameters():
            p.grad = tw.from_canonical(g, model)[name].clone()
        set_lr(torch_optimizer, step, TRAIN)
        clip_gradients(gpt.parameters(), TRAIN.grad_clip)
        torch_optimizer.step()
    torch_checkpoint = {"step": updates, "loader_position": 2 * updates, "model": gpt.state_dict(),
                        "optimizer": torch_optimizer.state_dict(), "scaler": {}, "rng": [],
                        "config": dumps_toml(config)}

    # JAX's state, converted: torch's own optimizer state_dict, index by index
    meta = {"loader_position": 2 * updates, "skipped_steps": 0, "best_val_loss": None}
    converted = torch_side.from_canonical_state(jax_side.to_canonical_state(jax_state, meta, config, "JAX"))
    names = [name for name, _ in gpt.named_parameters()]
    own = torch_checkpoint["optimizer"]["state"]
    assert converted["optimizer"]["state"].keys() == own.keys() and len(own) == len(names)
    index_of = {id(p): i for i, p in enumerate(p for g in torch_optimizer.param_groups for p in g["params"])}
    for name, p in gpt.named_parameters():
        ours, theirs = converted["optimizer"]["state"][index_of[id(p)]], own[index_of[id(p)]]
        assert float(ours["step"]) == float(theirs["step"]) == updates, name
        for key in ("exp_avg", "exp_avg_sq"):
            assert ours[key].shape == theirs[key].shape and ours[key].dtype == theirs[key].dtype == torch.float32
            assert_close_to_scale(ours[key].numpy(), theirs[key].numpy(), MOMENT_RTOL, f"{key} of {name}")

    # torch's state, converted: JAX's own opt_state, leaf by leaf
    converted, _ = jax_side.from_canonical_state(torch_side.to_canonical_state(torch_checkpoint, "torch"))
    for key in ("mu", "nu"):
        ours, theirs = (jw.to_canonical(tree_get(state, key), model) for state in (converted.opt_state, opt_state))
        for name in ours:
            assert_close_to_scale(ours[name], theirs[name], MOMENT_RTOL, f"{key} of {name}")
    for state_name in ("ScaleByAdamState", "ScaleByScheduleState"):
        counts = [int(tree_get(state, "count", filtering=jax_side._in(state_name)))
                  for state in (converted.opt_state, opt_state)]
        assert counts == [updates, updates], state_name


# --- there and back, bit for bit -------------------------------------------------------------------------------------

def jax_checkpoint_leaves(step_dir):
    """(the TrainState's leaves by path, its meta) of a JAX step folder, as the conversion reads it."""
    meta = jax_checkpoint.read_meta(step_dir)
    state, meta = jax_checkpoint.read_train_state(step_dir, jax_side.abstract_state(loads_toml(meta["config_toml"])))
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state)}, meta


def assert_same_leaves(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for path, value in theirs.items():
        assert ours[path].dtype == value.dtype and np.array_equal(ours[path], value), path


def test_jax_to_torch_to_jax_restores_the_same_state_bit_for_bit(runs, tmp_path):
    convert_run(runs / "jax", tmp_path / "torch", "torch-run", step=HALF)
    convert_run(tmp_path / "torch", tmp_path / "jax", "jax-run")
    (ours, our_meta), (theirs, their_meta) = (jax_checkpoint_leaves(d / "checkpoints" / str(HALF))
                                              for d in (tmp_path / "jax", runs / "jax"))
    assert_same_leaves(ours, theirs)
    assert our_meta == their_meta


def save_jax_run(run_dir, state, config, position, extra):
    manager = jax_checkpoint.checkpoint_manager(run_dir / "checkpoints", keep=1, async_save=False)
    jax_checkpoint.save(manager, state, config, position, extra)
    manager.close()


def random_jax_state(config, seed=0):
    """A JAX TrainState in which every number is drawn at random but for what a step boundary fixes (the
    accumulator, the micro-batch counter) and what the counts imply of each other: the loss scale, an update
    skipped now and then, moments in the embedding's padded rows."""
    from optax.tree_utils import tree_set

    rng = np.random.default_rng(seed)
    abstract = jax_side.abstract_state(config)
    step, adam_count = 17, 13

    def draw(leaf):
        if leaf.dtype == np.bool_:
            return np.array(False)
        if np.issubdtype(leaf.dtype, np.integer):
            return rng.integers(1, 1000, leaf.shape).astype(leaf.dtype)
        return np.abs(rng.standard_normal(leaf.shape)).astype(leaf.dtype)

    state = jax.tree.map(draw, abstract)
    opt = state.opt_state
    opt = tree_set(opt, total_notfinite=np.int32(step - adam_count))
    if config.train.accumulation == "multisteps":
        opt = opt._replace(mini_step=np.int32(0), gradient_step=np.int32(step),
                           acc_grads=jax.tree.map(np.zeros_like, opt.acc_grads))
    opt = tree_set(opt, jax_side._in("ScaleByAdamState"), count=np.int32(adam_count))
    opt = tree_set(opt, jax_side._in("ScaleByScheduleState"), count=np.int32(step))
    key = np.asarray(jax.random.split(jax.random.PRNGKey(config.train.seed))[1])
    return state.replace(step=np.int32(step), opt_state=opt, rng=key), {"skipped_steps": 2, "best_val_loss": 3.25}


@pytest.mark.parametrize("accumulation", ["multisteps", "scan"])
def test_an_fp16_state_goes_there_and_back_bit_for_bit(tmp_path, accumulation):
    """fp16 (the loss scale and its growth count), MultiSteps or not, skipped updates (adam's count behind the
    step), the padded rows: JAX -> torch -> JAX, and torch -> JAX -> torch."""
    config = from_dict({"model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, "vocab_size": 100},
                        "train": {"batch_size": 4, "micro_batch_size": 2, "precision": "fp16", "max_steps": 30,
                                  "warmup_steps": 2, "accumulation": accumulation}}, name="fp16")
    from gpt2_jax.sharding import make_mesh
    from gpt2_jax.step import build_trainer

    # the state the conversion writes is the one the trainer restores into (structure, shapes, dtypes)
    trainer = build_trainer(config, make_mesh(config.mesh, jax.devices()[:1]))
    assert jax.tree.map(lambda a: (a.shape, a.dtype), trainer.abstract_state) == jax.tree.map(
        lambda a: (a.shape, a.dtype), jax_side.abstract_state(config))
    state, extra = random_jax_state(config)
    save_jax_run(tmp_path / "jax", state, config, 34, extra)
    convert_run(tmp_path / "jax", tmp_path / "torch", "torch-run")
    convert_run(tmp_path / "torch", tmp_path / "jax-again", "jax-run")
    convert_run(tmp_path / "jax-again", tmp_path / "torch-again", "torch-run")
    (ours, our_meta), (theirs, their_meta) = (jax_checkpoint_leaves(d / "checkpoints" / "17")
                                              for d in (tmp_path / "jax-again", tmp_path / "jax"))
    assert_same_leaves(ours, theirs)
    assert our_meta == their_meta == {**extra, "loader_position": 34, "step": 17, "config_toml": dumps_toml(config)}

    torch_file = checkpoint_path(tmp_path / "torch" / "checkpoints", 17)
    first, again = load_checkpoint(torch_file), load_checkpoint(checkpoint_path(tmp_path / "torch-again" /
                                                                               "checkpoints", 17))
    assert first["scaler"]["scale"] == float(state.loss_scale.scale)
    assert first["scaler"]["_growth_tracker"] == int(state.loss_scale.good_steps)
    assert {float(s["step"]) for s in first["optimizer"]["state"].values()} == {13.0}
    assert first.keys() == again.keys()
    for key, value in first.items():
        if key == "model":
            assert value.keys() == again[key].keys()
            assert all(torch_equal(value[name], again[key][name]) for name in value), key
        elif key == "optimizer":
            assert value["param_groups"] == again[key]["param_groups"]
            assert all(torch_equal(s[k], again[key]["state"][i][k]) for i, s in value["state"].items() for k in s)
        else:
            assert value == again[key], key


def torch_equal(a, b) -> bool:
    import torch

    return a.dtype == b.dtype and torch.equal(a, b)


# --- what cannot continue, said in one line; nothing half written ----------------------------------------------------

def files_of(directory):
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in sorted(directory.rglob("*"))}


def refused(src, dst, to, message, step=None):
    """convert_run refuses with exactly `message`, one line, and writes nothing beside dst."""
    before = files_of(dst.parent)
    with pytest.raises(UserError) as err:
        convert_run(src, dst, to, step)
    assert str(err.value) == message
    assert files_of(dst.parent) == before, "something was written"


def test_the_source_is_only_read(runs, tmp_path):
    before = {name: files_of(runs / name) for name in ("jax", "torch")}
    convert_run(runs / "jax", tmp_path / "a", "torch-run")
    convert_run(runs / "torch" / "checkpoints" / "step_00000010.pt", tmp_path / "b", "jax-run")
    assert {name: files_of(runs / name) for name in ("jax", "torch")} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no temporary folder left beside them
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["checkpoints", "config.toml", "metrics.jsonl"]
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == [
        "best.pt", "best.pt.sha256", "step_00000020.pt", "step_00000020.pt.sha256"]  # its best: step 20's evaluation
    assert loads_toml((tmp_path / "b" / "config.toml").read_text()) == loads_toml(
        (runs / "torch" / "config.toml").read_text())


# --- the best checkpoint -------------------------------------------------------------------------------------------

BEST = {"jax": ("checkpoints", "best", str(STEPS)), "torch": ("checkpoints", "best.pt")}  # where each trainer keeps it


@pytest.mark.parametrize("src, to, trainer", [("jax", "torch-run", "torch"), ("torch", "jax-run", "jax")])
def test_the_best_checkpoint_converts_and_the_continued_run_names_it(runs, tmp_path, src, to, trainer):
    """The source's best (step 20's evaluation, its last step) becomes the destination's, with the same weights, and
    the continued run's closing line names it (it named a best that was not there, issue 29's follow-up)."""
    from gpt2_jax.train import train as train_jax
    from gpt2_torch.train import train as train_torch

    said = convert_run(runs / src, tmp_path / "run", to)
    assert said.splitlines()[0].endswith(f", metrics.jsonl up to it, its best checkpoint (step {STEPS})")
    best = tmp_path / "run" / Path(*BEST[trainer])
    (_, ours), (_, theirs) = read_canonical(best), read_canonical(runs / src / Path(*BEST[src]))
    assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)

    lines = []
    config = loads_toml((tmp_path / "run" / "config.toml").read_text())
    continued = {"sample_tokens": 0, "log": lines.append}
    if trainer == "jax":
        train_jax(config, tmp_path / "run", devices=jax.devices()[:1], **continued)
    else:
        train_torch(config, tmp_path / "run", **continued)
    closing = next(line for line in lines if line.startswith("checkpoints: ")).splitlines()[0]
    val_loss = next(r["val_loss"] for r in map(json.loads, (runs / src / "metrics.jsonl").read_text().splitlines())
                    if r.get("step") == STEPS and "val_loss" in r)
    assert closing.endswith(f", {best} (best, val loss {val_loss:.4f})"), closing


@pytest.mark.parametrize("src, to", [("jax", "torch-run"), ("torch", "jax-run")])
def test_a_step_before_the_best_converts_without_one(runs, tmp_path, src, to):
    """--step 10, where the source's best is step 20's: the best of the steps up to 10 was replaced by a later one
    (the trainers keep one), so the destination has none, and says why."""
    said = convert_run(runs / src, tmp_path / "run", to, step=HALF)
    assert said.splitlines()[0].endswith(f", no best checkpoint (the source's is of step {STEPS}, after step {HALF})")
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == (
        ["step_00000010.pt", "step_00000010.pt.sha256"] if to == "torch-run" else [str(HALF)])


def test_what_cannot_continue_is_refused_in_one_line(runs, tmp_path):
    jax_run, torch_run, dst = runs / "jax", runs / "torch", tmp_path / "out"
    refused(jax_run, dst, "jax-run", f"'{jax_run}' is a JAX run already: --to jax-run continues a PyTorch run in JAX; "
            "to continue this one in PyTorch, convert it --to torch-run")
    refused(jax_run, dst, "torch-run", f"'{jax_run / 'checkpoints'}' has no checkpoint of step 7; --step takes one "
            "of its steps (10, 20)", step=7)
    refused(torch_run / "checkpoints" / "step_00000010.pt", dst, "jax-run",
            f"'{torch_run / 'checkpoints' / 'step_00000010.pt'}' is the checkpoint of step 10, not --step 20; give "
            "its run directory with --step 20, or leave --step out", step=20)
    refused(jax_run, jax_run / "torch", "torch-run",
            f"'{jax_run / 'torch'}' is inside '{jax_run}', which a conversion only reads; choose a destination outside "
            "it")
    (tmp_path / "taken").mkdir()
    refused(jax_run, tmp_path / "taken", "torch-run",
            f"'{tmp_path / 'taken'}' already exists; remove it or choose another destination")

    config, weights = read_canonical(jax_run)
    for form, name, what in (("hf", "hf", "is a Hugging Face directory: weights with no training state to continue; "
                              "start a run from them with --init-from {src}"),
                             ("jax", "weights_jax", "holds weights only (written by convert.py --to jax), no optimizer "
                              "state: nothing to continue; start a run from its weights with --init-from {src}"),
                             ("torch", "weights.pt", "holds weights only (written by convert.py --to torch), no "
                              "optimizer state: nothing to continue; start a run from its weights with --init-from "
                              "{src}")):
        src = tmp_path / name
        write(weights, config, src, form)
        shown = src / "0" if form == "jax" else src  # --to jax writes a checkpoints folder holding step 0
        refused(src, dst, "torch-run" if form != "torch" else "jax-run",
                f"'{src if form == 'hf' else shown}' " + what.format(src=src))


def test_a_damaged_checkpoint_is_skipped_for_the_one_before_unless_it_was_asked_for(runs, tmp_path, capsys):
    source = tmp_path / "torch"
    shutil.copytree(runs / "torch", source)
    newest = source / "checkpoints" / "step_00000020.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the size stays, the checksum does not
    newest.write_bytes(bytes(data))
    with pytest.raises(UserError, match=rf"^checkpoint '{newest}' does not read back \(checkpoint '{newest}' is "
                       r"damaged: .*\); choose another --step$"):
        convert_run(source, tmp_path / "out", "jax-run", step=20)
    assert not (tmp_path / "out").exists()
    convert_run(source, tmp_path / "out", "jax-run")
    assert f"warning: skipping checkpoint {newest}: checkpoint '{newest}' is damaged" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out" / "checkpoints").iterdir() if p.name.isdigit()] == [str(HALF)]
    assert newest.is_file(), "the source keeps its damaged checkpoint where it was"


def test_an_optimizer_state_that_one_count_cannot_hold_is_refused(runs, tmp_path):
    checkpoint = load_checkpoint(runs / "torch" / "checkpoints" / "step_00000010.pt")
    checkpoint["optimizer"]["state"][0]["step"] += 1  # one parameter updated once more than the others
    del checkpoint["format"]
    path = tmp_path / "torch" / "checkpoints" / "step_00000010.pt"
    save_checkpoint(checkpoint, path, keep=1)
    refused(tmp_path / "torch", tmp_path / "out", "jax-run",
            f"'{path}': its AdamW counts different numbers of updates for different parameters ([10, 11]), which the "
            "JAX optimizer's one count cannot hold; continue it in PyTorch, or start from its weights with "
            "--init-from")


def test_a_state_between_micro_batches_is_refused(tmp_path):
    config = from_dict({"model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 16, "vocab_size": 100},
                        "train": {"batch_size": 4, "micro_batch_size": 2, "precision": "fp32", "max_steps": 30,
                                  "warmup_steps": 2, "accumulation": "multisteps"}}, name="mid")
    state, extra = random_jax_state(config)
    save_jax_run(tmp_path / "jax", state.replace(opt_state=state.opt_state._replace(mini_step=np.int32(1))),
                 config, 35, extra)
    refused(tmp_path / "jax", tmp_path / "out", "torch-run",
            f"'{tmp_path / 'jax' / 'checkpoints' / '17'}' was saved between the micro-batches of a step "
            "(train.accumulation=multisteps, micro-batch 1): only a step boundary converts; choose another --step")


def test_with_dropout_the_run_converts_and_says_it_continues_statistically(tmp_path, capsys):
    config = from_dict({"model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 16, "vocab_size": 100,
                                  "dropout": 0.1}, "train": {"precision": "fp32", "max_steps": 30, "warmup_steps": 2}},
                       name="dropout")
    state, extra = random_jax_state(config)
    save_jax_run(tmp_path / "jax", state, config, 17, extra)
    convert_run(tmp_path / "jax", tmp_path / "torch", "torch-run")
    assert capsys.readouterr().err == ("warning: model.dropout=0.1: PyTorch draws other dropout masks than JAX did, so "
                                       "the run continues statistically, not bit for bit (with model.dropout=0 it "
                                       "continues exactly)\n")
    assert (tmp_path / "torch" / "checkpoints" / "step_00000017.pt").is_file()


def test_a_destination_under_a_file_or_where_no_file_can_be_made_is_one_line(runs, tmp_path):
    (tmp_path / "notes.md").write_text("mine")
    with pytest.raises(UserError, match=f"^cannot write '{tmp_path / 'notes.md' / 'out'}': '{tmp_path / 'notes.md'}' "
                       "is a file, not a folder; choose another destination$"):
        convert_run(runs / "jax", tmp_path / "notes.md" / "out", "torch-run")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.md"]
    with pytest.raises(UserError, match="^cannot write '/proc/moved': '/proc' does not take new files; choose "
                       "another destination$"):
        convert_run(runs / "torch", "/proc/moved", "jax-run")


def test_a_conversion_killed_mid_write_leaves_what_the_next_one_removes(runs, tmp_path, monkeypatch, capsys):
    """The destination is written under a locked `.NAME.XXXXXXXX.partial` beside it (gpt2_common.files.partial), as
    the weight conversions' are: a conversion killed mid-write (here: its save fails, and the clean-up that a kill
    would skip is skipped) leaves it for the next conversion to the same destination to remove, and never removes
    one that another process is still writing. (A temporary folder of mkdtemp's stayed for good.)"""
    from gpt2_common import files

    class Killed(BaseException):
        pass

    def killed_mid_save(*args, **kwargs):
        raise Killed

    dst = tmp_path / "moved"
    with files.partial(dst, directory=True) as busy:  # another writer of it, at work throughout
        with monkeypatch.context() as kill:
            kill.setattr(files, "_remove", lambda path: None)
            kill.setattr(torch_side, "save_checkpoint", killed_mid_save)
            with pytest.raises(Killed):
                convert_run(runs / "jax", dst, "torch-run")
        [left] = [p for p in tmp_path.iterdir() if p != busy]
        assert left.name.startswith(".moved.") and left.name.endswith(".partial") and (left / "config.toml").is_file()
        capsys.readouterr()
        convert_run(runs / "jax", dst, "torch-run")
        assert f"warning: removing {left}, left by a write of {dst} that did not finish" in capsys.readouterr().err
        assert not left.exists() and busy.is_dir()
    assert [p.name for p in tmp_path.iterdir() if p != busy] == ["moved"]
    assert (dst / "checkpoints" / "step_00000020.pt").is_file()


@pytest.mark.parametrize("to", ["torch-run", "jax-run"])
def test_a_conversion_that_fails_half_way_leaves_no_destination(runs, tmp_path, monkeypatch, to):
    """The checkpoint's save fails (a full disk) after config.toml and metrics.jsonl are written: nothing appears."""
    src = runs / ("jax" if to == "torch-run" else "torch")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if to == "torch-run":
        monkeypatch.setattr(torch_side, "save_checkpoint", full_disk)
    else:
        monkeypatch.setattr(jax_checkpoint, "save", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        convert_run(src, tmp_path / "out", to)
    assert list(tmp_path.iterdir()) == []
