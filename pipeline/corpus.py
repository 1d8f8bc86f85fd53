"""Corpus discovery and reading: sources -> deduplicated UTF-8 documents.

A source is a folder or glob of `.py` files, or a Parquet / Arrow IPC dataset with a text column,
local or behind any `pyarrow.fs` URI (`s3://`, `gs://`, `file://`, ...). `python:stdlib` names the
running interpreter's standard library (site-packages excluded); `idioms` generated simple programs
(pipeline/idioms.py), mixed with the others by byte weights (`data.mix`). Every problem with a source is a
`DataError` raised before anything is written.
"""

import fnmatch
import glob
import hashlib
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
from tqdm.auto import tqdm

from pipeline.errors import DataError
from pipeline.idioms import generate as generate_idioms

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

    @property
    def is_dataset(self) -> bool:
        return self.path.endswith(DATASET_SUFFIXES)


@dataclass
class Corpus:
    documents: list[Document]  # deduplicated, in a content-defined order (sorted by digest)
    files: int = 0  # code files and dataset files read
    skipped: Counter = field(default_factory=Counter)  # reason -> count (binary, not_utf8, empty, duplicate)
    per_source: dict[str, int] = field(default_factory=dict)  # source -> files found (programs for idioms)
    bytes_per_source: dict[str, int] = field(default_factory=dict)  # source -> bytes kept after mix and dedup


def collect_documents(
    sources: list[str], *, exclude: list[str], text_column: str, progress: bool = True,
    mix: dict[str, float] | None = None, idioms_bytes: int = 20_000_000, idioms_seed: int = 0,
) -> Corpus:
    """Read every source into deduplicated documents; raise DataError naming a bad source.

    `idioms` is generated (pipeline/idioms.py), `idioms_bytes` of it unless `mix` says otherwise.
    `mix` (source -> weight) sets each source's share of the corpus by bytes: the real sources give
    what they have up to their share (documents in content-hash order, so the choice is stable) and
    the generated one is sized to its share."""
    weights = _mix_weights(sources, mix or {})
    texts: dict[str, list[str]] = {}
    corpus = Corpus(documents=[])
    for source in sources:
        if source == IDIOMS_SOURCE:
            continue
        found = list_source(source, exclude=exclude)
        corpus.per_source[source] = len(found)
        corpus.files += len(found)
        texts[source] = [t for item in tqdm(found, desc=f"reading {source}", unit="file", disable=not progress)
                         for t in _read_texts(item, text_column, corpus.skipped)]
    if weights:
        texts = _apply_mix(texts, weights)
    if IDIOMS_SOURCE in sources:
        size = idioms_bytes
        if weights:
            real = sum(len(t.encode("utf-8")) for docs in texts.values() for t in docs)
            share = weights[IDIOMS_SOURCE]
            size = int(real * share / (1.0 - share)) if real and share < 1.0 else idioms_bytes
        texts[IDIOMS_SOURCE] = list(tqdm(generate_idioms(idioms_seed, size), desc="generating idioms",
                                         unit="program", disable=not progress))
        corpus.per_source[IDIOMS_SOURCE] = len(texts[IDIOMS_SOURCE])
    unique: dict[str, Document] = {}
    for source, docs in texts.items():
        corpus.bytes_per_source[source] = 0
        for text in docs:
            raw = text.encode("utf-8")
            doc = Document(text=text, digest=hashlib.sha256(raw).hexdigest(), size=len(raw))
            if doc.digest in unique:
                corpus.skipped["duplicate"] += 1
            else:
                unique[doc.digest] = doc
                corpus.bytes_per_source[source] += doc.size
    if not unique:
        raise DataError(f"data.sources: no usable documents in {sources} (skipped: {dict(corpus.skipped)})")
    corpus.documents = [unique[d] for d in sorted(unique)]
    return corpus


def _mix_weights(sources: list[str], mix: dict[str, float]) -> dict[str, float]:
    if not mix:
        return {}
    if set(mix) != set(sources):
        raise DataError(f"data.mix: must give a weight to every source and nothing else: sources {sources}, "
                        f"mix {sorted(mix)}")
    if any(w <= 0 for w in mix.values()):
        raise DataError(f"data.mix: weights must be > 0, got {mix}")
    total = sum(mix.values())
    return {k: v / total for k, v in mix.items()}


