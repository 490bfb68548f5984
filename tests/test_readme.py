"""The README as a test: its commands, run as a user types them, in the order it gives them.

Every command below is checked to stand in README.md word for word, then run as a subprocess from the root of a
fresh copy of the repository (in a folder whose name holds a space), with relative paths, exactly as typed; the
runs are only shortened (SHORTEN, SHORTER, SHORTEN_SCRIPT: `--set` overrides of run-control keys that leave the
config's identity alone, --stop-at, a shorter closing sample, fewer batches evaluated and tokens sampled), with one
JAX compilation cache for the session (conftest.py). Each row of the README's bad-input table runs its own command and must print
exactly its message, one line, exit status 2, and leave the run directories as they were. If the README changes a
command, this test fails until it changes too.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from gpt2_common.data import write_shard
from script_module import load_script

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
# One CPU device and one thread a process: the commands run two or more at a time on a two-core machine. Every
# compile goes to the session's JAX cache (conftest.py), the quick ones too: the samplers and evaluations of the
# same shakespeare model compile the same programs in process after process.
ENV = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
       "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
SHORTEN = ["--sample-tokens", "32", "--set", "train.max_steps=30", "train.eval_interval=15", "train.save_interval=15",
           "train.eval_steps=2", "train.log_interval=10"]
# The other scripts' run-control flags, the same way: evaluation of 2 batches of the shards, 32 sampled tokens
SHORTEN_SCRIPT = {"scripts/evaluate.py": ["--steps", "2"], "scripts/sample.py": ["--max-new-tokens", "32"]}
TIMEOUT = 900  # seconds a command may take before the test calls it hung (a busy machine is slow, not broken)

TRAIN_JAX = "python scripts/train_jax.py --config shakespeare"
TRAIN_TORCH = "python scripts/train_torch.py --config shakespeare"
PREPARE = "python scripts/prepare_data.py --source shakespeare --out data/shakespeare"
AFTER_TRAINING = [
    'python scripts/sample.py --checkpoint runs/shakespeare --framework jax --prompt "ROMEO:" --temperature 0.8 '
    '--top-k 200',
    'python scripts/sample.py --checkpoint runs/shakespeare-torch --framework torch --prompt "ROMEO:"',
    "python scripts/evaluate.py --checkpoint runs/shakespeare --shards data/shakespeare",
    "python scripts/evaluate.py --checkpoint runs/shakespeare-torch --framework torch --shards data/shakespeare",
    "python scripts/plot.py runs/shakespeare runs/shakespeare-torch --out curves.png",
]
INIT_FROM = [
    "python scripts/train_jax.py --config shakespeare --init-from runs/shakespeare-torch --run-dir runs/shakespeare-ft",
    "python scripts/train_torch.py --config shakespeare --init-from runs/shakespeare --run-dir "
    "runs/shakespeare-ft-torch",
]
CONVERT = [  # the "Weights" table: each form written from the JAX run, then read back
    "python scripts/convert.py runs/shakespeare shakespeare.pt --to torch",
    "python scripts/convert.py runs/shakespeare shakespeare_hf --to hf",
    "python scripts/convert.py runs/shakespeare nanogpt_out --to nanogpt",
    "python scripts/convert.py runs/shakespeare shakespeare.bin --to llmc --dtype bf16",
]
CONVERT_BACK = [
    "python scripts/convert.py shakespeare.pt shakespeare_jax --to jax",
    "python scripts/convert.py nanogpt_out/ckpt.pt from_nanogpt_hf --to hf",
    "python scripts/convert.py shakespeare.bin from_llmc_hf --to hf",
]
READ_CONVERTED = [
    'python scripts/sample.py --checkpoint shakespeare.pt --framework torch --prompt "ROMEO:"',
    "python scripts/evaluate.py --checkpoint shakespeare_hf --shards data/shakespeare",
]
READ_JAX_CONVERTED = 'python scripts/sample.py --checkpoint shakespeare_jax --prompt "ROMEO:"'
SERVE = "python scripts/serve.py --checkpoint runs/shakespeare --framework jax"
# Shorter still where the test reads less: the --init-from runs stop at step 2 (the test reads that they started
# from the other framework's weights)
SHORTER = dict.fromkeys(INIT_FROM, ["--stop-at", "2"])
MOVED = [  # "Continue a run in the other framework": steps 1-10 in JAX, 11-20 in PyTorch, 21-30 in JAX again
    "python scripts/train_jax.py --config shakespeare --run-dir runs/moved --stop-at 10",
    "python scripts/convert.py runs/moved runs/moved-torch --to torch-run",
    "python scripts/train_torch.py --config runs/moved-torch/config.toml --run-dir runs/moved-torch --stop-at 20",
    "python scripts/convert.py runs/moved-torch runs/moved-jax --to jax-run",
    "python scripts/train_jax.py --config runs/moved-jax/config.toml --run-dir runs/moved-jax",
]
# By name, against the fake Hub of tests/fake_hub.py (HF_ENDPOINT and HF_HOME in the environment, the commands as typed)
HUB_PREPARE = [
    "python scripts/prepare_data.py --source hf:HuggingFaceFW/fineweb-edu --name sample-10BT --out data/fineweb10B",
    "python scripts/prepare_data.py --source hf:HuggingFaceFW/fineweb-edu --name sample-10BT --out data/fineweb_first "
    "--max-tokens 100000000",
    "python scripts/prepare_data.py --source hf:Salesforce/wikitext --name wikitext-103-raw-v1 --split test --out "
    "data/wikitext103_test",
]
HUB_WEIGHTS = [
    'python scripts/sample.py --checkpoint hf:gpt2 --prompt "Hello, I\'m a language model," --max-new-tokens 30 '
    '--temperature 0',
    "python scripts/convert.py hf:gpt2 gpt2_hf --to hf",
    "python scripts/evaluate.py --checkpoint hf:gpt2 --hellaswag val --json",
]
FROM_PYTHON = "the README's From Python block"
PREPARED_BY_TRAINING = "prepared by the trainers"  # a copy of data/shakespeare as the first training runs left it


def readme_commands() -> set[str]:
    """The README's commands: the lines of its bash blocks (comments and continuations joined), the inline commands
    of its bad-input table, and the next-steps block it shows."""
    commands = set()
    for language, block in re.findall(r"```(\w*)\n(.*?)```", README, flags=re.S):
        if language not in ("", "bash"):  # the Python blocks: the From Python and serve tests run them
            continue
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line:
                commands.add(" ".join(line.split()))
    commands.update(" ".join(span.split()) for span in re.findall(r"`((?:\S+=\S+ )*python scripts/[^`]+)`", README))
    return commands


def readme_python(marker: str) -> str:
    """The README's Python block that holds `marker`."""
    return next(block for block in re.findall(r"```python\n(.*?)```", README, flags=re.S) if marker in block)


