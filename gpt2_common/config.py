"""One config schema for both trainers: frozen dataclasses, loaded from TOML (or YAML) presets plus `--set` overrides.

Every error here is a `UserError` whose message names the key and what to change.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt2_common.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
GPT2_VOCAB_SIZE = 50257


@dataclass(frozen=True)
class ModelConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    vocab_size: int = GPT2_VOCAB_SIZE  # the tokenizer's vocabulary; the embedding is padded beyond it
    pad_vocab_multiple: int = 64  # 50257 -> 50304: a multiple of 64 keeps the logits matmul on fast kernels
    dropout: float = 0.0
    # gelu_tanh: GPT-2's own tanh approximation (HF "gelu_new", llm.c); gelu: the exact erf GELU of nanoGPT and HF
    # configs with activation_function "gelu". Weights trained with one are off by ~1e-3 in the logits with the other.
    activation: str = "gelu_tanh"
    attention: str = "auto"  # auto | cudnn | xla (JAX); torch always uses SDPA, which picks flash on GPU
    # The loss goes through the output head this many sequence positions at a time, so the [B, T, V] logits are
    # never materialised (gpt2_jax/loss.py, gpt2_torch/loss.py); 0 computes the whole logits, then the loss.
    # 128 for a GPU, where shorter chunks re-add the fp32 embedding gradient too often; the CPU presets set 32, short
    # enough to stay in cache (the measurements: docs/benchmarks.md, "The fused loss on one H100" and "The fused loss").
    loss_chunk_size: int = 128
    # The fused loss's exponentials (JAX): "keep" computes exp(logits - max) once for the loss and its gradient's
    # softmax; "recompute" takes the logsumexp, then exp(logits - lse) again for the gradient, which spares a write
    # and a read of the chunk's fp32 exponentials where exp is cheap next to memory traffic. "auto" keeps them on
    # a CPU, where exp is dear (docs/benchmarks.md), and recomputes them elsewhere.
    loss_exp: str = "auto"
    # The output head and loss (JAX): "xla" is the chunked loss above; "pallas" the Pallas kernels of
    # gpt2_jax/pallas_loss.py (Triton on a GPU, Pallas's interpreter elsewhere), which never write logits at all.
    # Same loss to 1e-5 in fp32; one device only for now. "xla" until a GPU measures the kernel faster.
    loss_kernel: str = "xla"
    # The MLP's GELU (JAX): "compute" applies it in the compute dtype (bf16 under bf16), as jax.nn.gelu does;
    # "fp32" upcasts c_fc's output, applies it in fp32 and rounds back, the form an explicit cast would have. Which
    # one lets XLA put the bias and GELU into cuBLASLt's matmul epilogue is for a GPU to tell (scripts/gpu_check.sh).
    gelu_dtype: str = "compute"
    # The LayerNorms (JAX): "flax" is nn.LayerNorm; "tokamax" is tokamax.layer_norm (pip install '.[kernels]'), a
    # fused Triton forward and backward on a GPU, the same parameters and names. "flax" until a GPU measures it.
    layer_norm: str = "flax"

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.pad_vocab_multiple) * self.pad_vocab_multiple

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 512  # sequences per optimizer step, over all devices and micro-steps
    micro_batch_size: int = 16  # sequences per forward/backward pass, over all devices
    max_steps: int = 19073
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 715
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 turns clipping off
    eval_interval: int = 250
    eval_steps: int = 20
    hellaswag_examples: int = 0  # with data.hellaswag: score the first N examples at each evaluation (0: all)
    save_interval: int = 1000
    keep_checkpoints: int = 3
    log_interval: int = 10
    sample_interval: int = 0  # 0: sample only at the end of training
    seed: int = 1337
    precision: str = "bf16"  # fp32 | bf16 | fp16
    # JAX: scan (one jitted call scans the micro-batches; the faster one, docs/benchmarks.md "Accumulation") |
    # multisteps (optax.MultiSteps, one call per micro-batch and a persistent gradient accumulator); same updates
    accumulation: str = "scan"
    compile: bool = False  # torch.compile for the PyTorch trainer
    keep_best: bool = True  # also keep the checkpoint of the lowest validation loss (checkpoints/best*)
    save_every_epoch: bool = False  # also save a checkpoint after each full pass over the train data
    nan_policy: str = "stop"  # a non-finite loss or gradient norm: stop (keeping the last good checkpoint) | skip

    @property
    def grad_accum_steps(self) -> int:
        return self.batch_size // self.micro_batch_size


@dataclass(frozen=True)
class DataConfig:
    source: str = ""  # "shakespeare": prepared from the embedded corpus on first use; "" for shards you made
    train: str = ""  # a glob of train shards (.bin or .npy), or a directory holding them; alpaca: a .json/.jsonl
    val: str = ""  # alpaca: may be empty, then the last 2% of the train records are held out
    format: str = "tokens"  # tokens (shards from prepare_data.py) | alpaca (instruction records, loss on responses)
    pack: bool = True  # alpaca: pack examples back to back (True) or one example a padded row (False)
    hellaswag: str = ""  # HellaSwag's JSONL (e.g. hellaswag_val.jsonl): its accuracy joins every evaluation


@dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # -1 (on one axis at most) takes the devices the other axes leave
    fsdp: int = 1  # parameters and optimizer state sharded over these devices, which also split the batch
    tensor: int = 1


@dataclass(frozen=True)
class LoggingConfig:
    wandb: bool = False
    tensorboard: bool = False
    wandb_project: str = "gpt2"


@dataclass(frozen=True)
class Config:
    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


_SECTION_CLASSES = {
    "model": ModelConfig,
    "train": TrainConfig,
    "data": DataConfig,
    "mesh": MeshConfig,
    "logging": LoggingConfig,
}
CHOICES = {
    ("model", "activation"): ("gelu_tanh", "gelu"),
    ("model", "attention"): ("auto", "cudnn", "xla"),
    ("model", "loss_exp"): ("auto", "keep", "recompute"),
    ("model", "loss_kernel"): ("xla", "pallas"),
    ("model", "gelu_dtype"): ("compute", "fp32"),
    ("model", "layer_norm"): ("flax", "tokamax"),
    ("train", "precision"): ("fp32", "bf16", "fp16"),
    ("train", "accumulation"): ("multisteps", "scan"),
    ("data", "format"): ("tokens", "alpaca"),
    ("train", "nan_policy"): ("stop", "skip"),
}
# Keys a run may change between a checkpoint and its resumption without --allow-config-change: they steer the run
# (how long, how often to evaluate, log or save, where to log) but not the training arithmetic of the steps done.
RUN_CONTROL_KEYS = frozenset({
    "name", "model.attention", "model.loss_chunk_size", "model.loss_exp", "model.loss_kernel", "model.gelu_dtype",
    "model.layer_norm", "train.max_steps", "train.eval_interval", "train.eval_steps", "train.save_interval",
    "train.keep_checkpoints", "train.log_interval", "train.sample_interval", "train.compile", "train.keep_best",
    "train.save_every_epoch", "train.nan_policy", "train.hellaswag_examples", "mesh.data", "mesh.fsdp", "mesh.tensor",
    "data.hellaswag", "logging.wandb", "logging.tensorboard", "logging.wandb_project",
})


def all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in _SECTION_CLASSES.items() for f in dataclasses.fields(cls)]


def _unknown_key(key: str) -> UserError:
    close = difflib.get_close_matches(key, all_keys() + list(_SECTION_CLASSES), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(all_keys())}"
    return UserError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, value: Any, expected: type) -> Any:
    """Checks a TOML/YAML value against the field's type; ints are accepted where floats are expected."""
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is bool and not isinstance(value, bool):
        raise UserError(f"config key '{key}' must be true or false, got {value!r}")
    if expected is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise UserError(f"config key '{key}' must be an integer, got {value!r}")
    if not isinstance(value, expected):
        raise UserError(f"config key '{key}' must be a {expected.__name__}, got {value!r}")
    return value


