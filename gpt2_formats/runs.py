"""convert.py --to torch-run | jax-run: a run's whole training state, continued by the other trainer.

The source's checkpoint (--step N's, else the newest that reads back) is read by its own framework's train_state
module (gpt2_jax.train_state, gpt2_torch.train_state) into the canonical train state of gpt2_common.train_state,
and written as a run directory of the other trainer: config.toml (the config the checkpoint was trained with), a
copy of metrics.jsonl up to its step (so that curves and plots go on), and that one checkpoint, written by the
other trainer's own save with its checksum manifest, and the source's best checkpoint as the destination's best
when it is of that step or before (a newer best belongs to steps the continued run replays). The other trainer
resumes it with its plain command. The destination appears whole or not at all: it is written under a hidden
`.NAME.XXXXXXXX.partial` beside it and renamed into place (gpt2_common.files.partial: a conversion killed mid-write
leaves that for the next conversion to the same destination to remove); the source is only read.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from gpt2_common.cli import write_run_config
from gpt2_common.errors import UserError, as_typed
from gpt2_common.faults import warn
from gpt2_common.files import check_destination, partial, share_like_open
from gpt2_common.runlock import check_not_in_use
from gpt2_common.startup import imports_without_gc
from gpt2_common.train_state import (FRAMEWORK_NAMES, CannotContinue, TrainState, WeightsOnly, continuation_warnings,
                                     copy_metrics, run_dir_of)
from gpt2_formats import detect
from gpt2_jax import layout as jax_layout
from gpt2_torch import layout as torch_layout

RUN_FORMS = {"torch-run": "torch", "jax-run": "jax"}  # the destination's form -> the trainer that continues it
_OTHER = {"jax": "torch", "torch": "jax"}
_WEIGHTS_ONLY = {"hf": "a Hugging Face directory", "nanogpt": "a nanoGPT checkpoint", "llmc": "an llm.c model"}


def _train_state_module(framework: str):
    """The framework's train_state module, imported only now (each imports its framework)."""
    with imports_without_gc():
        if framework == "jax":
            from gpt2_jax import train_state
        else:
            from gpt2_torch import train_state
    return train_state


def convert_run(src: str | os.PathLike, dst: str | os.PathLike, to: str, step: int | None = None) -> str:
    """Writes the run directory `dst` for the trainer of form `to` (a key of RUN_FORMS), continuing the other
    trainer's run `src` from --step `step` (default: its newest checkpoint that reads back); returns what it did,
    and on a second line the command that continues it."""
    target, dst = RUN_FORMS[to], Path(dst)
    if dst.exists():
        raise UserError(f"'{dst}' already exists; remove it or choose another destination")
    check_destination(dst)  # not under a file, nor where no file can be made (/proc, a read-only disk)
    check_not_in_use(dst)
    if Path(src).absolute() in dst.absolute().parents:
        raise UserError(f"'{dst}' is inside '{src}', which a conversion only reads; choose a destination outside it")
    form = detect(src)
    if form == target:
        raise UserError(f"'{src}' is a {FRAMEWORK_NAMES[target]} run already: --to {to} continues a "
                        f"{FRAMEWORK_NAMES[_OTHER[target]]} run in {FRAMEWORK_NAMES[target]}; to continue this one "
                        f"in {FRAMEWORK_NAMES[_OTHER[target]]}, convert it --to {_OTHER[target]}-run")
    if form in _WEIGHTS_ONLY:
        raise UserError(f"'{src}' is {_WEIGHTS_ONLY[form]}: weights with no training state to continue; start a "
                        f"run from them with --init-from {src}")
    candidates, strict, where = _checkpoints(Path(src), form, step)  # refused before a framework is imported
    if form == "torch" and strict and _weights_only_pt(candidates[0]):
        raise UserError(f"'{candidates[0]}' holds weights only (written by convert.py --to torch), no optimizer state: "
                        f"nothing to continue; start a run from its weights with --init-from {src}")
    try:
        state, checkpoint = _read_newest(candidates, _train_state_module(form).read_checkpoint, strict, where)
    except WeightsOnly as err:
        raise UserError(f"{err}: nothing to continue; start a run from its weights with --init-from {src}") from None
    if step is not None and state.step != step:
        raise UserError(f"'{checkpoint}' is the checkpoint of step {state.step}, not --step {step}; give its run "
                        f"directory with --step {step}, or leave --step out")
    for line in continuation_warnings(state, form, target):
        warn(line)
    best, said_best = _best_of(where, form, state.step)

    with partial(dst, directory=True) as tmp:  # a kill leaves it for the next conversion here to remove
        write_run_config(state.config, tmp)
        copied = copy_metrics(run_dir_of(checkpoint), tmp, state.step)
        _train_state_module(target).write_run(state, tmp, best)
        share_like_open(tmp)  # mkdtemp makes it private; the result is an ordinary directory
        os.replace(tmp, dst)
    t = state.config.train
    resume = shlex.join(["python", f"scripts/train_{target}.py", "--config", as_typed(str(dst / "config.toml")),
                         "--run-dir", as_typed(str(dst))])
    return (f"{src} ({form} run, checkpoint {checkpoint}) -> {dst} ({to}): step {state.step} of {t.max_steps}, "
            f"AdamW at update {state.adam_count}, loader at micro-batch {state.loader_position}"
            + (", metrics.jsonl up to it" if copied else ", no metrics.jsonl beside it to copy") + said_best
            + f"\ncontinue it with: {resume}")


