"""The run policy of both trainers (gpt2_common/run.py), tested once, with a stand-in backend that records what it
is asked to do: when a run logs, evaluates, saves, keeps the best, samples and stops, for every key of the
`train` section, and where the keys that the policy does not decide are honoured instead."""

from __future__ import annotations

import dataclasses
import math
import signal
from pathlib import Path

import pytest

from gpt2_common import run
from gpt2_common.config import Config, DataConfig, TrainConfig
from gpt2_common.errors import UserError
from gpt2_common.faults import Diverged
from gpt2_common.metrics import read_metrics

# Where each train.* key is honoured. "policy": decided in gpt2_common/run.py for both trainers, and tested in this
# file; otherwise the test that shows both frameworks honour it alike, or why only one framework can.
WHERE_HONOURED = {
    "max_steps": "policy", "eval_interval": "policy", "eval_steps": "policy", "save_interval": "policy",
    "log_interval": "policy", "sample_interval": "policy", "keep_best": "policy", "save_every_epoch": "policy",
    "nan_policy": "policy", "hellaswag_examples": "gpt2_common.evaluation.training_hellaswag, for both "
                                                   "(tests/test_hellaswag_training.py)",
    "batch_size": "parity_tests/test_training_parity.py (the same losses from the same batches)",
    "micro_batch_size": "parity_tests/test_training_parity.py (accumulation over 2 micro-batches)",
    "lr": "parity_tests/test_optimizer_parity.py", "min_lr": "parity_tests/test_optimizer_parity.py",
    "warmup_steps": "parity_tests/test_optimizer_parity.py", "weight_decay": "parity_tests/test_optimizer_parity.py",
    "beta1": "parity_tests/test_optimizer_parity.py", "beta2": "parity_tests/test_optimizer_parity.py",
    "eps": "parity_tests/test_optimizer_parity.py", "grad_clip": "parity_tests/test_optimizer_parity.py",
    "keep_checkpoints": "each backend's checkpoints (tests/test_faults_jax.py, tests/test_faults_torch.py)",
    "seed": "each backend's init and data order (tests/test_jax_train.py, tests/test_torch_train.py)",
    "precision": "each framework's compute dtype (tests/test_jax_model.py, tests/test_torch_train.py)",
    "accumulation": "JAX only: how its step accumulates (scan or optax.MultiSteps); PyTorch has one way, "
                    "no_sync, equal to both",
    "compile": "PyTorch only: torch.compile; JAX always compiles (jit)",
}


def test_every_train_key_is_honoured_somewhere_said():
    assert set(WHERE_HONOURED) == {f.name for f in dataclasses.fields(TrainConfig)}


class StandIn:
    """A backend of numbers: losses fall by 0.1 a step, NaN at `nan_at`; it records every call."""

    framework = "jax"
    is_main, multi_process, peak_flops = True, False, None

    def __init__(self, start: run.Start = run.Start(), nan_at: int | None = None, signal_at: int | None = None):
        self.begin, self.nan_at, self.signal_at, self.calls, self.updates = start, nan_at, signal_at, [], start.step

    def describe(self):
        return "stand-in"

    def param_counts(self):
        return {"wte/embedding": 10}

    def start(self):
        self.calls.append(("start",))
        return self.begin

    def step(self, position):
        self.updates += 1
        step = self.updates
        self.calls.append(("step", step, position))
        if step == self.signal_at:
            signal.raise_signal(signal.SIGTERM)
        loss = math.nan if step == self.nan_at else 10.0 - 0.1 * step
        return lambda: run.StepMetrics(loss, 1.0, 1e-3)

    def epoch_of(self, position):
        return position // 10

    def evaluate(self):
        self.calls.append(("evaluate", self.updates))
        return {"val_loss": abs(5.0 - 0.3 * self.updates)}  # best at step 17, then rising

    def save(self, step, position, meta, *, best=False, same_as_last=False):
        self.calls.append(("save", step, position, best, meta["best_val_loss"]))
        return f"ckpt/{'best' if best else step}"

    def verified(self, path):
        return True

    def sample(self, max_new_tokens, seed):
        self.calls.append(("sample", self.updates, max_new_tokens))
        return "text"

    def agree(self, flag):
        return flag

    def wait(self):
        pass

    def memory_in_use(self):
        return None

    def close(self):
        self.calls.append(("close",))

    def of(self, kind):
        return [c[1:] for c in self.calls if c[0] == kind]


def config(**train) -> Config:
    settings = dict(max_steps=20, batch_size=4, micro_batch_size=2, warmup_steps=1, eval_interval=5, eval_steps=1,
                    save_interval=8, log_interval=3, sample_interval=0, keep_best=True, save_every_epoch=False)
    return Config(name="policy", train=TrainConfig(**{**settings, **train}), data=DataConfig(train="x", val="y"))


def go(tmp_path, backend, cfg=None, **kwargs) -> list[str]:
    lines = []
    run.train(backend, cfg or config(), tmp_path / "run", log=lines.append, **kwargs)
    return lines


