"""Every form a GPT-2's weights come in, told apart in one place and read or written through one door.

    jax      a gpt2_jax run directory, its checkpoints/ or one step folder (orbax)       gpt2_jax.checkpoint
    torch    a gpt2_torch run directory, its checkpoints/ or one .pt checkpoint          gpt2_torch.checkpoint
    hf       a Hugging Face directory (config.json + safetensors or pytorch_model.bin)    gpt2_common.weights
    nanogpt  nanoGPT's ckpt.pt (or the out_dir holding it), or a bare nanoGPT state dict   gpt2_torch.nanogpt
    llmc     an llm.c model file (gpt2_124M.bin and its kin)                              gpt2_common.llmc

and names of what lives on the Hugging Face Hub: `hf:REPO[@REVISION]` (`hf:gpt2` ... `hf:gpt2-xl` are OpenAI's
GPT-2s), fetched into the user's Hugging Face cache by gpt2_common.hub and then read as the hf form. A bare word is
always a local path.

The entry points (scripts, and the trainers' --init-from) use this package; the layers below never do: gpt2_common
imports no framework, and each framework package owns its own checkpoint layout (gpt2_jax.layout,
gpt2_torch.layout) and files. Detection looks at names, directory layouts and a file's first bytes, so it imports
no framework; JAX or PyTorch is imported only to read or write a form that needs it, or to look inside a PyTorch
pickle (a gpt2_torch checkpoint and nanoGPT's ckpt.pt are both .pt files).
"""

from __future__ import annotations

import os
from pathlib import Path

from gpt2_common import hub, llmc
from gpt2_common.config import Config, ModelConfig
from gpt2_common.errors import UserError
from gpt2_common.startup import imports_without_gc
from gpt2_common.weights import Weights, fit_to_model, is_hf_dir, load_hf, orphan_weight_file, save_hf
from gpt2_jax import layout as jax_layout
from gpt2_torch import layout as torch_layout

FORMS = ("jax", "torch", "hf", "nanogpt", "llmc")
READS = ("a JAX run or checkpoint (orbax), a PyTorch run or .pt checkpoint, a Hugging Face directory "
         "(config.json), nanoGPT's ckpt.pt or state dict, or an llm.c model .bin")
NANOGPT_CKPT = "ckpt.pt"
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6
_PICKLE_MAGIC = b"\x80"  # the legacy torch.save format starts with a pickle protocol opcode


def local(path: str | os.PathLike) -> Path:
    """The local path of a weights source: a Hub name (hf:...) fetched into the Hugging Face cache, anything else as
    it is (never the network)."""
    if hub.is_name(path):
        return hub.weights_folder(path)
    return Path(path)


def detect(path: str | os.PathLike) -> str:
    """Which of FORMS `path` holds, from its files alone; one UserError line naming what it found otherwise."""
    if hub.is_name(path):
        local(path)
        return "hf"
    path = Path(path)
    if not path.exists():
        raise UserError(f"'{path}' does not exist{hub.missing_hint(path)}")
    if path.is_file():
        return _detect_file(path)
    if is_hf_dir(path):
        return "hf"
    orphan = orphan_weight_file(path)
    if orphan:
        raise UserError(f"'{path}' has {orphan} but no config.json; a Hugging Face GPT-2 directory needs the "
                        "config.json that was saved with the weights")
    forms = [form for form, holds in (("torch", torch_layout.holds_checkpoints), ("jax", jax_layout.holds_checkpoints),
                                      ("nanogpt", lambda p: (p / NANOGPT_CKPT).is_file())) if holds(path)]
    if len(forms) == 1:
        return forms[0]
    if forms:
        raise UserError(f"'{path}' holds checkpoints of more than one form ({', '.join(forms)}); give the one you "
                        "mean (a step_*.pt file, an orbax step folder or ckpt.pt)")
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    found = ", ".join(entries[:6]) + (f" and {len(entries) - 6} more" if len(entries) > 6 else "") or "nothing"
    raise UserError(f"'{path}' is not a weights source this reads (found: {found}); it reads {READS}")


