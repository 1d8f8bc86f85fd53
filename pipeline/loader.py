"""A deterministic, resumable loader of `(batch, ctx + 1)` token windows over memory-mapped shards.

Each shard is cut into windows of `ctx + 1` tokens that start every `ctx` tokens (the last token of a
window is the first target of the next). Window order is a fresh permutation per epoch drawn from
(seed, epoch). Step s on rank r of w reads global positions (s*w + r)*B ... + B - 1, so ranks never
share a window within an epoch, and `batch(step)` is a pure function: resuming from a step number
repeats and skips nothing.
"""

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from pipeline.data import Dataset
from pipeline.errors import DataError
from pipeline.shards import map_shard, verify_shard


class TokenLoader:
    def __init__(
        self,
        dataset: Dataset | str | Path,
        *,
        split: str,
        batch_size: int,
        context_length: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        verify: bool = True,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
        self.dataset = dataset if isinstance(dataset, Dataset) else Dataset.open(dataset)
        self.batch_size, self.context_length = batch_size, context_length
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        entries = self.dataset.shards(split)
        if verify:
            for entry in entries:  # a node copy fetches the split's shards here, once per node
                verify_shard(self.dataset.shard_path(entry), entry["sha256"])
        self._shards = [map_shard(self.dataset.shard_path(e)) for e in entries]
        counts = np.array([max(len(s) - 1, 0) // context_length for s in self._shards], dtype=np.int64)
        self._window_offsets = np.concatenate([[0], np.cumsum(counts)])
        self.num_windows = int(self._window_offsets[-1])
        if self.num_windows == 0:
            raise DataError(
                f"the {split} split of {self.dataset.folder} has fewer than {context_length + 1} tokens "
                "per shard; lower model.context_length or add data"
            )
        self._permutation = lru_cache(maxsize=2)(self._epoch_permutation)

    def batch(self, step: int) -> torch.Tensor:
        """The rank's batch at `step`: int64 tensor of shape (batch_size, context_length + 1)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        first = (step * self.world_size + self.rank) * self.batch_size
        positions = np.arange(first, first + self.batch_size, dtype=np.int64)
        windows = self._windows_at(positions)
        rows = [self._window(w) for w in windows]
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def _windows_at(self, positions: np.ndarray) -> np.ndarray:
        epochs, offsets = np.divmod(positions, self.num_windows)
        return np.array([self._permutation(int(e))[o] for e, o in zip(epochs, offsets, strict=True)])

    def _epoch_permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_windows)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)

    def _window(self, window: int) -> np.ndarray:
        shard = int(np.searchsorted(self._window_offsets, window, side="right")) - 1
        start = (window - int(self._window_offsets[shard])) * self.context_length
        return self._shards[shard][start : start + self.context_length + 1]
