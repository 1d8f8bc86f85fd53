"""Corpus discovery and reading: sources -> deduplicated UTF-8 documents.

A source is a folder or glob of `.py` files, or a Parquet / Arrow IPC dataset with a text column,
local or behind any `pyarrow.fs` URI (`s3://`, `gs://`, `file://`, ...). `python:stdlib` names the
running interpreter's standard library (site-packages excluded); `idioms` generated simple programs
(pipeline/idioms.py), mixed with the others by byte weights (`data.mix`). Every problem with a source is a
`DataError` raised before anything is written.
"""

import fnmatch
import glob
import os
import sysconfig
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from pipeline.errors import DataError

STDLIB_SOURCE = "python:stdlib"
IDIOMS_SOURCE = "idioms"  # generated simple programs (pipeline/idioms.py); a folder named so: write ./idioms
CODE_SUFFIXES = (".py",)
DATASET_SUFFIXES = (".parquet", ".arrow", ".feather", ".ipc")
_THIRD_PARTY_DIRS = ("site-packages", "dist-packages")


@dataclass(frozen=True)
class Document:
    text: str
    digest: str  # sha256 of the UTF-8 bytes: the dedup key and the split key
    size: int  # length of the UTF-8 bytes


@dataclass(frozen=True)
class SourceFile:
    fs: pafs.FileSystem
    path: str
    source: str  # the source string as the user wrote it
    size: int = 0  # listed bytes
    mtime_ns: int = 0  # listed modification time (0 where the filesystem has none)

    @property
    def is_dataset(self) -> bool:
        return self.path.endswith(DATASET_SUFFIXES)


@dataclass
class Corpus:
    documents: list[Document]  # deduplicated, in digest order (empty where the build streams them)
    files: int = 0  # code files and dataset files read
    skipped: Counter = field(default_factory=Counter)  # reason -> count (binary, not_utf8, empty, duplicate)
    per_source: dict[str, int] = field(default_factory=dict)  # source -> files found (programs for idioms)
    bytes_per_source: dict[str, int] = field(default_factory=dict)  # source -> bytes kept after mix and dedup


def mix_weights(sources: list[str], mix: dict[str, float]) -> dict[str, float]:
    if not mix:
        return {}
    if set(mix) != set(sources):
        raise DataError(f"data.mix: must give a weight to every source and nothing else: sources {sources}, "
                        f"mix {sorted(mix)}")
    if any(w <= 0 for w in mix.values()):
        raise DataError(f"data.mix: weights must be > 0, got {mix}")
    total = sum(mix.values())
    return {k: v / total for k, v in mix.items()}


def filesystem(source: str) -> pafs.FileSystem:
    """The filesystem a source's listed paths live on."""
    if "://" not in source:
        return pafs.LocalFileSystem()
    try:
        return pafs.FileSystem.from_uri(source)[0]
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as err:
        raise DataError(f"data.sources: cannot open {source!r}: {_first_line(err)}") from None


def list_source(source: str, *, exclude: list[str], text_column: str | None = None) -> list[SourceFile]:
    """The code files and dataset files of one source, sorted, with their sizes; DataError if it has none.
    With `text_column`, every dataset file's schema is read (its footer, not its rows) and one that does not
    parse or lacks the column is named now, before any work starts."""
    if source == STDLIB_SOURCE:
        fs, root = pafs.LocalFileSystem(), sysconfig.get_paths()["stdlib"]
        found = [i for i in _walk(fs, root) if not set(PurePosixPath(i.path).parts) & set(_THIRD_PARTY_DIRS)]
    elif "://" in source:
        fs, root = filesystem(source), pafs.FileSystem.from_uri(source)[1]
        found = _walk(fs, root, source)
    elif glob.has_magic(source):
        fs, root = pafs.LocalFileSystem(), _glob_root(source)
        paths = sorted(os.path.abspath(p) for p in glob.glob(source, recursive=True) if os.path.isfile(p))
        if not paths:
            raise DataError(f"data.sources: glob {source!r} matches no files")
        found = fs.get_file_info(paths)
    else:
        fs, root = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(source))
        found = _walk(fs, root, source)
    kept = [SourceFile(fs=fs, path=i.path, source=source, size=i.size or 0, mtime_ns=i.mtime_ns or 0)
            for i in found
            if i.path.endswith(CODE_SUFFIXES + DATASET_SUFFIXES) and not _excluded(i.path, root, exclude)]
    if not kept:
        raise DataError(
            f"data.sources: no Python files (.py) or datasets ({', '.join(DATASET_SUFFIXES)}) in {source!r}"
        )
    if text_column is not None:
        for item in kept:
            if item.is_dataset:
                _check_schema(item, text_column)
    return kept