# --- choosing the source's checkpoint (from the layouts alone: pathlib, no framework) --------------------------------

def _weights_only_pt(path: Path) -> bool:
    """A torch.save file whose record holds no optimizer state (what convert.py --to torch writes), told from the
    record alone (gpt2_torch.layout.peek), so that the refusal comes before torch is imported (1.6 s there)."""
    record = torch_layout.peek(path)
    return record is not None and "optimizer" not in record


def _checkpoints(src: Path, form: str, step: int | None) -> tuple[list[Path], bool, Path]:
    """(checkpoints to try, newest first; strict: only the first, which must read; the folder they are in). A
    checkpoint given itself is the one; in a run, --step N's, else every one (the newest that reads back wins)."""
    if (jax_layout.is_step_dir(src) if form == "jax" else src.is_file()):
        return [src], True, src.parent
    where = src / jax_layout.CHECKPOINTS_DIR if (src / jax_layout.CHECKPOINTS_DIR).is_dir() else src
    if form == "jax":
        found = [(int(d.name), d) for d in jax_layout.step_dirs(where) if jax_layout.is_step_dir(d)]
    else:
        found = [(int(torch_layout.STEP_FILE.match(p.name).group(1)), p) for p in torch_layout.list_checkpoints(where)]
    if not found:
        raise UserError(f"no {FRAMEWORK_NAMES[form]} checkpoint in '{src}'; give a run directory, its checkpoints/ "
                        "folder or one checkpoint of it")
    if step is None:
        return [path for _, path in sorted(found, reverse=True)], False, where
    chosen = [path for s, path in found if s == step]
    if not chosen:
        steps = ", ".join(str(s) for s, _ in sorted(found))
        raise UserError(f"'{where}' has no checkpoint of step {step}; --step takes one of its steps ({steps})")
    return chosen, True, where


def _read_newest(candidates: list[Path], read, strict: bool, where: Path) -> tuple[TrainState, Path]:
    """(read(checkpoint), checkpoint) of the first candidate that reads back; a damaged one is skipped with a warning
    that names it (the source is left as it is: nothing is set aside), unless `strict`. A refusal is final."""
    for path in candidates:
        try:
            return read(path), path
        except CannotContinue:
            raise
        except Exception as err:  # a damaged or unreadable checkpoint, in whatever words its library used
            lines = str(err).strip().splitlines()
            why = lines[0][:300] if lines else type(err).__name__
            if strict:
                raise UserError(f"checkpoint '{path}' does not read back ({why}); choose another --step") from None
            warn(f"skipping checkpoint {path}: {why}; trying the one before")
    raise UserError(f"none of the {len(candidates)} checkpoints in '{where}' reads back; there is nothing to "
                    "convert")


def _best_of(where: Path, form: str, step: int) -> tuple[TrainState | None, str]:
    """(the state of the source's best checkpoint, beside its step checkpoints in `where`, if it is of `step` or
    before; the words that say what became of it). A best of a later step (--step chose an earlier checkpoint) is
    not the best of the steps up to `step`, and the trainers keep one best only: the destination then has none
    until its run evaluates, as a trainer resuming `step` sets a newer best aside."""
    if form == "jax":
        found = [d for d in jax_layout.step_dirs(where / jax_layout.BEST_DIR) if jax_layout.is_step_dir(d)]
    else:
        found = [where / torch_layout.BEST_NAME] if (where / torch_layout.BEST_NAME).is_file() else []
    if not found:
        return None, ""
    path = found[-1]

    def newer(best_step: int) -> str:
        return f", no best checkpoint (the source's is of step {best_step}, after step {step})"

    if form == "jax" and int(path.name) > step:  # its name says so: not read at all
        return None, newer(int(path.name))
    try:
        best = _train_state_module(form).read_checkpoint(path)
    except Exception as err:  # a damaged or unreadable best: the run itself converts all the same
        lines = str(err).strip().splitlines()
        warn(f"the best checkpoint {path} does not read back ({lines[0][:300] if lines else type(err).__name__}); "
             "the converted run has no best checkpoint until it evaluates")
        return None, ", no best checkpoint (the source's does not read back)"
    if best.step > step:
        return None, newer(best.step)
    return best, f", its best checkpoint (step {best.step})"
