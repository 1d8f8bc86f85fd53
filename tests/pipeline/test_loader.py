import numpy as np
import pytest
import torch

from pipeline.errors import DataError
from pipeline.loader import TokenLoader
from pipeline.shards import map_shard


def make(ds, **kw):
    args = {"split": "train", "batch_size": 4, "context_length": 32, "seed": 0} | kw
    return TokenLoader(ds.dataset, **args)


def stream(ds, split="train"):
    return np.concatenate([map_shard(ds.dataset.folder / s["file"]) for s in ds.dataset.shards(split)])


def test_batches_are_windows_of_the_token_stream(small_dataset):
    loader = make(small_dataset)
    batch = loader.batch(0)
    assert batch.shape == (4, 33) and batch.dtype == torch.int64
    tokens = stream(small_dataset)
    text = tokens.tobytes()
    for row in batch.numpy().astype(tokens.dtype):
        assert row.tobytes() in text  # a contiguous slice of some shard


def test_same_seed_same_batches_other_seed_other(small_dataset):
    """A batch is a pure function of (seed, step): a resumed run's fresh loader repeats and skips nothing."""
    a, b, c = make(small_dataset), make(small_dataset), make(small_dataset, seed=1)
    straight = {step: a.batch(step) for step in range(12)}
    for step in (7, 8, 11, 0):  # a fresh loader, asked out of order as a resume from step 7 would
        torch.testing.assert_close(b.batch(step), straight[step])
    assert not torch.equal(a.batch(0), c.batch(0))


def window_ids(loader, step):
    first = (step * loader.world_size + loader.rank) * loader.batch_size
    return loader._windows_at(np.arange(first, first + loader.batch_size)).tolist()


def test_ranks_get_disjoint_windows_and_an_epoch_covers_each_once(small_dataset):
    ranks = [make(small_dataset, rank=r, world_size=2) for r in range(2)]
    seen = []
    for step in range(ranks[0].num_windows // (2 * ranks[0].batch_size)):  # the steps of one epoch
        a, b = (window_ids(loader, step) for loader in ranks)
        assert not set(a) & set(b)
        seen += a + b
    assert len(seen) == len(set(seen))
    assert len(seen) > 0.9 * ranks[0].num_windows


def test_rank_batches_match_their_windows(small_dataset):
    loader = make(small_dataset, rank=1, world_size=2)
    rows = loader.batch(3)
    for row, window in zip(rows, window_ids(loader, 3), strict=True):
        torch.testing.assert_close(row, torch.from_numpy(loader._window(window).astype(np.int64)))


def test_validation_order_without_shuffle(small_dataset):
    loader = make(small_dataset, split="val", shuffle=False, batch_size=2)
    tokens = stream(small_dataset, "val")
    first = loader.batch(0).numpy()
    np.testing.assert_array_equal(first[0], tokens[:33])
    np.testing.assert_array_equal(first[1], tokens[32:65])


def test_corrupt_shard_fails_with_its_file_name(small_dataset, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(small_dataset.dataset.folder, folder)
    victim = folder / small_dataset.dataset.shards("train")[1]["file"]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=victim.name):
        TokenLoader(folder, split="train", batch_size=2, context_length=16)


def test_bad_rank_and_too_long_context(small_dataset):
    with pytest.raises(ValueError, match="rank"):
        make(small_dataset, rank=2, world_size=2)
    with pytest.raises(DataError, match="context_length"):
        make(small_dataset, split="val", context_length=10**7)
