"""A run's whole training state in the canonical layout, framework-free: what `convert.py --to torch-run|jax-run`
carries from one trainer to the other so that the run continues exactly where it stopped.

Both trainers take the same steps (parity_tests/): the same AdamW (decoupled decay on ndim >= 2, eps outside the
square root), the same schedule of the step index, the same loader positions. So the state that continues a run is
one set of numbers, which each framework keeps under its own names (gpt2_jax/train_state.py and
gpt2_torch/train_state.py map them, each for its own side):

  canonical              JAX TrainState and orbax meta                 PyTorch checkpoint
  step                   step; ScaleByScheduleState.count (the lr      "step" (the trainer's lr_at index)
                         schedule's position); MultiSteps' gradient_step
  adam_count             ScaleByAdamState.count                        each parameter's optimizer "step"
  weights                params (kernels [in, out])                    "model" (Linear weights [out, in])
  exp_avg, exp_avg_sq    ScaleByAdamState.mu, .nu                      each parameter's "exp_avg", "exp_avg_sq"
  loss_scale             loss_scale.scale, .good_steps (fp16)          "scaler": scale, _growth_tracker (fp16)
  loader_position, skipped_steps, best_val_loss: meta                  the same keys

`adam_count` is the count AdamW's bias correction uses: the updates applied, which is `step` less the updates skipped
(an fp16 overflow, train.nan_policy=skip): optax counts them inside its skip, torch only when optimizer.step() runs.
The learning rate follows `step` in both. Moments are in the layout of the weights (GPT-2's names, [in, out]
matrices, the tokenizer's vocabulary); the embedding's padded rows (model.padded_vocab_size, which both trainers
share) travel beside them in `padding`, so that a state converted there and back is the same bit for bit (those rows
never take part in the loss, their gradient is zero, only weight decay moves them). What neither trainer needs to
take its next step is carried too, for the same reason (`last_update`). The dropout streams are not carried: JAX
folds positions into a key and PyTorch draws from its generators, so with model.dropout > 0 a converted run
continues statistically, not bit for bit (`continuation_warnings`).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gpt2_common.config import Config, ModelConfig
from gpt2_common.errors import UserError
from gpt2_common.metrics import trim_metrics
from gpt2_common.weights import Weights, check_weights

EMBEDDING = "transformer.wte.weight"
PADDED = ("weights", "exp_avg", "exp_avg_sq")  # the keys of TrainState.padding
FRAMEWORK_NAMES = {"jax": "JAX", "torch": "PyTorch"}


class CannotContinue(UserError):
    """A checkpoint that reads back but whose state the other trainer cannot continue (the message says why)."""


class WeightsOnly(CannotContinue):
    """A checkpoint that holds weights and no optimizer state (a conversion's --to jax|torch): nothing to continue."""


@dataclass(frozen=True)
class LossScale:
    """The fp16 dynamic loss scale, which both trainers adjust once a step as torch.amp.GradScaler does."""

    scale: float
    growth_tracker: int  # finite steps in a row since the scale last changed (GradScaler's; JAX's good_steps)


@dataclass(frozen=True)
class LastUpdate:
    """What the JAX optimizer keeps about the update it applied last; its next step overwrites all of it before
    reading any (a PyTorch run keeps none of it: a PyTorch checkpoint converted to JAX takes these defaults)."""

    grad_norm: float = 0.0  # the pre-clip gradient norm (a metric)
    finite: bool = True
    nonfinite_in_a_row: int = 0


@dataclass(frozen=True)
class TrainState:
    config: Config  # the config the checkpoint was trained with
    step: int  # optimizer steps done: the learning-rate schedule's position
    adam_count: int  # updates AdamW applied: its bias correction's count (step less the skipped updates)
    weights: Weights  # canonical
    exp_avg: Weights  # AdamW's first moment, in the canonical layout of the weights
    exp_avg_sq: Weights  # its second moment
    padding: dict[str, np.ndarray]  # PADDED -> the embedding's rows past model.vocab_size, [padded - vocab, n_embd]
    loader_position: int  # the next micro-batch of the train loader
    skipped_steps: int = 0  # updates skipped by train.nan_policy=skip (the run policy's count)
    best_val_loss: float | None = None
    loss_scale: LossScale | None = None  # fp16 only
    last_update: LastUpdate = field(default_factory=LastUpdate)


def check_state(state: TrainState, source: str) -> None:
    """Every tensor where the config puts it, and counts that can belong together; one UserError line otherwise."""
    model = state.config.model
    for name, tensors in (("weights", state.weights), ("first moments", state.exp_avg),
                          ("second moments", state.exp_avg_sq)):
        check_weights(tensors, model, f"the {name} of {source}")
    rows = (model.padded_vocab_size - model.vocab_size, model.n_embd)
    for key in PADDED:
        if state.padding[key].shape != rows:
            raise UserError(f"{source}: the padded embedding rows of its {key} have shape "
                            f"{state.padding[key].shape}, not {rows}")
    if not 0 <= state.adam_count <= state.step:
        raise UserError(f"{source}: its optimizer applied {state.adam_count} updates in {state.step} steps, which "
                        "cannot be; it is not a checkpoint this reads")


def padding_rows(embedding: np.ndarray, model: ModelConfig) -> np.ndarray:
    """The rows past the tokenizer's vocabulary of an embedding-shaped array [padded_vocab, n_embd], copied."""
    return np.array(embedding[model.vocab_size:], dtype=np.float32)


def with_padding(embedding: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """A padded embedding-shaped array whose rows past the vocabulary are `rows` (from padding_rows)."""
    out = np.array(embedding, dtype=np.float32)
    out[out.shape[0] - rows.shape[0]:] = rows
    return out


def continuation_warnings(state: TrainState, source: str, target: str) -> list[str]:
    """What does not continue bit for bit, in lines for the user (empty when the run continues exactly)."""
    dropout = state.config.model.dropout
    if dropout > 0:
        return [f"model.dropout={dropout:g}: {FRAMEWORK_NAMES[target]} draws other dropout masks than "
                f"{FRAMEWORK_NAMES[source]} did, so the run continues statistically, not bit for bit (with "
                "model.dropout=0 it continues exactly)"]
    return []


def run_dir_of(checkpoint: Path) -> Path | None:
    """The run directory a checkpoint is in (the folder above its `checkpoints/`), or None for a loose one."""
    for parent in checkpoint.absolute().parents:
        if parent.name == "checkpoints":
            return parent.parent
    return None


def copy_metrics(run_dir: Path | None, destination: Path, step: int) -> bool:
    """Copies the run's metrics.jsonl up to `step` (the lines of later steps are what the continued run writes
    again); False if there is none to copy."""
    source = None if run_dir is None else run_dir / "metrics.jsonl"
    if source is None or not source.is_file():
        return False
    shutil.copyfile(source, destination / "metrics.jsonl")
    trim_metrics(destination, step)
    return True

