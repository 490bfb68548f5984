"""Launching a trainer: the command line both share, and every check of it that needs no framework, made before
JAX or PyTorch is imported (importing either takes seconds), so that a typo, a missing file or a run directory that
cannot be resumed is answered in well under a second.

    python scripts/train_jax.py ...    ->  train_main("jax", argv)
    python scripts/train_torch.py ...  ->  train_main("torch", argv)

What is checked here is checked again where it is used (the backends restore, load and place the real things); this
module only answers early, with the same lines, what it can tell from files and the environment alone: the config,
the run directory (a file, held by another run, another framework's or config's checkpoints, --resume-from), the
shards (present, whole, of this vocabulary), --init-from (exists, is weights, has the config's shapes), the batch
against the processes or CPU devices, and the loggers. What needs the network (hf: names) or a framework is left to
the trainer.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import re
from pathlib import Path

from gpt2_common import hub
from gpt2_common.cli import resolve_run, train_parser
from gpt2_common.config import Config, ModelConfig, check_divides, loads_toml, mesh_shape
from gpt2_common.errors import UserError
from gpt2_common.faults import check_same_config, check_same_model
from gpt2_common.loaders import open_loaders
from gpt2_common.manifest import NoManifest, verify_manifest
from gpt2_common.metrics import check_logging_packages
from gpt2_common.prepare import EMBEDDED_SOURCES, embedded_home_to_prepare
from gpt2_common.runlock import check_free, check_run_dir
from gpt2_common.startup import imports_without_gc
from gpt2_common.weights import check_fits, model_config_from_hf
from gpt2_formats import check_framework, detect
from gpt2_jax import distributed, layout as jax_layout
from gpt2_torch import layout as torch_layout

DESCRIPTIONS = {
    "jax": "Train GPT-2 with JAX (Flax, optax, orbax) on a mesh of devices; running the same command again resumes "
           "from the run directory's newest checkpoint.",
    "torch": "Train GPT-2 with the PyTorch reference trainer; under torchrun for DDP. SIGTERM or Ctrl-C stops after "
             "the current step with a checkpoint; the same command resumes.",
}


def build_parser(framework: str) -> argparse.ArgumentParser:
    parser = train_parser(DESCRIPTIONS[framework])
    if framework == "jax":
        distributed.add_arguments(parser)  # framework-free: it imports JAX only to join a job
    return parser


def train_main(framework: str, argv: list[str] | None = None) -> None:
    """A trainer's command line: parse, check without a framework, then import the framework's trainer and train."""
    args = build_parser(framework).parse_args(argv)
    config, run_dir = resolve_run(args, framework)
    check_training(config, run_dir, framework, args)
    with imports_without_gc():
        if framework == "jax":
            from gpt2_jax.train import train
        else:
            from gpt2_torch.train import train
    if framework == "jax":
        distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    train(config, run_dir, init_from=args.init_from, resume_from=args.resume_from, stop_at=args.stop_at,
          sample_tokens=args.sample_tokens, allow_config_change=args.allow_config_change)


def check_training(config: Config, run_dir: Path, framework: str, args: argparse.Namespace) -> None:
    """The trainer's refusals that files and the environment decide, in the order the trainer would meet them."""
    processes = _process_count(framework, args)
    check_run_dir(run_dir)
    checkpoint_dir = run_dir / jax_layout.CHECKPOINTS_DIR
    check_framework(checkpoint_dir, framework)
    check_logging_packages(config.logging)
    _check_batch_split(config, framework, processes)
    _check_data(config)
    if args.resume_from:
        layout = jax_layout if framework == "jax" else torch_layout
        layout.resume_step(args.resume_from, checkpoint_dir)
    saved = _saved_config(Path(args.resume_from) if args.resume_from else None, checkpoint_dir, framework)
    if saved is not None:
        check_same_model(saved, config, run_dir)
        if not args.allow_config_change:  # with it, the trainer warns of the change once it resumes
            check_same_config(saved, config, run_dir, allow_change=False)
    elif args.init_from and not _resumes(checkpoint_dir, framework):
        source = _source_model(args.init_from)
        if source is not None:
            check_fits(source, config.model, f"--init-from '{args.init_from}'")
    if processes == 1:  # in a job, process 0 takes the lock (perhaps already) and the others never do
        check_free(run_dir)


# --- what the files say ---------------------------------------------------------------------------------------------

def _resumes(checkpoint_dir: Path, framework: str) -> bool:
    if framework == "jax":
        return bool(jax_layout.step_dirs(checkpoint_dir))
    return bool(torch_layout.list_checkpoints(checkpoint_dir))