def _field_types(cls) -> dict[str, type]:
    types = {"int": int, "float": float, "str": str, "bool": bool}
    return {f.name: types[f.type] for f in dataclasses.fields(cls)}


def from_dict(raw: dict[str, Any], name: str = "custom") -> Config:
    """Builds a validated Config from nested sections; unknown sections or keys are errors."""
    sections = {}
    for section, values in raw.items():
        if section == "name":
            name = str(values)
            continue
        if section not in _SECTION_CLASSES:
            raise _unknown_key(section)
        if not isinstance(values, dict):
            raise UserError(f"config section '{section}' must be a table of keys, got {values!r}")
        cls = _SECTION_CLASSES[section]
        types = _field_types(cls)
        kwargs = {}
        for key, value in values.items():
            if key not in types:
                raise _unknown_key(f"{section}.{key}")
            kwargs[key] = _coerce(f"{section}.{key}", value, types[key])
        sections[section] = cls(**kwargs)
    config = Config(name=name, **sections)
    validate(config)
    return config


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def validate(config: Config) -> None:
    m, t = config.model, config.train
    for (section, key), allowed in CHOICES.items():
        value = getattr(getattr(config, section), key)
        if value not in allowed:
            raise UserError(f"config key '{section}.{key}' is {value!r}; choose one of {', '.join(allowed)}")
    positive = {
        "model.n_layer": m.n_layer, "model.n_head": m.n_head, "model.n_embd": m.n_embd,
        "model.block_size": m.block_size, "model.vocab_size": m.vocab_size,
        "model.pad_vocab_multiple": m.pad_vocab_multiple, "train.batch_size": t.batch_size,
        "train.micro_batch_size": t.micro_batch_size, "train.max_steps": t.max_steps,
        "train.log_interval": t.log_interval, "train.keep_checkpoints": t.keep_checkpoints,
    }
    _check_int_ranges(config, positive)
    for key, value in positive.items():
        if value <= 0:
            raise UserError(f"config key '{key}' must be positive, got {value}")
    if m.n_embd % m.n_head:
        raise UserError(
            f"model.n_embd={m.n_embd} is not divisible by model.n_head={m.n_head}; "
            f"pick n_head from the divisors of n_embd (e.g. {_nearest_divisor(m.n_embd, m.n_head)})"
        )
    if t.hellaswag_examples < 0:
        raise UserError(f"train.hellaswag_examples must be 0 (all) or a positive count, got {t.hellaswag_examples}")
    if m.loss_chunk_size < 0:
        raise UserError(f"model.loss_chunk_size must be 0 (whole logits) or a positive chunk, got {m.loss_chunk_size}")
    if not 0.0 <= m.dropout < 1.0:
        raise UserError(f"model.dropout must be in [0, 1), got {m.dropout}")
    if t.batch_size % t.micro_batch_size:
        raise UserError(
            f"train.batch_size={t.batch_size} is not a multiple of train.micro_batch_size={t.micro_batch_size}; "
            "set batch_size to a multiple of micro_batch_size (batch_size/micro_batch_size micro-steps make a step)"
        )
    _check_optimizer_ranges(t)
    if t.min_lr > t.lr:
        raise UserError(f"train.min_lr={t.min_lr} is above train.lr={t.lr}; the schedule decays from lr to min_lr")
    if t.warmup_steps < 0:
        raise UserError(f"train.warmup_steps must be 0 or more, got {t.warmup_steps}")
    if t.warmup_steps > t.max_steps:  # an error, not a silent clamp: config.toml must say what ran
        raise UserError(f"train.warmup_steps={t.warmup_steps} is longer than the run (train.max_steps={t.max_steps}), "
                        f"so the learning rate would never reach train.lr; set train.warmup_steps <= {t.max_steps} "
                        f"(e.g. --set train.warmup_steps={t.max_steps // 10})")
    _check_data_names(config.data)
    axes = {"mesh.data": config.mesh.data, "mesh.fsdp": config.mesh.fsdp, "mesh.tensor": config.mesh.tensor}
    if any(v < 1 and v != -1 for v in axes.values()) or list(axes.values()).count(-1) > 1:
        raise UserError(f"mesh sizes must be positive, and one of them may be -1 (the devices left): got {axes}")