def bad_input_rows() -> list[tuple[str, str, str]]:
    """(case, command, message) of each row of the README's bad-input table, read as scripts/bench_errors.py reads
    them to time them."""
    return load_script("bench_errors").bad_input_rows(README)


def argv(command: str) -> tuple[list[str], dict[str, str]]:
    """A README command as a process's argv and environment: `VAR=value` prefixes go to the environment, `python`
    becomes this interpreter, and the trainers' runs get SHORTEN (and SHORTER; evaluate.py --shards and sample.py
    SHORTEN_SCRIPT) before their own flags (so that theirs win)."""
    words, env = shlex.split(command), dict(ENV)
    while "=" in words[0] and not words[0].startswith("-"):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    assert words[0] == "python", command
    words[0] = sys.executable
    if words[1] in ("scripts/train_jax.py", "scripts/train_torch.py"):
        words[2:2] = SHORTEN + SHORTER.get(command, [])
    elif words[1] == "scripts/sample.py" or (words[1] == "scripts/evaluate.py" and "--shards" in words):
        words[2:2] = SHORTEN_SCRIPT[words[1]]
    return words, env


def typed(command: str) -> tuple[list[str], dict[str, str]]:
    """argv() of a command that README.md gives word for word."""
    assert " ".join(command.split()) in readme_commands(), f"not in README.md as typed: {command}"
    return argv(command)


