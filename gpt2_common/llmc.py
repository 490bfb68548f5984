"""llm.c's model files (gpt2_124M.bin and its kin), read and written, so that a model moves to and from llm.c.

The form is the one llm.c's train_gpt2.py writes (its write_model and write_tensors): a header of 256 little-endian
int32 (magic 20240326; version 3 for fp32 or 5 for bf16; block size, vocabulary, layers, heads, width; the padded
vocabulary), then every tensor, all in the header's dtype, each kind stacked over the layers in a fixed order, the
matrices in PyTorch's [out, in] layout and the token embedding padded with zero rows to a multiple of 128. llm.c's
GELU is the tanh approximation. Only numpy is needed: bf16 is handled as the top half of an fp32's bits.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from gpt2_common.config import Config, ModelConfig, validate
from gpt2_common.errors import UserError
from gpt2_common.files import partial, share_like_open
from gpt2_common.faults import warn
from gpt2_common.weights import Weights, check_weights, is_linear_weight

MAGIC = 20240326
TOKEN_SHARD_MAGIC = 20240520  # llm.c's data shards share the .bin suffix
VERSIONS = {3: "fp32", 5: "bf16"}  # llm.c's versions of the padded-vocabulary form
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
VOCAB_MULTIPLE = 128  # llm.c pads the vocabulary to a multiple of 128 at export (50257 -> 50304)
# write_tensors' order: after wte and wpe, each kind for every layer in turn, then ln_f
LAYER_ORDER = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
               "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
               "mlp.c_proj.weight", "mlp.c_proj.bias")


def is_model_file(head: bytes) -> bool:
    """Whether a file's first bytes are an llm.c model header."""
    return len(head) >= 4 and int.from_bytes(head[:4], "little") == MAGIC


def is_token_shard(head: bytes) -> bool:
    return len(head) >= 4 and int.from_bytes(head[:4], "little") == TOKEN_SHARD_MAGIC


def padded_vocab(vocab_size: int) -> int:
    return -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def tensor_order(model: ModelConfig, vocab_rows: int) -> list[tuple[str, tuple[int, ...]]]:
    """(canonical name, shape in the file) of every tensor, in the file's order."""
    c = model.n_embd
    shapes = {"ln_1.weight": (c,), "ln_1.bias": (c,), "attn.c_attn.weight": (3 * c, c), "attn.c_attn.bias": (3 * c,),
              "attn.c_proj.weight": (c, c), "attn.c_proj.bias": (c,), "ln_2.weight": (c,), "ln_2.bias": (c,),
              "mlp.c_fc.weight": (4 * c, c), "mlp.c_fc.bias": (4 * c,), "mlp.c_proj.weight": (c, 4 * c),
              "mlp.c_proj.bias": (c,)}
    order = [("transformer.wte.weight", (vocab_rows, c)), ("transformer.wpe.weight", (model.block_size, c))]
    order += [(f"transformer.h.{i}.{kind}", shapes[kind]) for kind in LAYER_ORDER for i in range(model.n_layer)]
    return order + [("transformer.ln_f.weight", (c,)), ("transformer.ln_f.bias", (c,))]


def _parameter_count(model: ModelConfig, vocab_rows: int) -> int:
    c, layers = model.n_embd, model.n_layer
    return vocab_rows * c + model.block_size * c + layers * (12 * c * c + 13 * c) + 2 * c


# --- reading --------------------------------------------------------------------------------------------------------

def read_header(path: Path) -> tuple[str, ModelConfig, int]:
    """(dtype, model, padded vocabulary) of an llm.c model file, checked against the file's size before anything
    is allocated: a header that claims more tensors than the file holds is refused at once."""
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise UserError(f"'{path}' is cut short: an llm.c model file starts with a {HEADER_BYTES}-byte header")
    header = np.frombuffer(raw, "<i4")
    if header[0] != MAGIC:
        raise UserError(f"'{path}' is not an llm.c model file (magic {header[0]}, not {MAGIC})")
    version = int(header[1])
    if version not in VERSIONS:
        raise UserError(f"'{path}' is an llm.c model file of version {version}; this reads versions 3 (fp32) and 5 "
                        "(bf16), which llm.c's train_gpt2.py writes: export it again with a current llm.c")
    block_size, vocab_size, n_layer, n_head, n_embd, vocab_rows = (int(v) for v in header[2:8])
    try:
        model = ModelConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                            vocab_size=vocab_size, activation="gelu_tanh")
        validate(Config(model=model))
    except UserError as err:
        raise UserError(f"'{path}' has an llm.c header that no GPT-2 fits: {err}") from None
    if vocab_rows < vocab_size:
        raise UserError(f"'{path}': its padded vocabulary ({vocab_rows}) is smaller than its vocabulary "
                        f"({vocab_size}); the header is damaged")
    itemsize = 4 if VERSIONS[version] == "fp32" else 2
    expected = HEADER_BYTES + itemsize * _parameter_count(model, vocab_rows)
    size = path.stat().st_size
    if size != expected:
        raise UserError(f"'{path}' holds {size} bytes, but the GPT-2 its header describes ({n_layer} layers, "
                        f"{n_embd} wide, vocabulary {vocab_size} padded to {vocab_rows}, {VERSIONS[version]}) "
                        f"takes {expected}; the file is damaged or cut short")
    return VERSIONS[version], model, vocab_rows


