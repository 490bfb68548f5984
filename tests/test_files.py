"""Files a user can share: shards, checkpoints and exported weights get the mode that open() and mkdir() give
under the user's umask, not tempfile's private 0600/0700."""

import os
import stat

import numpy as np
import pytest

from gpt2_common.data import write_shard
from gpt2_common.files import current_umask


@pytest.fixture(params=[0o022, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_the_umask_is_read_without_changing_it(umask):
    assert current_umask() == umask and current_umask() == umask


def test_shards_checkpoints_and_exports_honour_the_umask(umask, tmp_path):
    from gpt2_common.config import Config, ModelConfig
    from gpt2_formats import write
    from parity_tests.conftest import random_weights
    from gpt2_torch.checkpoint import save_checkpoint

    write_shard(tmp_path / "train.bin", np.arange(100))
    assert mode(tmp_path / "train.bin") == 0o666 & ~umask
    save_checkpoint({"step": 1}, tmp_path / "ckpt" / "step_00000001.pt", keep=1)
    assert mode(tmp_path / "ckpt" / "step_00000001.pt") == 0o666 & ~umask
    model = ModelConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=16)
    write(random_weights(model), Config(model=model), tmp_path / "hf", "hf")
    assert mode(tmp_path / "hf") == 0o777 & ~umask
    assert mode(tmp_path / "hf" / "model.safetensors") == 0o666 & ~umask
