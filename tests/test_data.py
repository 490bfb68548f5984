import os

import numpy as np
import pytest

from gpt2_common.data import (HEADER_BYTES, MAX_ID_MARK, EpochOrder, Shard, TokenLoader, find_shards, read_shard,
                              shard_header, write_shard)
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


def test_write_shard_records_the_largest_id_where_llmc_leaves_the_header_zero(tmp_path):
    write_shard(tmp_path / "a.bin", np.array([5, 50256, 7]))
    header = np.fromfile(tmp_path / "a.bin", dtype=np.int32, count=256)
    assert list(header[3:5]) == [MAX_ID_MARK, 50256] and not header[5:].any()
    assert Shard(tmp_path / "a.bin").max_id == 50256


def unrecorded_shard(path, tokens):
    """A shard as llm.c writes it: its header says nothing of its token ids."""
    write_shard(path, np.zeros(0, np.int64))
    with open(path, "wb") as f:
        f.write(shard_header(len(tokens)).tobytes() + np.asarray(tokens, np.uint16).tobytes())
    return path


def test_opening_reads_headers_only_and_each_batch_checks_the_ids_it_reads(tmp_path):
    """A token id outside the vocabulary deep in a shard whose header records nothing: met at the batch that reads
    it, naming its shard, not at open (the loader used to read every token to open a shard)."""
    tokens = np.random.default_rng(0).integers(0, 100, 1000)
    tokens[500] = 1234  # in windows 49 and 50 of 10 (+1) tokens: 99 + 49 = 148 over both shards, in batch 37 of 4
    good = unrecorded_shard(tmp_path / "good.bin", np.ones(1000, np.int64))
    bad = unrecorded_shard(tmp_path / "bad.bin", tokens)
    loader = TokenLoader([good, bad], 4, 10, shuffle=False, vocab_size=100)
    for position in range(37):
        loader.batch(position)
    with pytest.raises(UserError) as err:
        loader.batch(37)
    assert str(err.value) == f"shard '{bad}' holds token id 1234, outside model.vocab_size=100; it was made with " \
        "another tokenizer: prepare it again with scripts/prepare_data.py"


def count_reads(monkeypatch, before_each=lambda: None) -> list[int]:
    """The sizes of the reads the loader asks for from here on (it reads with os.pread, or os.preadv into its
    rows); `before_each` runs before each read."""
    read, real_pread, real_preadv = [], os.pread, getattr(os, "preadv", None)
    monkeypatch.setattr(os, "pread", lambda fd, n, offset: before_each() or read.append(n) or real_pread(fd, n, offset))
    if real_preadv:
        monkeypatch.setattr(os, "preadv", lambda fd, buffers, offset: before_each() or read.append(
            sum(memoryview(b).nbytes for b in buffers)) or real_preadv(fd, buffers, offset))
    return read


def test_reading_rows_costs_their_bytes_only(tmp_path, monkeypatch):
    paths = make_shards(tmp_path, [5000, 5000, 5000])
    read = count_reads(monkeypatch)
    loader = TokenLoader(paths, 8, 32, vocab_size=50257)
    assert read == [HEADER_BYTES] * 3
    read.clear()
    loader.batch(3)
    assert read == [33 * 2] * 8


