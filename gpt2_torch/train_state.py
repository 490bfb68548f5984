"""The PyTorch trainer's checkpoint <-> the canonical train state of gpt2_common.train_state, and a PyTorch run's
checkpoint read or written as one (convert.py --to jax-run reads a PyTorch run; --to torch-run writes one).

Where the trainer keeps each number (gpt2_torch/train.py's save):

  "step"                               step (lr_at's index: the trainer sets each update's learning rate from it)
  "optimizer": AdamW's state_dict      per parameter: "step" (adam_count: every parameter the same), "exp_avg",
                                       "exp_avg_sq" in the parameter's own layout (Linear weights [out, in], the
                                       embedding padded), indexed by the order of gpt2_torch.optim.param_groups
  "scaler": GradScaler's state_dict    loss_scale: "scale", "_growth_tracker" (fp16; {} otherwise)
  "rng": every rank's generators       not carried: a converted checkpoint holds none, so each rank seeds its own
                                       dropout stream (as a resume on another process count does)
  "last_update"                        last_update, which only a converted checkpoint holds (the trainer ignores it)

Under DDP every rank holds the same optimizer state and rank 0 saves it, so one state serves any process count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt2_common import train_state as canonical
from gpt2_common.config import Config, dumps_toml, loads_toml
from gpt2_common.errors import UserError
from gpt2_torch import layout
from gpt2_torch.checkpoint import RESUME_KEYS, checkpoint_path, link_or_save, load_checkpoint, save_checkpoint
from gpt2_torch.model import GPT
from gpt2_torch.optim import make_optimizer
from gpt2_torch.weights import from_canonical, to_canonical

def _empty_optimizer(config: Config) -> tuple[torch.optim.AdamW, list[list[str]]]:
    """The trainer's AdamW over a model on the meta device (no memory), and each of its groups' parameter names in
    the order that its state_dict() numbers them; its settings are what the trainer's own state_dict records."""
    with torch.device("meta"):
        model = GPT(config.model)
    optimizer = make_optimizer(model, config.train)
    names = {id(p): name for name, p in model.named_parameters()}
    return optimizer, [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]


def _growth_settings() -> tuple[float, float, int]:
    state = torch.amp.GradScaler("cpu").state_dict()
    return state["growth_factor"], state["backoff_factor"], state["growth_interval"]


def to_canonical_state(checkpoint: dict[str, Any], source: str) -> canonical.TrainState:
    """The canonical state of a checkpoint dict as gpt2_torch.checkpoint.load_checkpoint returns it."""
    if "optimizer" not in checkpoint:
        raise canonical.WeightsOnly(f"{source} holds weights only (written by convert.py --to torch), no optimizer "
                                    "state")
    missing = [key for key in RESUME_KEYS if key not in checkpoint]
    if missing:
        raise UserError(f"{source} lacks {', '.join(missing)}")
    config = loads_toml(checkpoint["config"])
    m = config.model
    saved = checkpoint["optimizer"]
    _, names = _empty_optimizer(config)
    if [len(group["params"]) for group in saved["param_groups"]] != [len(group) for group in names]:
        raise UserError(f"{source}: its optimizer's parameter groups do not match the model of its config")
    by_name = {name: saved["state"].get(index, {}) for group, group_names in zip(saved["param_groups"], names)
               for index, name in zip(group["params"], group_names)}
    counts = {int(round(float(s["step"]))) if "step" in s else 0 for s in by_name.values()}
    if len(counts) != 1:
        raise canonical.CannotContinue(
            f"{source}: its AdamW counts different numbers of updates for different parameters ({sorted(counts)}), "
            "which the JAX optimizer's one count cannot hold; continue it in PyTorch, or start from its weights with "
            "--init-from")
    moments, padding = {}, {"weights": canonical.padding_rows(_numpy(checkpoint["model"][canonical.EMBEDDING]), m)}
    for key in ("exp_avg", "exp_avg_sq"):  # AdamW's names are the canonical state's
        tensors = {name: s[key] if key in s else torch.zeros(checkpoint["model"][name].shape)
                   for name, s in by_name.items()}
        moments[key] = to_canonical(tensors, m)
        padding[key] = canonical.padding_rows(_numpy(tensors[canonical.EMBEDDING]), m)
    scaler, loss_scale = checkpoint["scaler"], None
    if scaler:  # empty when the run is not fp16
        settings = (scaler["growth_factor"], scaler["backoff_factor"], scaler["growth_interval"])
        expected = _growth_settings()
        if settings != expected:
            raise canonical.CannotContinue(
                f"{source}: its fp16 loss scale grows by {settings[0]:g} every {settings[2]} steps and backs off by "
                f"{settings[1]:g}, where both trainers' grows by {expected[0]:g} every {expected[2]} and backs off "
                f"by {expected[1]:g}")
        loss_scale = canonical.LossScale(scale=float(scaler["scale"]), growth_tracker=int(scaler["_growth_tracker"]))
    last = checkpoint.get("last_update") or {}
    best = checkpoint.get("best_val_loss")
    result = canonical.TrainState(
        config=config, step=int(checkpoint["step"]), adam_count=counts.pop(),
        weights=to_canonical(checkpoint["model"], m), exp_avg=moments["exp_avg"], exp_avg_sq=moments["exp_avg_sq"],
        padding=padding, loader_position=int(checkpoint["loader_position"]),
        skipped_steps=int(checkpoint.get("skipped_steps", 0)), best_val_loss=None if best is None else float(best),
        loss_scale=loss_scale, last_update=canonical.LastUpdate(**last))
    canonical.check_state(result, source)
    return result


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().to(torch.float32).numpy()


