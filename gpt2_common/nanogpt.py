"""nanoGPT's weights <-> the canonical layout, as plain numpy (gpt2_torch.nanogpt reads and writes the files).

nanoGPT's train.py saves {'model': state_dict, 'model_args': {...}, 'optimizer', 'iter_num', 'best_val_loss',
'config'}; its state-dict names are GPT-2's, but its Linear weights are [out, in], its keys carry `_orig_mod.` when
the model was torch.compile'd, its output head `lm_head.weight` is the embedding itself, and a `bias=False` model
has no biases at all (in Linears and LayerNorms), which is exactly a model whose biases are zero. Its MLP uses the
exact erf GELU, so an import is model.activation = "gelu". Its GPT-2 runs pad the vocabulary to 50304 rows; that
is GPT-2's 50257 tokens plus padding, which is what this project's padded vocabulary is too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from gpt2_common.config import GPT2_VOCAB_SIZE, Config, ModelConfig, validate
from gpt2_common.errors import UserError
from gpt2_common.weights import Weights, block_shapes, canonical_shapes, check_weights, is_linear_weight

MODEL_ARG_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")
WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile's and DDP's wrappers
NANOGPT_GPT2_VOCAB = 50304  # nanoGPT's default: GPT-2's 50257 padded to a multiple of 64
GPT2_HEAD_DIM = 64  # every GPT-2 size and nanoGPT preset has 64-wide heads


def strip_prefixes(state: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in state.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def is_state_dict(state: Any) -> bool:
    """Whether an object is a GPT-2 state dict in nanoGPT's names (a mapping with the token embedding)."""
    return isinstance(state, Mapping) and "transformer.wte.weight" in strip_prefixes(state)


def has_linear_layout(state: Mapping[str, Any]) -> bool:
    """nanoGPT's (and torch's) c_attn weight is [3C, C]; a Hugging Face state dict's Conv1D weight is [C, 3C]."""
    state = strip_prefixes(state)
    c = state["transformer.wte.weight"].shape[1]
    attn = state.get("transformer.h.0.attn.c_attn.weight")
    return attn is None or tuple(attn.shape) == (3 * c, c)


def model_from_args(model_args: Any, source: str) -> tuple[ModelConfig, bool]:
    """(ModelConfig, bias) from nanoGPT's model_args, refused in one line when a key is missing or garbled."""
    if not isinstance(model_args, Mapping):
        raise UserError(f"{source}: its model_args is {type(model_args).__name__}, not nanoGPT's dict of "
                        f"{', '.join(MODEL_ARG_KEYS)}")
    try:
        ints = {key: int(model_args[key]) for key in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")}
        dropout = float(model_args.get("dropout", 0.0))
        bias = bool(model_args.get("bias", True))
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{source}: its model_args lacks or garbles {err}; nanoGPT's train.py saves "
                        f"{', '.join(MODEL_ARG_KEYS)}") from None
    model = ModelConfig(**ints, dropout=dropout, activation="gelu")
    try:
        validate(Config(model=model))
    except UserError as err:
        raise UserError(f"{source}: its model_args describe no GPT-2 this builds: {err}") from None
    return model, bias


def model_from_tensors(state: Mapping[str, Any], source: str) -> ModelConfig:
    """The model of a bare state dict (no model_args): shapes from its tensors, the head count from GPT-2's 64-wide
    heads, which every nanoGPT and GPT-2 preset has; the file does not record it."""
    state = strip_prefixes(state)
    wte, wpe = state["transformer.wte.weight"], state.get("transformer.wpe.weight")
    if wpe is None:
        raise UserError(f"{source} has no transformer.wpe.weight; is it a GPT-2 state dict?")
    vocab_size, n_embd = (int(d) for d in wte.shape)
    layers = {int(k.split(".")[2]) for k in state if k.startswith("transformer.h.") and k.split(".")[2].isdigit()}
    if n_embd % GPT2_HEAD_DIM:
        raise UserError(f"{source} is a bare state dict, which does not record n_head, and its width {n_embd} is not "
                        f"a multiple of GPT-2's {GPT2_HEAD_DIM}-wide heads; save it as nanoGPT's train.py does, "
                        "as {'model': state_dict, 'model_args': {...}}")
    return ModelConfig(n_layer=len(layers), n_head=n_embd // GPT2_HEAD_DIM, n_embd=n_embd,
                       block_size=int(wpe.shape[0]), vocab_size=vocab_size, activation="gelu")