@pytest.mark.parametrize("change, message", [
    ("truncate", "was cut short (1524 bytes now, 3024 when it was opened)"),
    ("truncate while reading", "was cut short (1524 bytes now, 3024 when it was opened)"),
    ("append", "changed size (3044 bytes now, 3024 when it was opened)"),
    ("copy over it", "was written to"),
])
def test_a_shard_written_under_a_reader_is_one_line_naming_it(tmp_path, monkeypatch, change, message):
    """Rows are never read from a file other than the one opened (a memory map died of SIGBUS on a cut shard)."""
    path, other = make_shards(tmp_path, [1000, 1000])
    loader = TokenLoader([path], 4, 10, vocab_size=50257)
    loader.batch(0)
    if change == "truncate while reading":  # between the check of its size and the read: a short read
        count_reads(monkeypatch, before_each=lambda: os.truncate(path, HEADER_BYTES + 500))
    elif change == "truncate":
        os.truncate(path, HEADER_BYTES + 500)
    elif change == "append":
        with open(path, "ab") as f:
            f.write(b"\0" * 20)
    else:  # `cp other path`: the same file, the same size, other bytes; only the time it was written says so
        mtime = path.stat().st_mtime_ns
        path.write_bytes(other.read_bytes())
        os.utime(path, ns=(mtime, mtime + 10**9))  # (a filesystem's clock may be coarser than the two writes)
    with pytest.raises(UserError) as err:
        loader.batch(1)
    assert str(err.value) == f"shard '{path}' {message} while this process read it; put back the shards the run " \
        "started with (prepare new data into another folder, not over the shards of a running job), then run the " \
        "same command again to resume from the last checkpoint"


@pytest.mark.parametrize("change", ["rename another over it", "remove"])
def test_a_shard_replaced_or_removed_under_a_reader_is_read_as_it_was_opened(tmp_path, change):
    """As a memory map did: two runs started together both prepare the embedded corpus, and the second to finish
    renames its (identical) shards over those the first already reads."""
    path, other = make_shards(tmp_path, [1000, 1000])
    loader, again = TokenLoader([path], 4, 10, seed=1), TokenLoader([path], 4, 10, seed=1)
    expected = [again.batch(position)[0] for position in range(1, 5)]
    loader.batch(0)
    if change == "remove":
        path.unlink()
    else:
        os.replace(other, path)
    for position, rows in zip(range(1, 5), expected):
        np.testing.assert_array_equal(loader.batch(position)[0], rows)


def test_npy_shards_of_any_integer_type_and_byte_order(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50257, 3000)
    for dtype in ("<u2", ">u2", "<i8"):
        np.save(tmp_path / f"s{dtype[1:]}{dtype[0] == '>'}.npy", tokens.astype(dtype))
    paths = sorted(tmp_path.glob("*.npy"))
    batches = [TokenLoader([p], 4, 16, seed=2, vocab_size=50257).batch(7) for p in paths]
    expected = TokenLoader([unrecorded_shard(tmp_path / "ref.bin", tokens)], 4, 16, seed=2).batch(7)
    for batch in batches:
        np.testing.assert_array_equal(batch[0], expected[0])
        np.testing.assert_array_equal(batch[1], expected[1])
    (tmp_path / "cut.npy").write_bytes((tmp_path / paths[0].name).read_bytes()[:-100])
    with pytest.raises(UserError, match="is truncated or corrupt: its header says 3000 tokens"):
        TokenLoader([tmp_path / "cut.npy"], 4, 16)


def test_the_epoch_order_is_the_one_earlier_runs_resume_into():
    """Checkpoints hold a loader position only: the order must stay Generator.permutation's."""
    order = EpochOrder(100_003, 8, 1, 2, seed=9, shuffle=True)
    expected = np.random.default_rng([9, 2]).permutation(100_003)
    position = 2 * order.batches_per_epoch + 5
    np.testing.assert_array_equal(order.row_ids(position), expected[5 * 8 + 4:5 * 8 + 8])


def test_rows_are_the_same_where_the_system_has_no_preadv(tmp_path, monkeypatch):
    paths = make_shards(tmp_path, [3000, 2000])
    expected = TokenLoader(paths, 8, 32, seed=1).batch(4)
    monkeypatch.delattr(os, "preadv", raising=False)
    np.testing.assert_array_equal(TokenLoader(paths, 8, 32, seed=1).batch(4)[0], expected[0])


def test_a_shard_that_cannot_be_opened_is_one_line(tmp_path, monkeypatch):
    (path,) = make_shards(tmp_path, [100])

    def refuse(*args):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "open", refuse)  # (as root, a chmod would not stop the read)
    with pytest.raises(UserError, match=f"^shard '{path}' cannot be read: Permission denied$"):
        TokenLoader([path], 2, 8)