def test_logs_evaluates_saves_and_samples_when_the_keys_say(tmp_path):
    backend = StandIn()
    lines = go(tmp_path, backend, config(sample_interval=7), sample_tokens=9)
    assert [step for step, _ in backend.of("step")] == list(range(1, 21))
    assert [position for _, position in backend.of("step")] == list(range(0, 40, 2))  # 2 micro-batches a step
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records if "loss" in r] == [3, 6, 9, 12, 15, 18, 20]  # log_interval, and the last
    assert [r["step"] for r in records if "val_loss" in r] == [5, 10, 15, 20]  # eval_interval, and the last
    assert [(s, best) for s, _, best, _ in backend.of("save")] == [
        (5, True), (8, False), (10, True), (15, True), (16, False), (20, False)]  # save_interval, end; best by val
    assert backend.of("sample") == [(7, 200), (14, 200), (20, 9)]  # sample_interval, and --sample-tokens at the end
    train_line = next(r for r in records if "loss" in r)
    assert set(train_line) == {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "step_time_s"}
    assert any(line.startswith("checkpoints: ") for line in lines) and "next:" in lines[-1]
    assert (tmp_path / "run" / "config.toml").is_file() and backend.calls[-2:] == [("close",), ("sample", 20, 9)]


def test_an_alpaca_run_suggests_sampling_with_its_instruction_template(tmp_path):
    """The next commands after an instruction fine-tune ask through the Alpaca template (sample.py --instruction),
    not with a Shakespeare prompt the run never saw (issue 32, item 5)."""
    cfg = dataclasses.replace(config(max_steps=2, eval_interval=0, save_interval=0),
                              data=DataConfig(train="x.json", val="", format="alpaca"))
    next_steps = "\n".join(go(tmp_path, StandIn(), cfg)).split("next:\n", 1)[1].splitlines()
    assert next_steps[0] == f"  python scripts/sample.py --checkpoint {tmp_path}/run --framework jax --instruction " \
                            "'Give three tips for staying healthy.'"
    assert not any("--shards" in line or "ROMEO" in line for line in next_steps)


def test_keep_best_off_saves_no_best(tmp_path):
    backend = StandIn()
    go(tmp_path, backend, config(keep_best=False))
    assert not [s for s in backend.of("save") if s[2]]


def test_eval_steps_zero_evaluates_nothing(tmp_path):
    backend = StandIn()
    go(tmp_path, backend, config(eval_steps=0))
    assert backend.of("evaluate") == [] and not [s for s in backend.of("save") if s[2]]


def test_save_every_epoch_saves_where_a_pass_over_the_data_ends(tmp_path):
    backend = StandIn()
    go(tmp_path, backend, config(save_every_epoch=True, save_interval=0, eval_steps=0))
    assert [s for s, *_ in backend.of("save")] == [5, 10, 15, 20]  # positions 10, 20, 30, 40 end passes


def test_stop_at_stops_with_a_checkpoint_and_the_same_run_goes_on(tmp_path):
    first = StandIn()
    lines = go(tmp_path, first, config(eval_steps=0), stop_at=7)
    assert [s for s, *_ in first.of("save")] == [7] and "--stop-at" in lines[-1]
    second = StandIn(run.Start(step=7, position=14, resumed_from="ckpt/7"))
    go(tmp_path, second, config(eval_steps=0))
    assert [step for step, _ in second.of("step")] == list(range(8, 21))
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r] == [3, 6, 9, 12, 15, 18, 20]


def test_a_finished_run_says_so_and_trains_nothing(tmp_path):
    backend = StandIn(run.Start(step=20, position=40, resumed_from="ckpt/20"))
    lines = go(tmp_path, backend)
    assert backend.of("step") == [] and backend.of("sample") == []
    assert any("is done" in line for line in lines) and "next:" in lines[-1]


@pytest.mark.parametrize("best_there", [True, False])
def test_the_closing_line_names_the_best_checkpoint_only_where_it_is(tmp_path, best_there):
    """A resumed run that makes no new best names the best checkpoint its resume found, if it is there: a user may
    have deleted it, and a run converted from the other trainer's at a step before the source's best has none, yet
    both carry the best validation loss (they named checkpoints/best all the same)."""
    best = tmp_path / "run" / "checkpoints" / "best" / "15"
    if best_there:
        best.mkdir(parents=True)
    start = run.Start(step=18, position=36, best_val_loss=0.5, resumed_from="ckpt/18",
                      best_checkpoint=str(best) if best_there else None)
    lines = go(tmp_path, StandIn(start))  # steps 19-20: val loss |5 - 0.3 * 20| = 1.0, no new best
    closing = next(line for line in lines if line.startswith("checkpoints: ")).splitlines()[0]
    assert closing == "checkpoints: ckpt/20 (last)" + (f", {best} (best, val loss 0.5000)" if best_there else "")


def test_a_nan_stops_the_run_without_saving_it(tmp_path):
    backend = StandIn(nan_at=10)
    with pytest.raises(Diverged, match=r"diverged at step 10: loss nan.*the last good checkpoint \(ckpt/8\)"):
        go(tmp_path, backend, config(eval_steps=0))
    assert [s for s, *_ in backend.of("save")] == [8]


