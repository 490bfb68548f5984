import numpy as np
import pytest

from gpt2_common.data import HEADER_BYTES, TokenLoader, find_shards, read_shard, write_shard
from gpt2_common.errors import UserError


def make_shards(tmp_path, sizes, seed=0, vocab=50257):
    rng = np.random.default_rng(seed)
    paths = []
    for i, size in enumerate(sizes):
        path = tmp_path / f"train_{i:06d}.bin"
        write_shard(path, rng.integers(0, vocab, size))
        paths.append(path)
    return paths


def test_bin_round_trip_and_header(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16) * 50
    write_shard(tmp_path / "a.bin", tokens)
    header = np.fromfile(tmp_path / "a.bin", dtype=np.int32, count=256)
    assert list(header[:3]) == [20240520, 1, 1000]
    assert (tmp_path / "a.bin").stat().st_size == HEADER_BYTES + 2000
    np.testing.assert_array_equal(read_shard(tmp_path / "a.bin"), tokens)


def test_reads_build_nanogpt_npy(tmp_path):
    tokens = np.arange(500, dtype=np.uint16)
    np.save(tmp_path / "edufineweb_train_000001.npy", tokens)
    np.testing.assert_array_equal(read_shard(tmp_path / "edufineweb_train_000001.npy"), tokens)
    assert find_shards(str(tmp_path)) == [tmp_path / "edufineweb_train_000001.npy"]


def test_wrong_magic(tmp_path):
    (tmp_path / "x.bin").write_bytes(np.zeros(300, dtype=np.int32).tobytes())
    with pytest.raises(UserError, match="magic 0, not 20240520"):
        read_shard(tmp_path / "x.bin")


def test_truncated_body_and_header(tmp_path):
    write_shard(tmp_path / "a.bin", np.arange(100))
    data = (tmp_path / "a.bin").read_bytes()
    (tmp_path / "a.bin").write_bytes(data[:-10])
    with pytest.raises(UserError, match="truncated or corrupt"):
        read_shard(tmp_path / "a.bin")
    (tmp_path / "b.bin").write_bytes(data[:100])
    with pytest.raises(UserError, match="shorter than its 1024-byte header"):
        read_shard(tmp_path / "b.bin")


def test_ids_out_of_range(tmp_path):
    write_shard(tmp_path / "a.bin", np.full(200, 60000))
    with pytest.raises(UserError, match="token id 60000, outside model.vocab_size=50257"):
        TokenLoader([tmp_path / "a.bin"], 2, 8, vocab_size=50257)
    with pytest.raises(UserError, match="fit in uint16"):
        write_shard(tmp_path / "b.bin", np.array([70000]))


def test_missing_shards_say_how_to_make_them(tmp_path):
    with pytest.raises(UserError, match="prepare_data.py"):
        find_shards(str(tmp_path / "*.bin"), "train")
    with pytest.raises(UserError, match="does not exist"):
        read_shard(tmp_path / "nope.bin")


def test_too_little_data_for_one_batch(tmp_path):
    paths = make_shards(tmp_path, [50])
    with pytest.raises(UserError, match="fewer than one batch"):
        TokenLoader(paths, 8, 16)


def test_targets_are_inputs_shifted_and_batches_deterministic(tmp_path):
    paths = make_shards(tmp_path, [3000, 1700])
    loader = TokenLoader(paths, 4, 32, seed=3)
    x, y = loader.batch(5)
    assert x.shape == y.shape == (4, 32) and x.dtype == np.int32
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    again = TokenLoader(paths, 4, 32, seed=3)  # a fresh loader, as after a restart
    for position in (0, 5, 17, 40):
        np.testing.assert_array_equal(loader.batch(position)[0], again.batch(position)[0])
    assert not np.array_equal(TokenLoader(paths, 4, 32, seed=4).batch(0)[0], loader.batch(0)[0])


def test_rows_come_from_the_shards(tmp_path):
    paths = make_shards(tmp_path, [1000])
    loader = TokenLoader(paths, 2, 10, shuffle=False)
    tokens = read_shard(paths[0])
    x, y = loader.batch(1)
    np.testing.assert_array_equal(x[0], tokens[20:30])
    np.testing.assert_array_equal(y[1], tokens[31:41])


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_processes_get_disjoint_slices_covering_each_epoch(tmp_path, processes):
    paths = make_shards(tmp_path, [2000, 1300, 777])
    global_batch = 8
    loaders = [TokenLoader(paths, global_batch, 16, process_index=p, process_count=processes, seed=7)
               for p in range(processes)]
    per_epoch = loaders[0].batches_per_epoch
    for epoch in range(2):
        seen = []
        for position in range(epoch * per_epoch, (epoch + 1) * per_epoch):
            for loader in loaders:
                ids = loader.window_ids(position)
                assert len(ids) == global_batch // processes
                seen.extend(ids.tolist())
        assert len(seen) == len(set(seen)) == per_epoch * global_batch  # nothing read twice in an epoch
        assert set(seen) <= set(range(loaders[0].num_windows))
    # The processes' rows, stacked, are exactly the one-process global batch.
    single = TokenLoader(paths, global_batch, 16, seed=7)
    np.testing.assert_array_equal(np.concatenate([l.batch(3)[0] for l in loaders]), single.batch(3)[0])


def test_epochs_are_reshuffled(tmp_path):
    paths = make_shards(tmp_path, [3000])
    loader = TokenLoader(paths, 4, 16, seed=1)
    assert not np.array_equal(loader.window_ids(0), loader.window_ids(loader.batches_per_epoch))


def test_batch_must_divide_over_processes(tmp_path):
    paths = make_shards(tmp_path, [3000])
    with pytest.raises(UserError, match="does not divide over 3 processes"):
        TokenLoader(paths, 8, 16, process_count=3)
