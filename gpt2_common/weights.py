"""The canonical GPT-2 weight layout, where JAX params, torch state_dicts and Hugging Face directories meet.

Canonical weights are a flat dict of float32 numpy arrays under the names and shapes of Hugging Face's
GPT2LMHeadModel, which are OpenAI's: `transformer.h.{i}.attn.c_attn.weight` is a Conv1D weight of shape [in, out],
the embedding has the tokenizer's (unpadded) vocabulary, and the output head is tied to `transformer.wte.weight`, so
it is not stored. On disk they are a directory with config.json and model.safetensors that
`transformers.GPT2LMHeadModel.from_pretrained(dir)` loads as it is, with GPT-2's tokenizer files beside them;
reading also takes what transformers itself writes (sharded or not, safetensors, or pytorch_model.bin through a
reader that the caller hands in, since reading that needs PyTorch and this package imports no framework).
Everything is checked before anything is written. Which form a path holds is gpt2_formats' question, not this
module's.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import numpy as np

from gpt2_common.config import GPT2_VOCAB_SIZE, Config, ModelConfig, validate
from gpt2_common.errors import UserError
from gpt2_common.tokenizer import hf_tokenizer_files
from gpt2_common.files import partial, share_like_open

Weights = dict[str, np.ndarray]

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SAFETENSORS_FILE = "model.safetensors"
# What transformers writes, in the order we prefer them; the index files list the shards of a sharded save.
WEIGHT_FILES = (SAFETENSORS_FILE, "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
LINEAR_LAYERS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
GPT2_EOT_TOKEN = 50256
# HF's activation_function names -> model.activation; the first of each is what we write
HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
_LAYER_PREFIX = "transformer.h."


# --- the layout ---------------------------------------------------------------------------------------------------

def block_shapes(n_embd: int) -> dict[str, tuple[int, ...]]:
    """The tensors of one transformer block (names after `transformer.h.{i}.`) with their canonical shapes."""
    c = n_embd
    return {
        "ln_1.weight": (c,), "ln_1.bias": (c,),
        "attn.c_attn.weight": (c, 3 * c), "attn.c_attn.bias": (3 * c,),
        "attn.c_proj.weight": (c, c), "attn.c_proj.bias": (c,),
        "ln_2.weight": (c,), "ln_2.bias": (c,),
        "mlp.c_fc.weight": (c, 4 * c), "mlp.c_fc.bias": (4 * c,),
        "mlp.c_proj.weight": (4 * c, c), "mlp.c_proj.bias": (c,),
    }


def _iter_shapes(model: ModelConfig):
    c = model.n_embd
    yield "transformer.wte.weight", (model.vocab_size, c)
    yield "transformer.wpe.weight", (model.block_size, c)
    block = block_shapes(c)
    for i in range(model.n_layer):
        for name, shape in block.items():
            yield f"{_LAYER_PREFIX}{i}.{name}", shape
    yield "transformer.ln_f.weight", (c,)
    yield "transformer.ln_f.bias", (c,)


def canonical_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a GPT-2 of this config has, in a stable order, with its canonical shape."""
    return dict(_iter_shapes(model))


def _expected_shape(name: str, model: ModelConfig) -> tuple[int, ...] | None:
    """canonical_shapes(model).get(name), without building the whole table (a config may claim 10**7 layers)."""
    if name.startswith(_LAYER_PREFIX):
        index, _, rest = name[len(_LAYER_PREFIX):].partition(".")
        if not index.isdigit() or str(int(index)) != index or int(index) >= model.n_layer:
            return None
        return block_shapes(model.n_embd).get(rest)
    c = model.n_embd
    return {"transformer.wte.weight": (model.vocab_size, c), "transformer.wpe.weight": (model.block_size, c),
            "transformer.ln_f.weight": (c,), "transformer.ln_f.bias": (c,)}.get(name)


def is_linear_weight(name: str) -> bool:
    """True for the four matrices that GPT-2 keeps as Conv1D [in, out] and nn.Linear keeps as [out, in]."""
    return name.endswith(".weight") and any(f".{layer}." in name for layer in LINEAR_LAYERS)