def _check_data_names(data: DataConfig) -> None:
    """A Hub dataset (hf:...) is read by name where it is read as it is: Alpaca's records. Token shards are made from
    one first; say how, before anything loads."""
    for key in ("train", "val"):
        value = getattr(data, key)
        if value.startswith("hf:") and data.format == "tokens":
            raise UserError(f"data.{key} = '{value}' names a Hub dataset; make token shards of it first (python "
                            f"scripts/prepare_data.py --source {value} --name CONFIG --out DIR) and set data.{key} to "
                            f"DIR's {key}_*.bin")


# (key, lowest, whether the lowest is allowed, highest, whether the highest is allowed): what the optimizer can use.
# A negative learning rate trains uphill and a beta of 1 never forgets, yet both run without an error.
_RANGES = (
    ("lr", 0.0, True, math.inf, False), ("min_lr", 0.0, True, math.inf, False),
    ("beta1", 0.0, True, 1.0, False), ("beta2", 0.0, True, 1.0, False), ("eps", 0.0, False, math.inf, False),
    ("grad_clip", 0.0, True, math.inf, False), ("weight_decay", 0.0, True, math.inf, False),
)
SEED_MAX = 2**32 - 1  # numpy's and torch's seeds are unsigned 32-bit (and JAX's PRNGKey takes them)
# Every other integer key is counted, indexed or shaped in int32 somewhere (JAX runs without x64: the step counter,
# the optimizer's count, array shapes), where a larger value would wrap around; TOML reads any size of integer.
INT_MAX = 2**31 - 1