def from_canonical_state(state: canonical.TrainState) -> dict[str, Any]:
    """The checkpoint dict that the PyTorch trainer saves and resumes (gpt2_torch/train.py), for `state`."""
    config = state.config
    m = config.model

    def padded(weights: canonical.Weights, key: str) -> dict[str, torch.Tensor]:
        tensors = from_canonical(weights, m)  # lm_head.weight is the embedding itself: the rows go into both
        tensors[canonical.EMBEDDING][m.vocab_size:] = torch.from_numpy(state.padding[key])
        return tensors

    optimizer, names = _empty_optimizer(config)
    saved = optimizer.state_dict()
    exp_avg, exp_avg_sq = padded(state.exp_avg, "exp_avg"), padded(state.exp_avg_sq, "exp_avg_sq")
    for group, group_names in zip(saved["param_groups"], names):
        for index, name in zip(group["params"], group_names):
            # a float32 count, as AdamW keeps it (its load_state_dict moves it to a fused kernel's device)
            saved["state"][index] = {"step": torch.tensor(float(state.adam_count), dtype=torch.float32),
                                     "exp_avg": exp_avg[name], "exp_avg_sq": exp_avg_sq[name]}
    scaler = {}
    if config.train.precision == "fp16" and state.loss_scale is not None:
        scaler = torch.amp.GradScaler("cpu", init_scale=state.loss_scale.scale).state_dict()
        scaler["_growth_tracker"] = state.loss_scale.growth_tracker
    last = state.last_update
    return {"step": state.step, "loader_position": state.loader_position, "model": padded(state.weights, "weights"),
            "optimizer": saved, "scaler": scaler, "rng": [], "config": dumps_toml(config),
            "skipped_steps": state.skipped_steps, "best_val_loss": state.best_val_loss,
            "last_update": {"grad_norm": last.grad_norm, "finite": last.finite,
                            "nonfinite_in_a_row": last.nonfinite_in_a_row}}


# --- a PyTorch run's checkpoint --------------------------------------------------------------------------------------

def read_checkpoint(file: Path) -> canonical.TrainState:
    """The canonical state of one .pt checkpoint of a PyTorch run (its checksum checked first); nothing in the run
    changes (gpt2_formats.runs chooses the file)."""
    return to_canonical_state(load_checkpoint(file), f"'{file}'")


def write_run(state: canonical.TrainState, run_dir: Path, best: canonical.TrainState | None = None) -> Path:
    """Writes `state` as the one checkpoint of the PyTorch run directory `run_dir` (checkpoints/step_XXXXXXXX.pt
    with its checksum file) through the trainer's own save, and `best` (if any) as its best.pt, as the trainer
    writes it (a link to the step's file when it is of the same step); returns the step file's path. The caller
    renames run_dir into place."""
    path = checkpoint_path(Path(run_dir) / layout.CHECKPOINTS_DIR, state.step)
    save_checkpoint(from_canonical_state(state), path, keep=1)
    if best is not None:
        link_or_save(from_canonical_state(best), path.parent / layout.BEST_NAME,
                     path if best.step == state.step else None)
    return path