def test_nan_policy_skip_counts_and_goes_on(tmp_path):
    backend = StandIn(nan_at=10)
    lines = go(tmp_path, backend, config(nan_policy="skip", eval_steps=0))
    assert "step 10: loss nan, grad norm 1.0: update skipped (train.nan_policy=skip; 1 skipped so far)" in lines
    assert [r["skipped_steps"] for r in read_metrics(tmp_path / "run") if "loss" in r][-1] == 1
    assert backend.of("save")[-1][:2] == (20, 40)


def test_sigterm_stops_after_the_step_with_a_checkpoint(tmp_path):
    backend = StandIn(signal_at=4)
    lines = go(tmp_path, backend, config(eval_steps=0))
    assert [s for s, *_ in backend.of("save")] == [4] and lines[-1].startswith("SIGTERM: stopped at step 4")


def test_a_failing_save_ends_the_run_with_one_line_naming_the_cause(tmp_path):
    class FullDisk(StandIn):
        def save(self, step, *args, **kwargs):
            if step == 16:
                raise OSError(28, "No space left on device", "/runs/x/checkpoints/16")
            return super().save(step, *args, **kwargs)

    with pytest.raises(UserError) as err:
        go(tmp_path, FullDisk(), config(eval_steps=0))
    assert str(err.value) == ("could not write the checkpoint of step 16 in " + str(tmp_path / "run" / "checkpoints") +
                              ": No space left on device: '/runs/x/checkpoints/16'; the last good checkpoint "
                              "(ckpt/8) is kept")


def test_a_background_save_that_fails_ends_the_run_at_the_next_step_naming_the_last_that_verifies(tmp_path):
    """An asynchronous save (JAX's) fails after save() returned: the backend says so at the next step, and the run
    ends there, after the saves still in flight have ended (their failures unsaid), naming the newest checkpoint
    that verifies: not the failed one, not one still half-written."""
    class FullDiskLater(StandIn):
        def step(self, position):
            if self.updates == 17:  # the save of step 16 has failed in the background
                raise run.SaveFailed("ckpt/16", OSError(28, "No space left on device", "/runs/x/ckpt/16/d/0"))
            return super().step(position)

        def verified(self, path):
            return path != "ckpt/16"

        def close(self):
            super().close()
            raise run.SaveFailed("ckpt/best", OSError(28, "No space left on device"))  # a second failure: unsaid

    backend = FullDiskLater()
    with pytest.raises(UserError) as err:
        go(tmp_path, backend, config(eval_steps=0))
    assert str(err.value) == ("could not write checkpoint ckpt/16: No space left on device: '/runs/x/ckpt/16/d/0'; "
                              "the last good checkpoint (ckpt/8) is kept")
    assert err.value.exit_at_once and backend.updates == 17 and backend.of("close") == [()]


def test_stop_at_where_the_run_is_already_says_so_and_trains_nothing(tmp_path):
    backend = StandIn()
    lines = go(tmp_path, backend, stop_at=0)
    assert backend.of("step") == [] and backend.of("save") == [] and backend.of("close") == [()]
    assert lines[-1] == ("--stop-at 0: the run is at step 0 already, so nothing was trained and it has no checkpoint "
                         "yet; run the command again with a later --stop-at, or without it, to train")
    resumed = StandIn(run.Start(step=7, position=14, resumed_from="ckpt/7"))
    lines = go(tmp_path, resumed, stop_at=5)
    assert resumed.of("step") == [] and "at step 7 already, so nothing was trained and its checkpoint ckpt/7 is " \
        "kept" in lines[-1]


def test_a_second_trainer_on_the_run_directory_is_refused(tmp_path):
    from gpt2_common.runlock import RunLock

    with RunLock(tmp_path / "run"):
        with pytest.raises(UserError, match=r"run directory '.*run' is in use by process \d+"):
            go(tmp_path, StandIn())


def test_a_refused_start_leaves_no_run_directory(tmp_path):
    class Refuses(StandIn):
        def start(self):
            raise UserError("--init-from 'x' is a different GPT-2")

    with pytest.raises(UserError):
        go(tmp_path, Refuses())
    assert not (tmp_path / "run").exists()


def test_a_deleted_metrics_log_comes_back(tmp_path):
    class Deletes(StandIn):
        def step(self, position):
            if self.updates == 10:
                (tmp_path / "run" / "metrics.jsonl").unlink()
            return super().step(position)

    go(tmp_path, Deletes(), config(eval_steps=0))
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [12, 15, 18, 20]


def test_the_run_directory_must_be_a_writable_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file; give a directory"):
        run.train(StandIn(), config(), tmp_path / "file", log=lambda _: None)
    (tmp_path / "run" / "checkpoints").parent.mkdir()
    (tmp_path / "run" / "checkpoints").write_text("x")
    with pytest.raises(UserError, match="is a file, where the run keeps its checkpoints"):
        go(tmp_path, StandIn())
    assert Path(tmp_path / "run" / "checkpoints").read_text() == "x"