def canonicalize(state: Mapping[str, Any], source: str) -> Weights:
    """Canonical names and float32 arrays from the keys transformers and nanoGPT-style code write.

    GPT2Model saves without the `transformer.` prefix; older GPT-2 files carry the causal-mask buffers `attn.bias`
    and `attn.masked_bias`, which are not weights. `lm_head.weight` is accepted when it is tied (equal to wte).
    """
    weights: Weights = {}
    head = None
    for key, value in state.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        if key == "lm_head.weight":
            head = value
            continue
        name = key if key.startswith("transformer.") else f"transformer.{key}"
        weights[name] = np.asarray(value, dtype=np.float32)
    wte = weights.get("transformer.wte.weight")
    if head is not None and wte is not None and not np.array_equal(np.asarray(head, dtype=np.float32), wte):
        raise UserError(f"{source} has an output head (lm_head.weight) that differs from the token embedding; "
                        "this GPT-2 ties the two, so untied weights cannot be loaded")
    return weights


def check_weights(weights: Mapping[str, np.ndarray], model: ModelConfig, source: str) -> None:
    """One UserError line for the first thing wrong: missing tensors, extra tensors, or a shape that differs.

    The work is proportional to the tensors present, not to what the config claims: a config.json that says
    n_layer = 10**7 is answered at once, before anything of that size is built or allocated.
    """
    dims = (f"n_layer={model.n_layer}, n_embd={model.n_embd}, block_size={model.block_size}, "
            f"vocab_size={model.vocab_size}")
    expected_count = 4 + len(block_shapes(model.n_embd)) * model.n_layer
    extra = [k for k in weights if _expected_shape(k, model) is None]
    if len(weights) - len(extra) < expected_count:
        missing = list(itertools.islice((k for k, _ in _iter_shapes(model) if k not in weights), 3))
        raise UserError(f"{source} lacks {expected_count - len(weights) + len(extra)} of the {expected_count} "
                        f"tensors of a GPT-2 with {dims} (e.g. {', '.join(missing)}); is it a GPT-2 checkpoint of "
                        "this config?")
    if extra:
        raise UserError(f"{source} holds {len(extra)} tensors that a GPT-2 with {dims} does not have "
                        f"(e.g. {', '.join(extra[:3])}); does its config say the right n_layer?")
    wrong = [(k, tuple(v.shape), _expected_shape(k, model)) for k, v in weights.items()
             if tuple(v.shape) != _expected_shape(k, model)]
    if wrong:
        name, got, want = wrong[0]
        more = f" ({len(wrong) - 1} more tensors differ)" if len(wrong) > 1 else ""
        raise UserError(f"{source}: {name} has shape {got} but a GPT-2 with {dims} needs {want}{more}")


def fit_to_model(weights: Weights, model: ModelConfig, target: ModelConfig, source: str) -> Weights:
    """Weights of `model`'s shape made ready for a model built from `target` (a trainer's --init-from).

    The width, depth, heads and vocabulary must match. A shorter target context keeps the first block_size learned
    positions (as nanoGPT's crop_block_size does, to fine-tune GPT-2 on shorter sequences); a longer one has no
    learned positions to start from, so it is an error.
    """
    check_fits(model, target, source)
    fitted = dict(weights)
    fitted["transformer.wpe.weight"] = weights["transformer.wpe.weight"][: target.block_size]
    return fitted


def check_fits(model: ModelConfig, target: ModelConfig, source: str) -> None:
    """One UserError line, naming the model.* keys to set, if weights of `model`'s shape cannot start a model built
    from `target` (fit_to_model's check, which a trainer also makes from a source's config alone, before its
    framework loads)."""
    fixes = [f"model.{key}={getattr(model, key)}" for key in ("n_layer", "n_head", "n_embd", "vocab_size",
                                                              "activation")
             if getattr(model, key) != getattr(target, key)]
    if target.block_size > model.block_size:
        fixes.append(f"model.block_size={model.block_size} (or less)")
    if fixes:
        raise UserError(f"{source} is a different GPT-2 than the config: {_vocab_mismatch(model, target)}set "
                        f"{' '.join(fixes)} (e.g. with --set) to start from it")


def _vocab_mismatch(model: ModelConfig, target: ModelConfig) -> str:
    if model.vocab_size == target.vocab_size:
        return ""
    if model.vocab_size > target.padded_vocab_size:
        return (f"its {model.vocab_size}-token vocabulary does not fit the config's embedding of "
                f"{target.padded_vocab_size} rows (model.vocab_size={target.vocab_size}); ")
    return f"its vocabulary has {model.vocab_size} tokens, the config's {target.vocab_size}; "


