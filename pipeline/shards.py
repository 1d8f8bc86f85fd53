"""Token shards: documents -> token ids -> Arrow IPC files with checksums, and memory-mapped reads.

A shard is an uncompressed Arrow IPC file with one `tokens` column (uint16 while the vocabulary fits,
else uint32) in a single record batch, so a reader maps it and slices it without copying.
"""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from infra.checkpoint import file_sha256
from pipeline.errors import DataError

TOKEN_COLUMN = "tokens"
_ENCODE_BATCH_DOCS = 64


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def encode_documents(
    tokenizer: Tokenizer, texts: Sequence[str], *, eot: int, dtype: np.dtype, desc: str, progress: bool = True
) -> np.ndarray:
    """All documents' ids, each followed by end-of-text; encoded in parallel on every core."""
    tokenizer.encode_special_tokens = True  # a literal "<|endoftext|>" in code is text, not a separator
    chunks = []
    total_bytes = sum(len(t.encode("utf-8")) for t in texts)
    with tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, disable=not progress) as bar:
        for start in range(0, len(texts), _ENCODE_BATCH_DOCS):
            batch = texts[start : start + _ENCODE_BATCH_DOCS]
            for encoding in tokenizer.encode_batch_fast(list(batch), add_special_tokens=False):
                chunks.append(np.asarray(encoding.ids, dtype=dtype))
                chunks.append(np.asarray([eot], dtype=dtype))
            bar.update(sum(len(t.encode("utf-8")) for t in batch))
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)


class ShardWriter:
    """Cuts a stream of token arrays into shards of `shard_tokens` (the last one shorter), written as the
    tokens arrive: memory holds one shard. `close()` returns their manifest entries."""

    def __init__(self, folder: Path, *, split: str, shard_tokens: int, dtype: np.dtype) -> None:
        self.folder, self.split, self.shard_tokens, self.dtype = folder, split, shard_tokens, dtype
        self.pending: list[np.ndarray] = []
        self.filled = 0
        self.entries: list[dict] = []

    def add(self, tokens: np.ndarray) -> None:
        while len(tokens):
            take = min(self.shard_tokens - self.filled, len(tokens))
            self.pending.append(tokens[:take])
            self.filled += take
            tokens = tokens[take:]
            if self.filled == self.shard_tokens:
                self._write()

    def close(self) -> list[dict]:
        if self.filled:
            self._write()
        return self.entries

    def _write(self) -> None:
        name = f"{self.split}-{len(self.entries):05d}.arrow"
        part = np.concatenate(self.pending).astype(self.dtype, copy=False)
        table = pa.table({TOKEN_COLUMN: pa.array(part)})
        with pa.OSFile(str(self.folder / name), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=len(part))
        self.entries.append({"file": name, "split": self.split, "tokens": int(len(part)),
                             "sha256": file_sha256(self.folder / name)})
        self.pending, self.filled = [], 0


def map_shard(path: Path) -> np.ndarray:
    """The shard's tokens as a read-only array backed by a memory map (no copy)."""
    source = pa.memory_map(str(path), "r")
    reader = ipc.open_file(source)
    if reader.num_record_batches != 1:
        raise DataError(f"shard {path}: expected one record batch, found {reader.num_record_batches}")
    return reader.get_batch(0).column(TOKEN_COLUMN).to_numpy(zero_copy_only=True)


def verify_shard(path: Path, sha256: str) -> None:
    if not path.is_file():
        raise DataError(f"shard {path} is missing; rerun `circuitscale data` to rebuild the dataset")
    actual = file_sha256(path)
    if actual != sha256:
        raise DataError(
            f"shard {path} is corrupt: sha256 {actual[:12]}... does not match the manifest's "
            f"{sha256[:12]}...; delete its folder and rerun `circuitscale data`"
        )