def _bf16_to_fp32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def read_llmc(path: str | os.PathLike) -> tuple[Config, Weights]:
    """The config and canonical weights of an llm.c model file: matrices transposed to [in, out], the embedding
    trimmed to the vocabulary."""
    path = Path(path)
    dtype, model, vocab_rows = read_header(path)
    data = np.memmap(path, dtype="<f4" if dtype == "fp32" else "<u2", mode="r", offset=HEADER_BYTES)
    weights: Weights = {}
    offset = 0
    for name, shape in tensor_order(model, vocab_rows):
        count = int(np.prod(shape))
        chunk = data[offset:offset + count]
        offset += count
        array = np.array(chunk, np.float32) if dtype == "fp32" else _bf16_to_fp32(np.asarray(chunk))
        array = array.reshape(shape)
        weights[name] = np.ascontiguousarray(array.T) if is_linear_weight(name) else array
    wte = weights["transformer.wte.weight"]
    if wte[model.vocab_size:].any():
        warn(f"'{path}' has non-zero rows in its vocabulary padding ({model.vocab_size}..{vocab_rows - 1}); they "
             "are dropped (no token reads them), so writing it back gives zeros there")
    weights["transformer.wte.weight"] = np.ascontiguousarray(wte[: model.vocab_size])
    check_weights(weights, model, f"'{path}'")
    return Config(name=path.stem, model=model), weights


# --- writing --------------------------------------------------------------------------------------------------------

def _fp32_to_bf16(array: np.ndarray) -> np.ndarray:
    """Round to nearest even, as torch's .to(torch.bfloat16) does (what llm.c's write_bf16 calls)."""
    bits = np.ascontiguousarray(array, np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    return np.where(np.isnan(array), np.uint16(0x7FC0), rounded)


def write_llmc(weights: Mapping[str, np.ndarray], model: ModelConfig, path: str | os.PathLike,
               dtype: str = "fp32") -> None:
    """An llm.c model file (version 3 for fp32, 5 for bf16) at `path`, written to a temporary name and renamed."""
    path = Path(path)
    if dtype not in ("fp32", "bf16"):
        raise UserError(f"--dtype {dtype!r}: llm.c model files are fp32 or bf16")
    check_weights(weights, model, "the weights to write")
    if model.activation != "gelu_tanh":
        warn(f"this model uses model.activation={model.activation!r}; llm.c computes the tanh GELU, so its logits "
             "there will differ from these by about 1e-3")
    vocab_rows = padded_vocab(model.vocab_size)
    header = np.zeros(HEADER_INTS, "<i4")
    header[:8] = [MAGIC, {"fp32": 3, "bf16": 5}[dtype], model.block_size, model.vocab_size, model.n_layer,
                  model.n_head, model.n_embd, vocab_rows]
    with partial(path) as tmp:  # a kill leaves it for the next conversion here to remove
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            for name, shape in tensor_order(model, vocab_rows):
                array = np.asarray(weights[name], np.float32)
                if name == "transformer.wte.weight":
                    array = np.concatenate([array, np.zeros((vocab_rows - model.vocab_size, model.n_embd),
                                                            np.float32)])
                if is_linear_weight(name):
                    array = array.T
                assert array.shape == shape, (name, array.shape, shape)
                f.write((array.astype("<f4") if dtype == "fp32" else _fp32_to_bf16(array).astype("<u2")).tobytes())
        share_like_open(tmp)  # mkstemp's 0600 -> what open() gives under the umask
        os.replace(tmp, path)