def _apply_mix(texts: dict[str, list[str]], weights: dict[str, float]) -> dict[str, list[str]]:
    """Trim the real sources to their byte shares: the scarcest source (relative to its weight) is used
    whole, the others up to weight x that total, in content-hash order."""
    sizes = {s: sum(len(t.encode("utf-8")) for t in docs) for s, docs in texts.items()}
    if not sizes:
        return texts
    real_share = sum(weights[s] for s in sizes)
    total = min(sizes[s] / (weights[s] / real_share) for s in sizes)  # bytes of all real sources together
    out = {}
    for source, docs in texts.items():
        budget, kept, used = total * weights[source] / real_share, [], 0
        for text in sorted(docs, key=lambda t: hashlib.sha256(t.encode("utf-8")).hexdigest()):
            if used >= budget:
                break
            kept.append(text)
            used += len(text.encode("utf-8"))
        out[source] = kept
    return out


def list_source(source: str, *, exclude: list[str]) -> list[SourceFile]:
    """The code files and dataset files of one source, sorted; DataError if it has none."""
    if source == STDLIB_SOURCE:
        fs, root = pafs.LocalFileSystem(), sysconfig.get_paths()["stdlib"]
        found = [p for p in _walk(fs, root) if not set(PurePosixPath(p).parts) & set(_THIRD_PARTY_DIRS)]
    elif "://" in source:
        try:
            fs, root = pafs.FileSystem.from_uri(source)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as err:
            raise DataError(f"data.sources: cannot open {source!r}: {_first_line(err)}") from None
        found = _walk(fs, root, source)
    elif glob.has_magic(source):
        fs, root = pafs.LocalFileSystem(), _glob_root(source)
        found = sorted(os.path.abspath(p) for p in glob.glob(source, recursive=True) if os.path.isfile(p))
        if not found:
            raise DataError(f"data.sources: glob {source!r} matches no files")
    else:
        fs, root = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(source))
        found = _walk(fs, root, source)
    kept = [p for p in found if p.endswith(CODE_SUFFIXES + DATASET_SUFFIXES) and not _excluded(p, root, exclude)]
    if not kept:
        raise DataError(
            f"data.sources: no Python files (.py) or datasets ({', '.join(DATASET_SUFFIXES)}) in {source!r}"
        )
    return [SourceFile(fs=fs, path=p, source=source) for p in kept]


def _walk(fs: pafs.FileSystem, root: str, source: str | None = None) -> list[str]:
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"data.sources: {source or root!r} does not exist")
    if info.type == pafs.FileType.File:
        return [root]
    selector = pafs.FileSelector(root, recursive=True)
    return sorted(i.path for i in fs.get_file_info(selector) if i.type == pafs.FileType.File)


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


def _read_texts(item: SourceFile, text_column: str, skipped: Counter) -> Iterator[str]:
    if item.is_dataset:
        for value in _read_column(item, text_column):
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


def _read_column(item: SourceFile, text_column: str) -> list[str | None]:
    try:
        table = _read_table(item)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as err:
        raise DataError(f"data.sources: cannot read dataset {item.path}: {_first_line(err)}") from None
    if text_column not in table.column_names:
        raise DataError(
            f"data.sources: dataset {item.path} has no column {text_column!r} "
            f"(columns: {', '.join(table.column_names)}); set data.text_column"
        )
    column = table.column(text_column)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise DataError(
            f"data.text_column: column {text_column!r} of {item.path} holds {column.type}, not text"
        )
    return column.to_pylist()


def _read_table(item: SourceFile) -> pa.Table:
    if item.path.endswith(".parquet"):
        with item.fs.open_input_file(item.path) as handle:
            return pq.read_table(handle)
    with item.fs.open_input_file(item.path) as handle:
        try:
            return ipc.open_file(handle).read_all()
        except pa.ArrowInvalid:
            handle.seek(0)
            return ipc.open_stream(handle).read_all()


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