def _saved_config(chosen: Path | None, checkpoint_dir: Path, framework: str) -> Config | None:
    """The config of the checkpoint the run would resume (--resume-from's, else the newest), where its record reads
    whole without a framework (JAX: the meta record, checked against the folder's manifest; PyTorch: the .pt's
    record, checked by the zip's CRC); None otherwise, and the trainer's restore decides."""
    if framework == "jax":
        folder = chosen or next(iter(jax_layout.step_dirs(checkpoint_dir)[-1:]), None)
        try:
            verify_manifest(folder / jax_layout.MANIFEST_NAME, only="meta/")
        except (TypeError, UserError, NoManifest, OSError):
            return None
        text = jax_layout.saved_config_toml(folder)
    else:
        path = chosen or next(iter(torch_layout.list_checkpoints(checkpoint_dir)[-1:]), None)
        record = torch_layout.peek(path) if path is not None else None
        text = record.get("config") if record else None
    try:
        return loads_toml(text) if isinstance(text, str) else None
    except Exception:  # a record that does not parse: the trainer's restore says what is wrong with it
        return None


def _source_model(path: str) -> ModelConfig | None:
    """The shapes of the weights at `path`, where they read without a framework or the network; None otherwise
    (a Hub name, a nanoGPT file, a record that does not read: the trainer reads the weights and checks them)."""
    if hub.is_name(path):
        return None
    form = detect(path)  # from files alone: a .pt's form from its record (gpt2_torch.layout.peek)
    try:
        if form == "hf":
            return model_config_from_hf(json.loads((Path(path) / "config.json").read_text()), f"'{path}'")
        if form == "llmc":
            from gpt2_common.llmc import read_header

            return read_header(Path(path))[1]
        if form == "jax":
            text = jax_layout.saved_config_toml(jax_layout.step_dir(path))
        elif form == "torch":  # a checkpoint file, or a run directory of them
            pt = Path(path) if Path(path).is_file() else (torch_layout.list_checkpoints(Path(path) / "checkpoints")
                                                          or torch_layout.list_checkpoints(path) or [None])[-1]
            record = torch_layout.peek(pt) if pt is not None else None
            text = record.get("config") if record else None
        else:  # nanoGPT's: the trainer reads it
            return None
        return loads_toml(text).model if isinstance(text, str) else None
    except UserError:
        raise
    except Exception:
        return None


def _check_data(config: Config) -> None:
    """Token shards that are named: present, whole, not empty, of the model's vocabulary (their headers and the
    first batch). An embedded corpus not prepared yet is prepared by the trainer; instruction data and Hub names
    are read by the trainer."""
    data = config.data
    if data.format != "tokens" or hub.is_name(data.train) or hub.is_name(data.val):
        return
    if data.source in EMBEDDED_SOURCES and embedded_home_to_prepare(data.source, data.train) is not None:
        return
    train_loader, _ = open_loaders(config, progress=False)
    train_loader.batch(0)


def _check_batch_split(config: Config, framework: str, processes: int) -> None:
    """A micro-batch splits evenly over torchrun's processes, or over JAX's data-parallel CPU devices where their
    number is known without JAX (no accelerator plugin installed, one process)."""
    micro = config.train.micro_batch_size
    if framework == "torch":
        check_divides(micro, processes, "processes (torchrun's nproc_per_node x nodes)")
        return
    devices = _jax_cpu_device_count() if processes == 1 else None
    if devices is not None:
        sizes = mesh_shape(config.mesh, devices)
        check_divides(micro, sizes["data"] * sizes["fsdp"])


def _process_count(framework: str, args: argparse.Namespace) -> int:
    if framework == "torch":
        world = os.environ.get("WORLD_SIZE", "1")
        return int(world) if world.isdigit() and int(world) > 0 else 1
    given = args.num_processes if args.num_processes is not None else os.environ.get(distributed.ENV_VARS["num_processes"])
    try:
        return max(1, int(given)) if given is not None else 1
    except ValueError:  # the trainer's own check says what is wrong with it
        return 2


_CPU_DEVICES_FLAG = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


def _jax_cpu_device_count() -> int | None:
    """How many devices JAX will see, where that is decided without importing it: JAX runs on the CPU when told to
    (JAX_PLATFORMS=cpu) or when no accelerator plugin is installed, and then sees the devices XLA_FLAGS asks for
    (one by default). None where an accelerator may be there."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms and platforms.split(",")[0].strip() != "cpu":
        return None
    if not platforms and _accelerator_plugin_installed():
        return None
    if os.environ.get("JAX_NUM_CPU_DEVICES"):
        return None  # jax's own option; let JAX read it
    match = _CPU_DEVICES_FLAG.findall(os.environ.get("XLA_FLAGS", ""))
    return int(match[-1]) if match else 1


def _accelerator_plugin_installed() -> bool:
    """A JAX GPU/TPU plugin (jax_cuda12_plugin, jax-rocm, libtpu, any `jax_plugins` entry point or module)."""
    if importlib.util.find_spec("jax_plugins") or importlib.util.find_spec("libtpu"):
        return True
    return bool(importlib.metadata.entry_points(group="jax_plugins"))