def _walk(fs: pafs.FileSystem, root: str, source: str | None = None) -> list[pafs.FileInfo]:
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"data.sources: {source or root!r} does not exist")
    if info.type == pafs.FileType.File:
        return [info]
    selector = pafs.FileSelector(root, recursive=True)
    return sorted((i for i in fs.get_file_info(selector) if i.type == pafs.FileType.File), key=lambda i: i.path)


def _glob_root(pattern: str) -> str:
    parts = []
    for part in Path(pattern).parts:
        if glob.has_magic(part):
            break
        parts.append(part)
    return os.path.abspath(os.path.join(*parts)) if parts else os.getcwd()


def _excluded(path: str, root: str, patterns: list[str]) -> bool:
    relative = os.path.relpath(path, root) if path != root else os.path.basename(path)
    return any(fnmatch.fnmatch(relative, pattern) for pattern in patterns)


def read_texts(item: SourceFile, text_column: str, skipped: Counter) -> Iterator[str]:
    """The usable texts of one file, streamed (a dataset a record batch at a time); `skipped` counts the
    rest by reason (binary, not_utf8, empty)."""
    if item.is_dataset:
        for batch in _dataset_batches(item, text_column):
            for value in batch.column(0).to_pylist():
                if value is None or not value.strip():
                    skipped["empty"] += 1
                else:
                    yield value
        return
    with item.fs.open_input_stream(item.path) as stream:
        raw = stream.read()
    if b"\x00" in raw:
        skipped["binary"] += 1
        return
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        skipped["not_utf8"] += 1
        return
    if not text.strip():
        skipped["empty"] += 1
        return
    yield text


def _dataset_batches(item: SourceFile, text_column: str) -> Iterator[pa.RecordBatch]:
    """The text column of a Parquet / Arrow IPC (file or stream) dataset, a record batch at a time."""
    try:
        with item.fs.open_input_file(item.path) as handle:
            _, batches = _open_dataset(item, handle, text_column)
            yield from batches
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as err:
        raise DataError(f"data.sources: cannot read dataset {item.path}: {_first_line(err)}") from None


def _open_dataset(item: SourceFile, handle, column: str) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    """(schema, lazy record batches of `column`) of an open Parquet / Arrow IPC file or stream."""
    if item.path.endswith(".parquet"):
        parquet = pq.ParquetFile(handle)
        return parquet.schema_arrow, parquet.iter_batches(batch_size=1024, columns=[column])
    try:
        reader = ipc.open_file(handle)
        return reader.schema, (reader.get_batch(i).select([column]) for i in range(reader.num_record_batches))
    except pa.ArrowInvalid:
        handle.seek(0)
        stream = ipc.open_stream(handle)
        return stream.schema, (batch.select([column]) for batch in stream)


def _check_schema(item: SourceFile, text_column: str) -> None:
    try:
        with item.fs.open_input_file(item.path) as handle:
            schema, _ = _open_dataset(item, handle, text_column)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as err:
        raise DataError(f"data.sources: cannot read dataset {item.path}: {_first_line(err)}") from None
    if text_column not in schema.names:
        raise DataError(
            f"data.sources: dataset {item.path} has no column {text_column!r} "
            f"(columns: {', '.join(schema.names)}); set data.text_column"
        )
    kind = schema.field(text_column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"data.text_column: column {text_column!r} of {item.path} holds {kind}, not text")


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