def pad_vocab(wte: np.ndarray, model: ModelConfig) -> np.ndarray:
    """The embedding grown to the padded vocabulary with zero rows: the model masks those ids' logits to -inf, so
    the rows never take probability and never receive gradient through the softmax."""
    rows = model.padded_vocab_size - wte.shape[0]
    return np.concatenate([wte, np.zeros((rows, wte.shape[1]), wte.dtype)]) if rows else wte


# --- config.json ----------------------------------------------------------------------------------------------------

def hf_config(model: ModelConfig) -> dict[str, Any]:
    """The GPT2Config fields for this model, as transformers writes them to config.json."""
    eot = GPT2_EOT_TOKEN if model.vocab_size > GPT2_EOT_TOKEN else None  # a toy vocabulary has no GPT-2 EOT id
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": model.vocab_size,
        "n_positions": model.block_size,
        "n_embd": model.n_embd,
        "n_layer": model.n_layer,
        "n_head": model.n_head,
        "n_inner": None,
        "activation_function": next(hf for hf, ours in HF_ACTIVATIONS.items() if ours == model.activation),
        "resid_pdrop": model.dropout,
        "embd_pdrop": model.dropout,
        "attn_pdrop": model.dropout,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "use_cache": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "tie_word_embeddings": True,
        "dtype": "float32",
        "torch_dtype": "float32",  # the name transformers 4.x reads
    }


def model_config_from_hf(hf: Mapping[str, Any], source: str) -> ModelConfig:
    """The ModelConfig of a GPT2Config, refusing the GPT-2 variants that this model does not implement."""
    if hf.get("model_type") != "gpt2":
        raise UserError(f"{source} is a '{hf.get('model_type')}' model; only GPT-2 (model_type gpt2) is supported")
    try:
        n_embd, n_head = int(hf["n_embd"]), int(hf["n_head"])
        model = ModelConfig(n_layer=int(hf["n_layer"]), n_head=n_head, n_embd=n_embd,
                            block_size=int(hf.get("n_positions", hf.get("n_ctx"))), vocab_size=int(hf["vocab_size"]),
                            dropout=float(hf.get("resid_pdrop", 0.1)),
                            activation=HF_ACTIVATIONS.get(hf.get("activation_function", "gelu_new"), "?"))
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{source}: config.json lacks or garbles {err}; it needs n_layer, n_head, n_embd, "
                        "n_positions and vocab_size") from None
    unsupported = {
        "activation_function": hf.get("activation_function", "gelu_new") not in HF_ACTIVATIONS,
        "n_inner": hf.get("n_inner") not in (None, 4 * n_embd),
        "layer_norm_epsilon": not math.isclose(hf.get("layer_norm_epsilon", 1e-5), 1e-5),
        "scale_attn_weights": not hf.get("scale_attn_weights", True),
        "scale_attn_by_inverse_layer_idx": hf.get("scale_attn_by_inverse_layer_idx", False),
        "add_cross_attention": hf.get("add_cross_attention", False),
        "tie_word_embeddings": not hf.get("tie_word_embeddings", True),
    }
    for key, differs in unsupported.items():
        if differs:
            raise UserError(f"{source}: config.json sets {key}={hf.get(key)!r}, a GPT-2 variant this model does not "
                            "implement (it has gelu_new or gelu, a 4*n_embd MLP, eps 1e-5, scaled attention and a "
                            "tied head)")
    validate(Config(model=model))
    return model


# --- files ----------------------------------------------------------------------------------------------------------

def is_hf_dir(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG_FILE).is_file()


def orphan_weight_file(path: str | os.PathLike) -> str | None:
    """The name of a transformers weight file in a directory that lacks its config.json (None if there is none)."""
    return next((name for name in WEIGHT_FILES if (Path(path) / name).is_file()), None)


