"""The command-line contract both trainers share (DESIGN.md): --config, --run-dir, --init-from, --set."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Callable

from gpt2_common import hub
from gpt2_common.config import CONFIG_DIR, Config, dumps_toml, load_config
from gpt2_common.errors import UserError
from gpt2_common.limits import MAX_NEW_TOKENS  # sample.py's --max-new-tokens bound, the trainers' --sample-tokens
from gpt2_common.prepare import EMBEDDED_SOURCES


def path_arg(text: str) -> str:
    """An argparse `type` for every file or directory argument: `~` expanded and made absolute here, at the edge,
    so that no library deeper down (orbax refuses relative paths) ever sees a path relative to the working
    directory. Messages show paths under the working directory relative again (gpt2_common.errors.run_cli).
    A Hub name (hf:REPO[@REVISION], gpt2_common.hub) passes through untouched; a bare word stays a path."""
    if hub.is_name(text):
        return text
    return os.path.abspath(os.path.expanduser(text))


def output_arg(what: str) -> Callable[[str], str]:
    """An argparse `type` for a path that a script writes (`what`: its flag, for the message): path_arg's, but a
    Hub name is refused in one line, since hf: names are read and never written (path_arg passes them through, and
    a writer would make a folder literally called `hf:x`)."""

    def output_path(text: str) -> str:
        if hub.is_name(text):
            raise UserError(f"{what} '{text}' is a Hugging Face Hub name, and hf: names are sources only; give a "
                            "local path to write to")
        return path_arg(text)

    return output_path


def source_arg(text: str) -> str:
    """prepare_data.py's --source: the name of an embedded corpus as it is, anything else a path or glob (path_arg)."""
    return text if text in EMBEDDED_SOURCES else path_arg(text)


def hellaswag_arg(text: str) -> str:
    """--hellaswag: a split's name (val: HellaSwag's validation file, fetched once into the cache) as it is, anything
    else a path (path_arg)."""
    from gpt2_common.hellaswag_file import SPLITS

    return text if text in SPLITS else path_arg(text)


def sample_tokens_arg(text: str) -> int:
    """--sample-tokens: a whole number in [0, MAX_NEW_TOKENS] (sample.py's bound on --max-new-tokens too), refused in
    one line otherwise: a typo of 10**9 would sample for hours at the end of a run, after its last checkpoint."""
    try:
        tokens = int(text)
    except ValueError:
        raise UserError(f"--sample-tokens must be a whole number of tokens, got '{text}'") from None
    if not 0 <= tokens <= MAX_NEW_TOKENS:
        raise UserError(f"--sample-tokens {tokens} is out of range; it must be in [0, {MAX_NEW_TOKENS}] (0: no "
                        "sample)")
    return tokens


def check_weights_arg(flag: str, value: str | None) -> None:
    """A weights argument that cannot work, answered before a framework loads: a malformed Hub name, or a local
    path that does not exist (with the Hub name of OpenAI's GPT-2 when it is named like one)."""
    if value is None:
        return
    if hub.is_name(value):
        hub.parse(value)
    elif not os.path.exists(value):
        raise UserError(f"{flag} '{value}' does not exist; give a checkpoint, run directory or Hugging Face "
                        f"directory{hub.missing_hint(value)}")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--config and --set, as the trainers and the benchmark scripts take them (args.config, args.overrides)."""
    presets = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.toml")))
    parser.add_argument("--config", default="shakespeare", help=f"a preset in configs/ ({presets}) or a path to a "
                        ".toml/.yaml file (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. --set train.lr=3e-4 model.n_layer=6")


def train_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--run-dir", default=None, type=output_arg("--run-dir"),
                        help="where config.toml, metrics.jsonl and checkpoints/ go (default: runs/<config name>; "
                        "runs/<config name>-torch for PyTorch); running again with the same run dir resumes")
    parser.add_argument("--init-from", default=None, type=path_arg,
                        help="start from these weights: a JAX or PyTorch run or checkpoint, a Hugging Face GPT-2 "
                        "directory or Hub name (hf:gpt2, hf:OWNER/REPO[@REVISION]), a nanoGPT ckpt.pt or an llm.c "
                        "model .bin")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume a run directory's checkpoints even though they were trained with another "
                        "config (keys beyond run control such as train.max_steps, train.eval_interval, logging.*)")
    parser.add_argument("--resume-from", default=None, type=path_arg, metavar="CHECKPOINT",
                        help="resume from this checkpoint of the run (a step folder of checkpoints/ for JAX, a "
                        "step_XXXXXXXX.pt for PyTorch) instead of the newest; the newer ones are set aside, not "
                        "deleted (e.g. to restart from before a loss spike)")
    add_run_arguments(parser)
    return parser


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the run policy (gpt2_common/run.py) that both trainers take."""
    parser.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                        help="stop with a checkpoint once STEP optimizer steps are done (e.g. to fit a job's time "
                        "limit); the schedule still runs to train.max_steps, and running again resumes")
    parser.add_argument("--sample-tokens", type=sample_tokens_arg, default=200, metavar="N",
                        help=f"tokens of text to sample at the end of training (0: no sample; at most "
                        f"{MAX_NEW_TOKENS:,})")


def add_checkpoint_arguments(parser: argparse.ArgumentParser, does: str) -> None:
    """--checkpoint and --framework, as every script that loads weights takes them; `does`: what the model does."""
    parser.add_argument("--checkpoint", required=True, type=path_arg,
                        help="weights in any form: a JAX or PyTorch run or checkpoint, a Hugging Face GPT-2 "
                        "directory or Hub name (hf:gpt2, hf:OWNER/REPO[@REVISION]), a nanoGPT ckpt.pt or an llm.c "
                        "model .bin")
    parser.add_argument("--framework", choices=("jax", "torch"), default="jax",
                        help=f"which model {does} (default: %(default)s)")


def default_run_dir(config_name: str, framework: str) -> Path:
    """runs/<config name> for the JAX trainer, runs/<config name>-torch for the PyTorch one: the quickstart's two
    runs of one preset live side by side instead of the second refusing the first's checkpoints."""
    return Path(path_arg(os.path.join("runs", config_name if framework == "jax" else f"{config_name}-{framework}")))


def resolve_run(args: argparse.Namespace, framework: str) -> tuple[Config, Path]:
    config = load_config(args.config, args.overrides)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(config.name, framework)
    check_weights_arg("--init-from", args.init_from)
    return config, run_dir


def write_run_config(config: Config, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / ".config.toml.tmp"
    tmp.write_text(dumps_toml(config))
    os.replace(tmp, run_dir / "config.toml")
