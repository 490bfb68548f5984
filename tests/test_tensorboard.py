"""The run log with the real tensorboardX (test_bad_input.py checks the fan-out with stand-ins): the scalars read
back from the event files are the records written, and a resumed run's file tells TensorBoard to drop the steps
after the checkpoint, which the first run wrote before it stopped."""

import struct
import subprocess
import sys
import time

import pytest

from gpt2_common.config import load_config
from gpt2_common.metrics import RunLog


def events(path):
    """The Event records of one TensorBoard event file (TFRecord framing: length, its CRC, data, the data's CRC)."""
    from tensorboardX.proto import event_pb2  # here: its import takes ~1.3 s, which every xdist worker would pay

    data, offset, found = path.read_bytes(), 0, []
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset:offset + 8])
        event = event_pb2.Event()
        event.ParseFromString(data[offset + 12:offset + 12 + length])
        found.append(event)
        offset += 12 + length + 4
    return found


def scalars(path):
    return [(e.step, v.tag, pytest.approx(v.simple_value)) for e in events(path) for v in e.summary.value]


def test_the_run_log_writes_tensorboard_events_that_a_resumed_run_purges(tmp_path):
    logging = load_config("tiny", ["logging.tensorboard=true"]).logging
    log = RunLog(tmp_path, logging, run_name="tiny")
    for step, loss in ((5, 2.5), (10, 2.0), (15, 1.75)):
        log.write({"step": step, "loss": loss, "mfu": None})
    log.write({"step": 10, "val_loss": 2.25})
    log.close()
    (first,) = (tmp_path / "tensorboard").glob("events.*")
    assert scalars(first) == [(5, "train/loss", 2.5), (10, "train/loss", 2.0), (15, "train/loss", 1.75),
                              (10, "val/loss", 2.25)]

    # Resumed from the checkpoint of step 10: step 15 is written again, and TensorBoard drops the first one.
    time.sleep(1.1)  # an event file is named by the second it was opened in
    log = RunLog(tmp_path, logging, resume_step=10, run_name="tiny")
    log.write({"step": 15, "loss": 1.5})
    log.close()
    (second,) = set((tmp_path / "tensorboard").glob("events.*")) - {first}
    starts = [e.step for e in events(second) if e.HasField("session_log") and e.session_log.status == 1]  # START
    assert starts == [11]  # TensorBoard discards the earlier files' events from this step on
    assert scalars(second) == [(15, "train/loss", 1.5)]


def test_a_run_with_tensorboard_loads_no_framework(tmp_path):
    """tensorboardX loads torch when it can, as it is imported: a JAX run that logs to TensorBoard must not."""
    code = f"""
import sys
from gpt2_common.config import load_config
from gpt2_common.metrics import RunLog
log = RunLog({str(tmp_path)!r}, load_config("tiny", ["logging.tensorboard=true"]).logging, run_name="tiny")
log.write({{"step": 5, "loss": 2.5}})
log.close()
print(" ".join(m for m in ("torch", "jax", "flax") if m in sys.modules))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == []
    (written,) = (tmp_path / "tensorboard").glob("events.*")
    assert scalars(written) == [(5, "train/loss", 2.5)]