def save_hf(weights: Mapping[str, np.ndarray], model: ModelConfig, directory: str | os.PathLike,
            overwrite: bool = False) -> None:
    """Writes config.json and model.safetensors into `directory` atomically: a reader sees all of it or none.

    A model of GPT-2's vocabulary also gets GPT-2's tokenizer (vocab.json, merges.txt, tokenizer_config.json) and a
    generation_config.json, so that AutoTokenizer and pipeline("text-generation") load the directory offline.
    """
    from safetensors.numpy import save_file

    directory = Path(directory)
    check_weights(weights, model, "the weights to save")
    if directory.exists() and not overwrite and (not directory.is_dir() or any(directory.iterdir())):
        raise UserError(f"'{directory}' already exists and is not empty; remove it or choose another destination")
    with partial(directory, directory=True) as tmp:  # a kill leaves it for the next save here to remove
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config(model), indent=2) + "\n")
        tensors = {k: np.ascontiguousarray(weights[k], dtype=np.float32) for k in canonical_shapes(model)}
        # transformers refuses safetensors files whose metadata does not name the framework that wrote them.
        save_file(tensors, tmp / SAFETENSORS_FILE, metadata={"format": "pt"})
        if model.vocab_size == GPT2_VOCAB_SIZE:
            for name, data in hf_tokenizer_files(model.block_size).items():
                (tmp / name).write_bytes(data)
            # pad = eos, as GPT-2 has no padding token: pipeline() then batches without a warning
            generation = {"bos_token_id": GPT2_EOT_TOKEN, "eos_token_id": GPT2_EOT_TOKEN,
                          "pad_token_id": GPT2_EOT_TOKEN}
            (tmp / GENERATION_CONFIG_FILE).write_text(json.dumps(generation, indent=2) + "\n")
        share_like_open(tmp)  # mkdtemp makes it private; the result is an ordinary directory
        _replace_dir(tmp, directory)


def _replace_dir(new: Path, directory: Path) -> None:
    if directory.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
        os.replace(directory, old / directory.name)
        os.replace(new, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, directory)


TorchFileReader = Callable[[Path], dict[str, np.ndarray]]


def load_hf(directory: str | os.PathLike, read_torch_file: TorchFileReader | None = None
            ) -> tuple[ModelConfig, Weights]:
    """The config and canonical weights of a Hugging Face GPT-2 directory (ours or one transformers wrote).

    `read_torch_file` reads a pytorch_model.bin (gpt2_torch.weights.read_state_dict_file); without it, a directory
    whose weights are only in that form is refused with a line that says what reading it needs.
    """
    directory = Path(directory)
    source = f"'{directory}'"
    if not directory.is_dir():
        raise UserError(f"{source} is not a directory; a Hugging Face GPT-2 is a directory with {CONFIG_FILE} and "
                        f"{SAFETENSORS_FILE}")
    if not (directory / CONFIG_FILE).is_file():
        raise UserError(f"{source} has no {CONFIG_FILE}; a Hugging Face GPT-2 directory needs it beside its weights")
    try:
        hf = json.loads((directory / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{source}: {CONFIG_FILE} is not valid JSON ({err})") from None
    model = model_config_from_hf(hf, source)
    weights = canonicalize(_read_tensors(directory, source, read_torch_file), source)
    check_weights(weights, model, source)
    return model, weights


def _read_tensors(directory: Path, source: str, read_torch_file: TorchFileReader | None) -> dict[str, np.ndarray]:
    found = [name for name in WEIGHT_FILES if (directory / name).is_file()]
    if not found:
        present = ", ".join(sorted(p.name for p in directory.iterdir())) or "nothing"
        raise UserError(f"{source} holds no weights in a format this reads ({' or '.join(WEIGHT_FILES[::2])}); "
                        f"found: {present}")
    name = found[0]
    files = [directory / name]
    if name.endswith(".index.json"):
        weight_map = json.loads((directory / name).read_text()).get("weight_map", {})
        files = [directory / shard for shard in sorted(set(weight_map.values()))]
    read = _read_safetensors if ".safetensors" in name else read_torch_file
    if read is None:
        raise UserError(f"{source} holds its weights as {name}, which only PyTorch reads; install torch, or save "
                        "the model as safetensors")
    state: dict[str, np.ndarray] = {}
    for path in files:
        if not path.is_file():
            raise UserError(f"{source}: {name} names the shard {path.name}, which is missing")
        state.update(read(path))
    return state


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="np") as f:
            if any(f.get_slice(k).get_dtype() == "BF16" for k in f.keys()):
                import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, which safetensors then hands us)
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise UserError(f"cannot read '{path}': {err}") from None