def start(command: str, cwd: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    if command == FROM_PYTHON:
        words, typed_env = [sys.executable, "-c", readme_python("from gpt2_formats import read_canonical")], dict(ENV)
    else:
        words, typed_env = typed(command)
    return subprocess.Popen([*words, *extra], cwd=cwd, env={**typed_env, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def run_together(commands: list[str], cwd: Path, hub_env: dict[str, str] | None = None,
                 hub_cwd: Path | None = None) -> dict[str, subprocess.CompletedProcess]:
    """Runs the commands side by side (they touch different files) and waits for all of them; those by name
    (HUB_PREPARE, HUB_WEIGHTS, FROM_PYTHON) with the fake Hub's environment, the first two in hub_cwd."""
    def where(command: str) -> tuple[Path, dict[str, str] | None]:
        if command in HUB_PREPARE + HUB_WEIGHTS:
            return hub_cwd or cwd, hub_env
        return cwd, hub_env if command == FROM_PYTHON else None

    procs = {command: start(command, where(command)[0], env=where(command)[1]) for command in commands}
    done = {}
    for command, proc in procs.items():
        out, err = proc.communicate(timeout=TIMEOUT)
        done[command] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done


def run_in_order(commands: list[str], cwd: Path) -> dict[str, subprocess.CompletedProcess]:
    """Runs the commands one after the other (each needs what the one before wrote)."""
    done = {}
    for command in commands:
        done |= run_together([command], cwd)
    return done


def tree_state(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in sorted(directory.rglob("*"))}


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """The repository's files as a fresh clone has them (those git tracks or would, none that it ignores: no runs/,
    data/ or .venv/), copied into a folder whose name holds a space."""
    return fresh_copy(tmp_path_factory.mktemp("readme") / "a clone")


@pytest.fixture(scope="module")
def hub_clone(tmp_path_factory) -> Path:
    """A second fresh copy, for the commands by name: what they write under data/ stays out of the first copy's
    (whose folder listing the bad-input table prints)."""
    return fresh_copy(tmp_path_factory.mktemp("readme_by_name") / "a clone")


def fresh_copy(target: Path) -> Path:
    return load_script("bench_errors").copy_repository(target)


@pytest.fixture(scope="module")
def hub_env(hub_repos, tmp_path_factory) -> dict[str, str]:
    """The environment that points huggingface_hub at the fake Hub (tests/conftest.py's session-wide server) with an
    empty HF_HOME of the module's own, and HellaSwag's base URL at its copy there."""
    from fake_hub import environ

    return {**environ(hub_repos.hub, tmp_path_factory.mktemp("readme_hf_home")),
            "GPT2_HELLASWAG_BASE_URL": hub_repos.hellaswag_base}


@pytest.fixture(scope="module")
def flow(clone, hub_clone, hub_env) -> dict[str, subprocess.CompletedProcess]:
    """The README's path after `make`: train both frameworks, then use what they wrote. Each wave runs side by side
    what needs only the waves before it (no two commands of a wave write the same files, but for the corpus that
    both first runs prepare), so that no core idles while a wave's slowest command finishes. As `make train` in a
    fresh clone, the trainers find no shards and prepare the embedded corpus themselves; the README's own
    prepare_data.py command runs last, over what they prepared (kept aside to compare)."""
    done = run_together([TRAIN_JAX, TRAIN_TORCH] + HUB_PREPARE + HUB_WEIGHTS, clone, hub_env, hub_clone)
    shutil.copytree(clone / "data" / "shakespeare", clone / PREPARED_BY_TRAINING)
    with ThreadPoolExecutor(1) as beside:  # the run that moves between the trainers, one command at a time
        moved = beside.submit(run_in_order, MOVED, clone)
        done |= run_together(AFTER_TRAINING + INIT_FROM + CONVERT + [FROM_PYTHON], clone, hub_env)
        done |= run_together(CONVERT_BACK + READ_CONVERTED, clone)
        done |= run_together([READ_JAX_CONVERTED], clone)
        done |= moved.result()
    done |= run_together([PREPARE], clone)  # rewrites the shards: after every run that reads them
    return done


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"{shlex.join(result.args)} failed:\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stdout


def test_training_ends_with_its_checkpoints_and_the_next_commands(flow):
    for command, framework, run in ((TRAIN_JAX, "jax", "runs/shakespeare"),
                                    (TRAIN_TORCH, "torch", "runs/shakespeare-torch")):
        out = ok(flow[command])
        assert f"run dir {run}" in out
        assert re.search(rf"checkpoints: {run}/checkpoints/\S+ \(last\), {run}/checkpoints/best\S* \(best, val loss",
                         out), out
        next_steps = out.split("\nnext:\n", 1)[1].splitlines()
        assert next_steps[0] == f"  python scripts/sample.py --checkpoint {run} --framework {framework} --prompt 'ROMEO:'"
        assert f"  python scripts/serve.py --checkpoint {run} --framework {framework}" in next_steps


def test_make_train_prepares_the_corpus_as_the_readme_command_does(flow, clone):
    """make train runs TRAIN_JAX; in a fresh clone its first run (and the PyTorch run beside it) prepares the
    embedded corpus, the same shards as the README's prepare_data.py command writes."""
    recipe = re.search(r"^train:.*\n\t\$\(PY\) (.+)$", (clone / "Makefile").read_text(), flags=re.M).group(1)
    assert f"python {recipe}" == TRAIN_JAX
    assert any("preparing the embedded 'shakespeare' corpus into data/shakespeare (once)" in flow[command].stderr
               for command in (TRAIN_JAX, TRAIN_TORCH))
    assert " shards under data/shakespeare (" in ok(flow[PREPARE])  # the path as typed, not made absolute
    prepared, typed = clone / PREPARED_BY_TRAINING, clone / "data" / "shakespeare"
    assert sorted(p.name for p in prepared.iterdir()) == sorted(p.name for p in typed.iterdir())
    for path in typed.iterdir():
        assert (prepared / path.name).read_bytes() == path.read_bytes(), path.name


def test_the_next_commands_that_training_prints_work_as_printed(flow, clone):
    """The first run's advice, typed as printed (its sample command, with a short completion)."""
    printed = ok(flow[TRAIN_JAX]).split("\nnext:\n", 1)[1].splitlines()[0].strip()
    words, env = argv(printed + " --max-new-tokens 8")
    done = subprocess.run(words, cwd=clone, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0 and done.stdout.startswith("ROMEO:"), done.stderr[-2000:]


def test_sampling_evaluating_and_plotting_read_both_runs(flow, clone):
    for command in AFTER_TRAINING[:2]:
        assert ok(flow[command]).startswith("ROMEO:")
    for command in AFTER_TRAINING[2:4]:
        out = ok(flow[command])
        assert re.search(r"val loss \d+\.\d+", out) and "perplexity" in out, out
        # says what it scored (SHORTEN_SCRIPT's --steps 2), and why that differs from the trainer's figure
        assert re.search(r"the first 2 of their \d+ batches \(--steps\), where .* train.eval_steps", out), out
    assert ok(flow[AFTER_TRAINING[4]]) == "wrote curves.png\n"
    assert (clone / "curves.png").stat().st_size > 10_000


def test_init_from_another_frameworks_run_in_both_trainers(flow):
    for command, source in zip(INIT_FROM, ("runs/shakespeare-torch", "runs/shakespeare")):
        assert f"initialised from {source}" in ok(flow[command])


def test_weights_convert_to_every_form_and_back(flow, clone):
    for command in CONVERT + CONVERT_BACK:
        src, dst = shlex.split(command)[2:4]
        assert ok(flow[command]).startswith(f"{src} ("), flow[command].stdout  # the paths as typed
        assert f" -> {dst} (" in flow[command].stdout
    for command in READ_CONVERTED[:1] + [READ_JAX_CONVERTED]:
        assert ok(flow[command]).startswith("ROMEO:")
    assert "val loss" in ok(flow[READ_CONVERTED[1]])
    from safetensors.numpy import load_file

    exported, via_nanogpt, via_llmc = (load_file(clone / d / "model.safetensors") for d in (
        "shakespeare_hf", "from_nanogpt_hf", "from_llmc_hf"))
    assert exported.keys() == via_nanogpt.keys() == via_llmc.keys()
    for name, value in exported.items():
        assert np.array_equal(value, via_nanogpt[name]), name  # fp32 both ways
        np.testing.assert_allclose(via_llmc[name], value, rtol=1e-2, atol=1e-6, err_msg=name)  # through bf16


def test_a_run_moved_between_the_trainers_keeps_the_curve_of_the_run_that_never_moved(flow, clone):
    """JAX 1-10, PyTorch 11-20, JAX 21-30, each converted with its whole training state: the losses and validation
    losses of runs/shakespeare, which trained 1-30 in JAX with the same config."""
    out = [ok(flow[command]) for command in MOVED]
    conversions = [(out[1], "runs/moved", "jax", "runs/moved-torch", "torch", 10),
                   (out[3], "runs/moved-torch", "torch", "runs/moved-jax", "jax", 20)]
    for printed, src, form, dst, trainer, step in conversions:
        first, then = printed.splitlines()
        assert first.startswith(f"{src} ({form} run, checkpoint {src}/checkpoints/"), first  # the paths as typed
        assert f" -> {dst} ({trainer}-run): step {step} of 30, AdamW at update {step}, " in first, first
        assert then == f"continue it with: python scripts/train_{trainer}.py --config {dst}/config.toml --run-dir {dst}"
    assert "resumed from step 10 (runs/moved-torch/checkpoints/step_00000010.pt)" in out[2]
    assert "resumed from step 20 (runs/moved-jax/checkpoints/20)" in out[4]
    moved, stayed = ([json.loads(line) for line in (clone / run / "metrics.jsonl").read_text().splitlines()]
                     for run in ("runs/moved-jax", "runs/shakespeare"))
    for key, steps in (("loss", [10, 20, 30]), ("val_loss", [15, 30])):
        ours, theirs = ([(r["step"], r[key]) for r in records if key in r] for records in (moved, stayed))
        assert [step for step, _ in ours] == [step for step, _ in theirs] == steps, key
        np.testing.assert_allclose([v for _, v in ours], [v for _, v in theirs], rtol=1e-4, err_msg=key)


def test_data_by_name_prepares_pinned_to_a_commit(flow, hub_clone, hub_repos):
    for command in HUB_PREPARE:
        out_dir = shlex.split(command)[shlex.split(command).index("--out") + 1]
        assert f" shards under {out_dir} (" in ok(flow[command]), flow[command].stdout
        meta = json.loads((hub_clone / out_dir / "meta.json").read_text())
        repo = shlex.split(command)[3][len("hf:"):]
        assert meta["source"] == f"hf:{repo}@{hub_repos.commits[repo]}"
        assert "documents" in meta and (meta["name"], meta["split"]) in (("sample-10BT", "train"),
                                                                          ("wikitext-103-raw-v1", "test"))
    assert json.loads((hub_clone / "data/fineweb_first/meta.json").read_text())["max_tokens"] == 100_000_000


def test_weights_by_name_sample_convert_and_evaluate(flow, hub_clone, hub_env):
    sample, convert, hellaswag = HUB_WEIGHTS
    assert ok(flow[sample]).startswith("Hello, I'm a language model,")
    assert ok(flow[convert]).startswith("hf:gpt2 (hf) -> gpt2_hf (hf): GPT-2 of 2 layers")
    assert (hub_clone / "gpt2_hf" / "model.safetensors").is_file()
    # The fake server's HellaSwag file is not the released one: the command as typed fetches it, checks it and keeps
    # nothing (tests/test_hub_run_inputs.py scores the fixture's file by name with its own checksum).
    result = flow[hellaswag]
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith("error: HellaSwag's val file from http://127.0.0.1:"), result.stderr[-2000:]
    assert "does not match its checksum" in result.stderr and len(result.stderr.splitlines()) == 1
    assert not list((Path(hub_env["HF_HOME"]) / "assets").rglob("*.jsonl"))


def test_the_from_python_block_runs_as_written(flow, clone):
    out = ok(flow[FROM_PYTHON])
    assert out.startswith("Hello, I'm a language model,") and "\nloss " in out, out[-2000:]
    assert any((clone / "runs" / "notebook" / "checkpoints").iterdir())


def test_serve_answers_health_and_the_openai_client_as_the_readme_shows(flow, clone):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = start(SERVE, clone, "--port", str(port))  # the README's command, on a port that is free
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    assert response.status == 200
                    break
            except OSError:
                assert proc.poll() is None, proc.communicate()[1][-3000:]
                assert time.monotonic() < deadline, "serve.py never answered /health"
                time.sleep(0.5)
        # the README's openai snippet as it stands, pointed at this server's port
        snippet = readme_python("openai.OpenAI(").replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(snippet, "README.md", "exec"), {})
        assert printed.getvalue().count("\n") >= 1 and len(printed.getvalue()) > 20, printed.getvalue()
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=TIMEOUT)
    assert out.startswith("serving runs/shakespeare (jax) at http://"), out  # the path as typed


def test_every_bad_input_row_prints_its_message_and_touches_nothing(flow, clone, tmp_path):
    """scripts/bench_errors.py, as the benchmark runs it (once each here), in the clone the flow trained: every row
    of the bad-input table exits 2 with exactly its line, and every script's --help exits 0; the runs are as they
    were."""
    write_shard(clone / "empty" / "train.bin", np.zeros(0, np.int64))
    (clone / "bad.bin").write_bytes(b"\0" * 100)
    rows = [(case, command) for case, command, _ in bad_input_rows() if not command.startswith("(")]
    covered_elsewhere = {case for case, command, _ in bad_input_rows() if command.startswith("(")}
    assert covered_elsewhere == {"divergence"}  # tests/test_faults_*.py: a NaN injected into a real step
    before = tree_state(clone / "runs")
    done = subprocess.run([sys.executable, "scripts/bench_errors.py", "--workdir", ".", "--repeats", "1", "--json",
                           str(tmp_path / "errors.json")], cwd=clone, env=ENV, capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "errors.json").read_text())["results"]
    assert [(r["case"], r["command"]) for r in results if r["message_as_readme"] is not None] == rows
    wrong = [f"{r['case']}: {r['command']}\n  exit {r['exit']}, printed: {r.get('printed', '(as README)')!r}"
             for r in results if r["message_as_readme"] is not None and (r["exit"], r["message_as_readme"]) != (2, True)]
    assert not wrong, "\n".join(wrong)
    helps = [r for r in results if r["message_as_readme"] is None]
    assert {r["case"] for r in helps} == {f"{p.name} --help" for p in (clone / "scripts").glob("*.py")}
    assert all(r["exit"] == 0 for r in helps), [r["case"] for r in helps if r["exit"] != 0]
    assert tree_state(clone / "runs") == before