def gpt2_vocab(model: ModelConfig) -> ModelConfig:
    """nanoGPT's 50304-row GPT-2 vocabulary as GPT-2's 50257 tokens (the rest is its padding, and padding here)."""
    if model.vocab_size != NANOGPT_GPT2_VOCAB:
        return model
    return ModelConfig(**{**model.__dict__, "vocab_size": GPT2_VOCAB_SIZE})


def to_canonical(state: Mapping[str, np.ndarray], model: ModelConfig, source: str) -> Weights:
    """Canonical weights of a nanoGPT state dict (numpy arrays) for `model`: prefixes stripped, the causal-mask
    buffers dropped, the tied head checked, Linear weights transposed to [in, out], an absent set of biases (a
    bias=False model) as zeros, and the embedding cut to model.vocab_size rows (see gpt2_vocab)."""
    state = strip_prefixes(state)
    weights: Weights = {}
    for key, value in state.items():
        if key.endswith(".attn.bias"):  # the causal mask nanoGPT keeps when flash attention is unavailable
            continue
        array = np.asarray(value, np.float32)
        weights[key] = np.ascontiguousarray(array.T) if is_linear_weight(key) and array.ndim == 2 else array
    head = weights.pop("lm_head.weight", None)
    wte = weights.get("transformer.wte.weight")
    if head is not None and wte is not None and not np.array_equal(head, wte):
        raise UserError(f"{source} has an output head (lm_head.weight) that differs from the token embedding; "
                        "nanoGPT ties the two, and so does this GPT-2, so untied weights cannot be loaded")
    if wte is not None and wte.shape[0] == NANOGPT_GPT2_VOCAB and model.vocab_size == GPT2_VOCAB_SIZE:
        weights["transformer.wte.weight"] = np.ascontiguousarray(wte[:GPT2_VOCAB_SIZE])
    if not any(k.endswith(".bias") for k in weights):  # bias=False: every bias is absent, and zero is exact
        weights.update(_zero_biases(weights, model.n_embd))
    check_weights(weights, model, source)
    return weights


def _zero_biases(weights: Mapping[str, np.ndarray], n_embd: int) -> Weights:
    """Zero biases for the layers the weights hold (not the config's claim, which check_weights then compares)."""
    layers = {k.split(".")[2] for k in weights if k.startswith("transformer.h.")}
    biases = {k: shape for k, shape in block_shapes(n_embd).items() if k.endswith(".bias")}
    zeros = {f"transformer.h.{i}.{k}": np.zeros(shape, np.float32) for i in layers for k, shape in biases.items()}
    return {**zeros, "transformer.ln_f.bias": np.zeros(n_embd, np.float32)}


def from_canonical(weights: Mapping[str, np.ndarray], model: ModelConfig) -> tuple[dict[str, np.ndarray], dict]:
    """(state dict, model_args) in nanoGPT's form for a bias=True GPT: Linear weights [out, in], lm_head.weight
    the embedding (the caller ties them), vocab_size the model's own."""
    check_weights(weights, model, "the weights to write")
    state = {}
    for name in canonical_shapes(model):
        array = np.asarray(weights[name], np.float32)
        state[name] = np.ascontiguousarray(array.T if is_linear_weight(name) else array)
    state["lm_head.weight"] = state["transformer.wte.weight"]
    model_args = {"n_layer": model.n_layer, "n_head": model.n_head, "n_embd": model.n_embd,
                  "block_size": model.block_size, "bias": True, "vocab_size": model.vocab_size,
                  "dropout": model.dropout}
    return state, model_args