def _detect_file(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(8)
    if llmc.is_model_file(head):
        return "llmc"
    if llmc.is_token_shard(head):
        raise UserError(f"'{path}' is an llm.c token shard (magic {llmc.TOKEN_SHARD_MAGIC}), not a model; "
                        f"it reads {READS}")
    if head.startswith((_ZIP_MAGIC, _PICKLE_MAGIC)):
        record = torch_layout.peek(path)  # the record alone, without torch (1.5 s to import): enough for most files
        if record is not None and record.get("format") == torch_layout.FORMAT:
            return "torch"
        if record is not None and "model" in record and "model_args" in record:
            return "nanogpt"
        return _torch_side().kind(path)  # a legacy pickle, a bare state dict, or something to name
    found = f"{path.stat().st_size} bytes starting {head[:4].hex(' ') or '(empty)'}"
    raise UserError(f"'{path}' is a file of unknown format ({found}); it reads {READS}")


def _torch_side():
    """gpt2_torch.nanogpt, which looks inside PyTorch files; a line saying so if PyTorch is not installed."""
    try:
        with imports_without_gc():
            from gpt2_torch import nanogpt
    except ImportError as err:
        raise UserError(f"reading a PyTorch file needs PyTorch ({err}); install torch") from None
    return nanogpt


# --- reading and writing --------------------------------------------------------------------------------------------

def _read_torch_state(path: Path):
    with imports_without_gc():
        from gpt2_torch.weights import read_state_dict_file

    return read_state_dict_file(path)


def read_canonical(path: str | os.PathLike) -> tuple[Config, Weights]:
    """The config and canonical weights of any form this reads (or a Hub name); each framework is imported only for
    its own form."""
    form = detect(path)
    if form == "hf":
        model, weights = load_hf(local(path), read_torch_file=_read_torch_state)
        name = hub.parse(path).repo.rsplit("/", 1)[-1] if hub.is_name(path) else Path(path).name
        return Config(name=name, model=model), weights
    if form == "llmc":
        return llmc.read_llmc(path)
    if form == "nanogpt":
        return _torch_side().read_nanogpt(path)
    with imports_without_gc():
        if form == "torch":
            from gpt2_torch.checkpoint import read_weights
        else:
            from gpt2_jax.checkpoint import read_weights
    return read_weights(path)


def write(weights: Weights, config: Config, dst: str | os.PathLike, to: str, dtype: str = "fp32") -> None:
    """Writes canonical weights in form `to` (one of FORMS); `dtype` (fp32 | bf16) is llm.c's choice alone."""
    if to not in FORMS:
        raise UserError(f"cannot write form {to!r}; choose one of {', '.join(FORMS)}")
    if dtype != "fp32" and to != "llmc":
        raise UserError(f"--dtype {dtype} is for --to llmc; the other forms keep fp32 weights")
    if to == "hf":
        save_hf(weights, config.model, dst)
    elif to == "llmc":
        llmc.write_llmc(weights, config.model, dst, dtype)
    elif to == "nanogpt":
        _torch_side().write_nanogpt(weights, config, dst)
    else:
        with imports_without_gc():
            if to == "torch":
                from gpt2_torch.checkpoint import write_weights
            else:
                from gpt2_jax.checkpoint import write_weights
        write_weights(weights, config, dst)


def init_weights(path: str | os.PathLike, model: ModelConfig) -> Weights:
    """--init-from: the canonical weights at `path`, in any form, made ready for a model built from `model` (the
    run's config); one UserError line if they are a different GPT-2 (the fix names the model.* keys to set)."""
    source, weights = read_canonical(path)
    return fit_to_model(weights, source.model, model, f"--init-from '{path}'")


# --- run directories ------------------------------------------------------------------------------------------------

def check_framework(checkpoint_dir: str | os.PathLike, framework: str) -> None:
    """A run directory holds one trainer's checkpoints: resuming the other's, or writing beside them, is refused."""
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        return
    foreign = jax_layout.step_dirs(directory) if framework == "torch" else torch_layout.list_checkpoints(directory)
    if foreign:
        other, script = ("JAX", "train_jax.py") if framework == "torch" else ("PyTorch", "train_torch.py")
        raise UserError(f"'{directory}' holds {other} checkpoints ({foreign[-1].name}), which this trainer cannot "
                        f"resume: continue with scripts/{script}, give another --run-dir, or start from their "
                        f"weights with --init-from {directory.parent}")
