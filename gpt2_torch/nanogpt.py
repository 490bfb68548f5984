"""PyTorch files that are not this trainer's checkpoints: nanoGPT's ckpt.pt (and bare state dicts) read and written,
and what a .pt file holds, for gpt2_formats' detector. The layout itself is gpt2_common.nanogpt's; this module is
only the torch.load / torch.save around it.

Files are read with torch.load(weights_only=True): tensors, numbers, strings and containers only, so no code in a
file runs. nanoGPT's checkpoints hold nothing else; where a file does, the refusal names what is in the way.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt2_common import nanogpt
from gpt2_common.config import Config
from gpt2_common.errors import UserError
from gpt2_common.files import partial, share_like_open
from gpt2_common.faults import warn
from gpt2_common.weights import Weights
from gpt2_torch.layout import FORMAT

CKPT_NAME = "ckpt.pt"  # what nanoGPT's train.py writes into its out_dir


def load_torch_file(path: Path) -> Any:
    """The object in a torch.save file, on the CPU (tensors memory-mapped where the file allows it)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        # torch's message for weights_only names the global the file needs ("Unsupported global: GLOBAL x.y")
        lines = [line.strip() for line in str(err).splitlines() if "Unsupported global" in line]
        what = lines[0].split("Unsupported global:")[-1].strip() if lines else str(err).splitlines()[0]
        raise UserError(f"'{path}' holds more than tensors and plain values ({what}), so it is not read: loading it "
                        "would run code from the file. Save just the state dict and model_args") from None
    except Exception as err:  # zip and pickle errors of many kinds
        first = str(err).splitlines()[0] if str(err) else ""
        raise UserError(f"cannot read '{path}' as a PyTorch file ({type(err).__name__}: {first})") from None


def numpy_tensors(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {k: v.detach().to(torch.float32).numpy() for k, v in state.items() if isinstance(v, torch.Tensor)}


def kind(path: Path) -> str:
    """'torch' (this trainer's checkpoint) or 'nanogpt' (nanoGPT's ckpt.pt or a bare state dict in its names) for a
    PyTorch file; one UserError line that names what the file holds otherwise."""
    obj = load_torch_file(path)
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        return "torch"
    if isinstance(obj, Mapping) and "model" in obj and "model_args" in obj:
        return "nanogpt"
    if nanogpt.is_state_dict(obj):
        if not nanogpt.has_linear_layout(obj):
            raise UserError(f"'{path}' is a Hugging Face GPT-2 state dict ([in, out] Conv1D weights) without its "
                            "config.json; put it in a directory beside the config.json it was saved with")
        return "nanogpt"
    if isinstance(obj, Mapping):
        keys = ", ".join(sorted(map(str, obj))[:6]) or "nothing"
        found = f"a dict of {keys}"
    else:
        found = f"a {type(obj).__name__}"
    raise UserError(f"'{path}' is a PyTorch file holding {found}: not a gpt2_torch checkpoint (format {FORMAT}), "
                    "nanoGPT's ckpt.pt (model, model_args) or a GPT-2 state dict")


def read_nanogpt(path: str | os.PathLike) -> tuple[Config, Weights]:
    """The config and canonical weights of nanoGPT's ckpt.pt (or its out_dir), or of a bare nanoGPT state dict."""
    path = Path(path)
    if path.is_dir():
        path = path / CKPT_NAME
    source = f"'{path}'"
    obj = load_torch_file(path)
    if isinstance(obj, Mapping) and "model" in obj and "model_args" in obj:
        model, _ = nanogpt.model_from_args(obj["model_args"], source)
        state = obj["model"]
        if not isinstance(state, Mapping):
            raise UserError(f"{source}: its 'model' is a {type(state).__name__}, not a state dict")
        if "optimizer" in obj:
            warn(f"{source} is a nanoGPT checkpoint (iter_num {obj.get('iter_num', '?')}): its weights are read, its "
                 "optimizer state is not (--init-from starts a new optimizer)")
    elif nanogpt.is_state_dict(obj):
        model = nanogpt.model_from_tensors(obj, source)
        state = obj
        warn(f"{source} is a bare state dict, which does not record n_head: taking GPT-2's 64-wide heads "
             f"(n_head={model.n_head}) and nanoGPT's exact GELU; save model_args beside it to say otherwise")
    else:
        raise UserError(f"{source} is not nanoGPT's ckpt.pt (a dict of model and model_args) or a state dict")
    if nanogpt.gpt2_vocab(model) != model:
        warn(f"{source}: its {model.vocab_size}-row embedding is GPT-2's 50257 tokens padded for speed; the padding "
             "rows are dropped and their ids masked (the logits of the 50257 tokens are unchanged)")
        model = nanogpt.gpt2_vocab(model)
    weights = nanogpt.to_canonical(numpy_tensors(state), model, source)
    return Config(name=path.parent.name if path.name == CKPT_NAME else path.stem, model=model), weights


def write_nanogpt(weights: Weights, config: Config, path: str | os.PathLike) -> None:
    """A ckpt.pt that nanoGPT's sample.py loads (GPT(GPTConfig(**model_args)).load_state_dict, strict): model,
    model_args (bias=True), iter_num 0 and no optimizer state. A directory destination gets ckpt.pt inside."""
    path = Path(path)
    folder = path if path.suffix != ".pt" else None
    if folder is not None:
        path = folder / CKPT_NAME
    if path.exists():
        raise UserError(f"'{path}' already exists; remove it or choose another destination")
    if config.model.activation != "gelu":
        warn(f"this model uses model.activation={config.model.activation!r}; nanoGPT's MLP computes the exact GELU, "
             "so its logits there will differ from these by about 1e-3")
    arrays, model_args = nanogpt.from_canonical(weights, config.model)
    state = {k: torch.from_numpy(v) for k, v in arrays.items() if k != "lm_head.weight"}
    state["lm_head.weight"] = state["transformer.wte.weight"]  # tied: saved once, as nanoGPT's own state dict is
    # no "dataset" in config: nanoGPT's sample.py then encodes with GPT-2's BPE rather than looking for a meta.pkl
    checkpoint = {"model": state, "model_args": model_args, "iter_num": 0, "best_val_loss": float("inf"),
                  "config": {"converted_from": config.name}}
    if folder is not None and not os.path.lexists(folder):  # the folder appears whole: a kill leaves its partial
        # beside it, for the next conversion here to remove (a folder holding only a ckpt.pt's partial was "already
        # there" to the next conversion, which then refused it)
        with partial(folder, directory=True) as tmp:
            _save(checkpoint, tmp / CKPT_NAME)
            share_like_open(tmp)  # mkdtemp's 0700 -> what mkdir() gives under the umask
            os.replace(tmp, folder)
        return
    with partial(path) as tmp:  # a kill leaves it for the next conversion here to remove
        _save(checkpoint, tmp)
        share_like_open(tmp)  # mkstemp's 0600 -> what open() gives under the umask
        os.replace(tmp, path)


def _save(checkpoint: dict, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(checkpoint, f)