def _check_int_ranges(config: Config, positive: dict[str, int]) -> None:
    for section, cls in _SECTION_CLASSES.items():
        for f in dataclasses.fields(cls):
            key, value = f"{section}.{f.name}", getattr(getattr(config, section), f.name)
            if f.type == "int" and key != "train.seed" and value > INT_MAX:
                low = 1 if key in positive else -1 if section == "mesh" else 0
                raise UserError(f"{key}={value} is out of range; it must be in [{low}, {INT_MAX}]")


def _check_optimizer_ranges(t: TrainConfig) -> None:
    for key, low, low_ok, high, high_ok in _RANGES:
        value = getattr(t, key)
        inside = (value >= low if low_ok else value > low) and (value <= high if high_ok else value < high)
        if not inside:  # NaN is never inside
            valid = f"{'[' if low_ok else '('}{low:g}, {'inf' if math.isinf(high) else f'{high:g}'}" \
                    f"{']' if high_ok else ')'}"
            raise UserError(f"train.{key}={value} is out of range; it must be in {valid}")
    if not 0 <= t.seed <= SEED_MAX:
        raise UserError(f"train.seed={t.seed} is out of range; it must be in [0, {SEED_MAX}]")


def _nearest_divisor(n: int, near: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - near))


def mesh_shape(config: MeshConfig, device_count: int) -> dict[str, int]:
    """The mesh axes' sizes (data, fsdp, tensor) over `device_count` devices, with a -1 axis taking the devices
    the others leave (gpt2_jax.sharding builds the mesh from them; the trainer's launch checks them first)."""
    sizes = {"data": config.data, "fsdp": config.fsdp, "tensor": config.tensor}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    described = " x ".join(f"{k}={v}" for k, v in sizes.items())
    if -1 in sizes.values():
        if device_count % fixed:
            raise UserError(f"mesh {described}: {device_count} devices do not divide by {fixed}; "
                            f"make the fixed mesh sizes multiply to a divisor of {device_count}")
        sizes = {k: (device_count // fixed if v == -1 else v) for k, v in sizes.items()}
    elif fixed != device_count:
        raise UserError(f"mesh {described} needs {fixed} devices but this job has {device_count}; "
                        f"make the sizes multiply to {device_count}, or set one of them to -1")
    return sizes


def check_divides(micro_batch_size: int, batch_shards: int, what: str = "data-parallel devices") -> None:
    """A micro-batch is split evenly over the devices (or processes) that take batch rows."""
    if micro_batch_size % batch_shards:
        raise UserError(
            f"train.micro_batch_size={micro_batch_size} does not divide over {batch_shards} {what}; "
            f"set it to a multiple of {batch_shards} (e.g. --set train.micro_batch_size="
            f"{max(batch_shards, micro_batch_size // batch_shards * batch_shards)})"
        )


# --- files and overrides -------------------------------------------------------------------------------------------

def resolve_config_path(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.suffix in (".toml", ".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"config file '{name_or_path}' does not exist")
        return path
    preset = CONFIG_DIR / f"{name_or_path}.toml"
    if not preset.is_file():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))
        close = difflib.get_close_matches(name_or_path, names, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise UserError(f"no config named '{name_or_path}'; {hint}presets: {', '.join(names)}, or give a .toml/.yaml path")
    return preset


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"config '{path}' is not UTF-8 text (byte {err.start} is 0x{err.object[err.start]:02x}); "
                        "save it as UTF-8") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text) or {}
        else:
            raw = tomllib.loads(text)
    except Exception as err:  # the parsers' own messages carry the line and column
        raise UserError(f"cannot parse config '{path}': {err}") from None
    if not isinstance(raw, dict):
        raise UserError(f"config '{path}' must hold tables such as [model] and [train]")
    return raw


def parse_override(item: str) -> tuple[list[str], Any]:
    """'train.lr=3e-4' -> (['train', 'lr'], 3e-4); the value is read as a TOML value, else kept as a string."""
    if "=" not in item:
        raise UserError(f"override '{item}' must look like section.key=value (e.g. train.lr=3e-4)")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise _unknown_key(key.strip())
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    return parts, value


def load_config(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    path = resolve_config_path(name_or_path)
    raw = read_config_file(path)
    name = raw.pop("name", path.stem)
    for item in overrides:
        (section, key), value = parse_override(item)
        if section not in _SECTION_CLASSES:
            raise _unknown_key(f"{section}.{key}")
        raw.setdefault(section, {})[key] = value
    return from_dict(raw, name=name)


def config_changes(saved: Config, current: Config) -> list[str]:
    """'key: old -> new' for each key that differs between two configs, run-control keys (RUN_CONTROL_KEYS) left
    out: the changes that would make a resumed run train differently from the one that wrote its checkpoints."""
    def flat(config: Config) -> dict[str, Any]:
        out = {"name": config.name}
        for section, values in to_dict(config).items():
            if isinstance(values, dict):
                out.update({f"{section}.{key}": value for key, value in values.items()})
        return out

    old, new = flat(saved), flat(current)
    return [f"{key}: {old[key]!r} -> {new[key]!r}" for key in new
            if key not in RUN_CONTROL_KEYS and old.get(key) != new[key]]


def dumps_toml(config: Config) -> str:
    """The resolved config as TOML, so that a run directory says exactly what ran."""
    import tomli_w

    return tomli_w.dumps({"name": config.name, **{k: v for k, v in to_dict(config).items() if k != "name"}})


def loads_toml(text: str) -> Config:
    raw = tomllib.loads(text)
    return from_dict(raw, name=raw.pop("name", "custom"))
