"""The streaming corpus build: sources -> scan units -> hash buckets -> encoded buckets -> shards.

Memory stays bounded by a unit or a bucket, never the corpus, and every stage publishes its files
atomically with a checksummed sidecar in a work folder, so a build killed midway resumes from what it
had finished:

1. scan (one task per unit: up to `UNIT_BYTES` of `.py` files, or one dataset file, or the generated
   idioms): read, filter (binary, not UTF-8, empty), hash each document and append it to the record
   batch of its bucket. A bucket is a range of the sha256 space (`bucket_of`), so the buckets in order
   hold the documents in digest order.
2. bucket (one task per bucket, a hash-partitioned pass): gather the bucket's batches from every unit,
   trim each source to its `data.mix` budget, deduplicate exactly (a digest seen in a higher-priority
   source or twice in one source), split by content hash, sort by digest.
3. encode (one task per bucket): the bucket's train and val documents as token ids, each followed by
   end-of-text.
4. assemble (the driver): the encoded buckets in order, cut into shards of `data.shard_tokens`.

The output depends on the documents only: not on the number of buckets, the engine, or how many
tasks ran at once. `run_tasks` runs a stage's tasks in this process (`local`) or as Ray Data tasks on
the cluster's CPUs (`ray`); the work folder must then be storage every node mounts.
"""

import functools
import hashlib
import itertools
import json
import math
import os
import tempfile
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
from tqdm.auto import tqdm

from infra.checkpoint import file_sha256, write_atomic
from pipeline.corpus import (
    IDIOMS_SOURCE,
    Corpus,
    Document,
    SourceFile,
    filesystem,
    list_source,
    mix_weights,
    read_texts,
)
from pipeline.errors import DataError
from pipeline.idioms import generate as generate_idioms
from pipeline.shards import TOKEN_COLUMN, encode_documents

ENGINES = ("local", "ray")
UNIT_BYTES = 64_000_000  # `.py` files per scan unit (by listed size)
DATASET_EXPANSION = 4  # listed bytes of a Parquet / Arrow file -> text bytes, for sizing the buckets
_FLUSH_BYTES = 16_000_000  # a scan task writes its buffered documents out past this much text
_SCAN = pa.schema([("digest", pa.binary(32)), ("source", pa.int16()), ("size", pa.int64()),
                   ("text", pa.large_string())])
_BUCKET = pa.schema([("digest", pa.binary(32)), ("val", pa.bool_()), ("size", pa.int64()),
                     ("text", pa.large_string())])


def bucket_of(digest: bytes, buckets: int) -> int:
    """The bucket of a sha256 digest: monotone in the digest, so bucket order is digest order."""
    return (int.from_bytes(digest[:8], "big") * buckets) >> 64


def is_val(digest: bytes, val_fraction: float) -> bool:
    """The split by content hash: a document lands in the same split in every run and every corpus."""
    return int.from_bytes(digest[:8], "big") / float(1 << 64) < val_fraction


def drawn_for_tokenizer(digest: bytes, share: float, seed: int) -> bool:
    """Whether the tokenizer sample (seed, share) draws this document: fixed by its content and the seed."""
    mark = hashlib.sha256(str(seed).encode("ascii") + digest).digest()[:8]
    return int.from_bytes(mark, "big") < share * 2**64


# --- the work folder: atomic files with checksummed sidecars ---------------------------------------------

def publish(path: Path, write: Callable[[Path], None], meta: dict) -> dict:
    """Write `path` through a temporary file, then its sidecar `<path>.json` (meta + the file's sha256):
    the sidecar is the mark that the file is complete."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        meta = {**meta, "sha256": file_sha256(tmp)}
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    write_atomic(Path(f"{path}.json"), json.dumps(meta, sort_keys=True))
    return meta


def published(path: Path) -> dict | None:
    """The sidecar of a complete, intact `path`, or None (never written, half-written, or damaged)."""
    side = Path(f"{path}.json")
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
        if path.is_file() and file_sha256(path) == meta["sha256"]:
            return meta
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _write_batches(path: Path, schema: pa.Schema, batches: list[pa.RecordBatch]) -> None:
    with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, schema) as writer:
        for batch in batches:
            writer.write_batch(batch)


# --- running a stage's tasks -----------------------------------------------------------------------------

def run_local(fn: Callable[[dict], dict], tasks: list[dict], *, desc: str, unit: str, progress: bool) -> list[dict]:
    """The local engine: the tasks one after another in this process (the tokenizer encodes on every core)."""
    return [fn(task) for task in tqdm(tasks, desc=desc, unit=unit, disable=not progress)]


Runner = Callable[..., list[dict]]
_RUNNERS: dict[str, Runner] = {"local": run_local}


def register_engine(name: str, runner: Runner) -> None:
    """Make `data.engine=name` run a stage's tasks through `runner` (sweeps/data_engine.py registers `ray`:
    Ray is imported only under sweeps/)."""
    _RUNNERS[name] = runner


def run_tasks(fn: Callable[[dict], dict], tasks: list[dict], *, engine: str, desc: str, unit: str,
              progress: bool) -> list[dict]:
    """`fn` over `tasks` (JSON-able dicts), results in task order. A runner returns a task's DataError as
    one raised here with its own message."""
    if engine not in ENGINES:
        raise ValueError(f"data.engine: must be one of {ENGINES}, got {engine!r}")
    if engine not in _RUNNERS:
        raise DataError(f"data.engine={engine}: its runner is not loaded (import sweeps.data_engine; "
                        "`circuitscale data` and the study do)")
    return _RUNNERS["local" if not tasks else engine](fn, tasks, desc=desc, unit=unit, progress=progress)


# --- 1. scan ---------------------------------------------------------------------------------------------

@dataclass
class Plan:
    """What the sources hold, listed (never read): the scan units and the listing's fingerprint."""

    units: list[dict]
    files: dict[str, int] = field(default_factory=dict)  # source -> files listed
    listed_bytes: int = 0
    fingerprint: list = field(default_factory=list)  # (path, size, mtime) of every file, for the resume key


def plan_units(sources: list[str], *, exclude: list[str], text_column: str) -> Plan:
    """List the real sources (idioms are planned after the scan, once the mix sizes them); raises
    DataError for a missing source, an unreadable dataset or one without the text column, before any
    work starts."""
    plan = Plan(units=[])
    for index, source in enumerate(sources):
        if source == IDIOMS_SOURCE:
            continue
        found = list_source(source, exclude=exclude, text_column=text_column)
        plan.files[source] = len(found)
        plan.fingerprint += [(f.path, f.size, f.mtime_ns) for f in found]
        group: list[SourceFile] = []
        size = 0  # of the group
        for item in found + [None]:
            if group and (item is None or item.is_dataset or size + item.size > UNIT_BYTES):
                plan.units.append({"source": source, "source_index": index, "paths": [f.path for f in group]})
                group, size = [], 0
            if item is not None and item.is_dataset:
                plan.units.append({"source": source, "source_index": index, "paths": [item.path]})
            elif item is not None:
                group.append(item)
                size += item.size
        plan.listed_bytes += sum(f.size * (DATASET_EXPANSION if f.is_dataset else 1) for f in found)
    return plan


def scan_unit(task: dict) -> dict:
    """Scan one unit into `scan/unit-NNNNNN.arrow`: one record batch per bucket per flush. Returns its
    sidecar: files read, skipped by reason, and per batch (bucket, documents, bytes)."""
    path = Path(task["work"]) / "scan" / f"unit-{task['index']:06d}.arrow"
    if (done := published(path)) is not None:
        return {**done, "resumed": True}
    skipped: Counter = Counter()
    buffers: dict[int, list[tuple[bytes, int, str]]] = defaultdict(list)
    meta: dict = {"files": len(task["paths"]), "texts": 0, "batches": [], "skipped": skipped}

    def flush(writer: ipc.RecordBatchFileWriter) -> None:
        for bucket in sorted(buffers):
            rows = buffers[bucket]
            writer.write_batch(pa.record_batch(
                [pa.array([r[0] for r in rows], pa.binary(32)),
                 pa.array([task["source_index"]] * len(rows), pa.int16()),
                 pa.array([r[1] for r in rows], pa.int64()), pa.array([r[2] for r in rows], pa.large_string())],
                schema=_SCAN))
            meta["batches"].append([bucket, len(rows), sum(r[1] for r in rows)])
        buffers.clear()

    def write(tmp: Path) -> None:
        buffered = 0
        with pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, _SCAN) as writer:
            for text in _unit_texts(task, skipped):
                raw = text.encode("utf-8")
                digest = hashlib.sha256(raw).digest()
                buffers[bucket_of(digest, task["buckets"])].append((digest, len(raw), text))
                meta["texts"] += 1
                buffered += len(raw)
                if buffered >= _FLUSH_BYTES:
                    flush(writer)
                    buffered = 0
            flush(writer)

    return publish(path, write, meta)  # the sidecar, with the counts the scan found


def _unit_texts(task: dict, skipped: Counter) -> Iterator[str]:
    if task["source"] == IDIOMS_SOURCE:
        yield from generate_idioms(task["idioms_seed"], task["idioms_bytes"])
        return
    fs = filesystem(task["source"])
    for item_path in task["paths"]:
        yield from read_texts(SourceFile(fs=fs, path=item_path, source=task["source"]), task["text_column"], skipped)


# --- 2. buckets ------------------------------------------------------------------------------------------

def mix_budgets(sources: list[str], mix: dict[str, float], scans: list[dict], buckets: int
                ) -> dict[int, tuple[list[int], float]]:
    """Per real source index: (bytes before each bucket, byte budget) for `data.mix`. A source keeps its
    documents in digest order while the bytes before a document are under its budget; the scarcest
    source (relative to its weight) is kept whole, the others up to their weight x that total."""
    weights = mix_weights(sources, mix)
    if not weights:
        return {}
    per_bucket: dict[int, list[int]] = {i: [0] * buckets for i, s in enumerate(sources) if s != IDIOMS_SOURCE}
    for scan in scans:
        for bucket, _, size in scan["batches"]:
            per_bucket[scan["source_index"]][bucket] += size
    sizes = {i: sum(b) for i, b in per_bucket.items()}
    real_share = sum(weights[sources[i]] for i in sizes)
    total = min(sizes[i] / (weights[sources[i]] / real_share) for i in sizes)
    return {i: ([0, *itertools.accumulate(per_bucket[i][:-1])], total * weights[sources[i]] / real_share)
            for i in sizes}


def _trim(rows: list[tuple], start: float, budget: float) -> list[tuple]:
    """The leading rows (sorted by digest; rows[i][3] their size) a source keeps of a bucket whose
    earlier buckets hold `start` bytes of it."""
    kept, used = [], start
    for row in rows:
        if used >= budget:
            break
        kept.append(row)
        used += row[3]
    return kept


def bucket_parts(scans: list[dict], buckets: int) -> list[list[tuple[int, list[int]]]]:
    """Per bucket: (unit, its record batches in that bucket) for every unit that has any."""
    parts: list[list[tuple[int, list[int]]]] = [[] for _ in range(buckets)]
    for scan in scans:
        own: dict[int, list[int]] = defaultdict(list)
        for i, (bucket, _, _) in enumerate(scan["batches"]):
            own[bucket].append(i)
        for bucket, indices in own.items():
            parts[bucket].append((scan["index"], indices))
    return parts


def gather_bucket(work: Path, parts: list[tuple[int, list[int]]], columns: list[str]) -> pa.Table:
    """A bucket's rows (`columns` of them) from the scanned units' record batches `parts`."""
    tables = []
    for unit, indices in parts:
        with pa.memory_map(str(work / "scan" / f"unit-{unit:06d}.arrow"), "r") as source:
            reader = ipc.open_file(source)
            tables.append(pa.Table.from_batches([reader.get_batch(i).select(columns) for i in indices]))
    if not tables:
        return pa.table({c: pa.array([], _SCAN.field(c).type) for c in columns})
    return pa.concat_tables(tables)


def kept_bytes(work: Path, scans: list[dict], budgets: dict[int, tuple[list[int], float]], buckets: int) -> int:
    """Bytes the real sources keep under their mix budgets (before dedup): sizes the generated source."""
    total = 0
    for index, (before, budget) in budgets.items():
        ends = before[1:] + [sum(s for scan in scans if scan["source_index"] == index for _, _, s in scan["batches"])]
        for bucket in range(buckets):  # ends[b]: the source's bytes up to the end of bucket b
            if ends[bucket] <= budget:
                total += ends[bucket] - before[bucket]
            elif before[bucket] < budget:  # the bucket the budget ends in: its documents in digest order
                own = bucket_parts([s for s in scans if s["source_index"] == index], buckets)[bucket]
                table = gather_bucket(work, own, ["digest", "size"])
                rows = sorted(zip(table.column("digest").to_pylist(), [0] * table.num_rows,
                                  [0] * table.num_rows, table.column("size").to_pylist(), strict=True))
                total += sum(r[3] for r in _trim(rows, before[bucket], budget))
    return total


def bucket_task(task: dict) -> dict:
    """Deduplicate, trim and split one bucket into `buckets/bucket-NNNNN.arrow` (sorted by digest)."""
    work = Path(task["work"])
    path = work / "buckets" / f"bucket-{task['bucket']:05d}.arrow"
    if (done := published(path)) is not None:
        return {**done, "resumed": True}
    table = gather_bucket(work, task["parts"], ["digest", "source", "size", "text"])
    priority = {int(k): v for k, v in task["priority"].items()}
    rows = sorted(zip(table.column("digest").to_pylist(), [priority[s] for s in table.column("source").to_pylist()],
                      table.column("source").to_pylist(), table.column("size").to_pylist(),
                      table.column("text").to_pylist(), strict=True))
    del table
    if task["budgets"]:
        by_source = defaultdict(list)
        for row in rows:
            by_source[row[2]].append(row)
        rows = sorted(r for source, own in by_source.items()
                      for r in (_trim(own, *task["budgets"][str(source)]) if str(source) in task["budgets"] else own))
    unique, duplicates = [], 0
    for row in rows:
        if unique and unique[-1][0] == row[0]:
            duplicates += 1
        else:
            unique.append(row)
    val = [is_val(r[0], task["val_fraction"]) for r in unique]
    meta: dict = {"duplicates": duplicates, "bytes_per_source": Counter(), "documents": {"train": 0, "val": 0},
                  "bytes": {"train": 0, "val": 0}}
    for row, held_out in zip(unique, val, strict=True):
        split = "val" if held_out else "train"
        meta["documents"][split] += 1
        meta["bytes"][split] += row[3]
        meta["bytes_per_source"][str(row[2])] += row[3]
    batch = pa.record_batch([pa.array([r[0] for r in unique], pa.binary(32)), pa.array(val, pa.bool_()),
                             pa.array([r[3] for r in unique], pa.int64()),
                             pa.array([r[4] for r in unique], pa.large_string())], schema=_BUCKET)
    return publish(path, lambda tmp: _write_batches(tmp, _BUCKET, [batch]), meta)


def read_bucket(work: Path, bucket: int, columns: list[str]) -> pa.Table:
    with pa.memory_map(str(work / "buckets" / f"bucket-{bucket:05d}.arrow"), "r") as source:
        return ipc.open_file(source).read_all().select(columns)


# --- 3. encode -------------------------------------------------------------------------------------------

def encode_task(task: dict) -> dict:
    """One bucket's train and val documents as token ids (`encoded/bucket-NNNNN.arrow`: batch 0 train,
    batch 1 val)."""
    work = Path(task["work"])
    path = work / "encoded" / f"bucket-{task['bucket']:05d}.arrow"
    if (done := published(path)) is not None:
        return {**done, "resumed": True}
    stat = os.stat(task["tokenizer"])
    tokenizer = _tokenizer(task["tokenizer"], stat.st_size, stat.st_mtime_ns)
    table = read_bucket(work, task["bucket"], ["val", "text"])
    val = table.column("val").to_pylist()
    texts = table.column("text").to_pylist()
    dtype = np.dtype(task["dtype"])
    batches, meta = [], {"tokens": {}}
    for split, held_out in (("train", False), ("val", True)):
        chosen = [t for t, v in zip(texts, val, strict=True) if v == held_out]
        tokens = encode_documents(tokenizer, chosen, eot=task["eot"], dtype=dtype, desc="", progress=False)
        batches.append(pa.record_batch([pa.array(tokens)], names=[TOKEN_COLUMN]))
        meta["tokens"][split] = int(len(tokens))
    return publish(path, lambda tmp: _write_batches(tmp, batches[0].schema, batches), meta)


@functools.lru_cache(maxsize=1)
def _tokenizer(path: str, size: int, mtime_ns: int):
    """One tokenizer per process for all its encode tasks: a fresh one per bucket kept growing this process
    (measured: about 40 MB more resident per pass over the stdlib, loading one per 400 documents)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


def encoded_tokens(work: Path, bucket: int, split: str) -> np.ndarray:
    source = pa.memory_map(str(work / "encoded" / f"bucket-{bucket:05d}.arrow"), "r")
    batch = ipc.open_file(source).get_batch(0 if split == "train" else 1)
    return batch.column(TOKEN_COLUMN).to_numpy(zero_copy_only=True)


# --- materialised, for analyses and tests ----------------------------------------------------------------

def scan_corpus(work: Path, sources: list[str], *, exclude: list[str], text_column: str, mix: dict[str, float],
                idioms_bytes: int, idioms_seed: int, val_fraction: float, engine: str, progress: bool,
                bucket_bytes: float, plan: Plan | None = None) -> tuple[Corpus, list[dict], dict[str, int]]:
    """Stages 1 and 2 into `work`: returns the corpus's counts (no documents), the buckets' sidecars, and
    how many tasks of each stage a killed earlier build had already finished (`resumed`)."""
    plan = plan or plan_units(sources, exclude=exclude, text_column=text_column)
    estimate = plan.listed_bytes + (idioms_bytes if IDIOMS_SOURCE in sources else 0)
    buckets = max(1, math.ceil(estimate / bucket_bytes))
    (work / "scan").mkdir(parents=True, exist_ok=True)
    (work / "buckets").mkdir(exist_ok=True)
    common = {"work": str(work), "text_column": text_column, "buckets": buckets}
    tasks = [{**common, **unit, "index": i} for i, unit in enumerate(plan.units)]
    scans = run_tasks(scan_unit, tasks, engine=engine, desc="scanning sources", unit="unit", progress=progress)
    scans = [{**s, "index": t["index"], "source_index": t["source_index"]} for s, t in zip(scans, tasks, strict=True)]
    budgets = mix_budgets(sources, mix, scans, buckets)
    corpus = Corpus(documents=[], files=sum(s["files"] for s in scans), per_source=dict(plan.files))
    if IDIOMS_SOURCE in sources:
        size = idioms_bytes
        if budgets:
            real, share = kept_bytes(work, scans, budgets, buckets), mix_weights(sources, mix)[IDIOMS_SOURCE]
            size = int(real * share / (1.0 - share)) if real and share < 1.0 else idioms_bytes
        task = {**common, "source": IDIOMS_SOURCE, "source_index": sources.index(IDIOMS_SOURCE), "paths": [],
                "index": len(tasks), "idioms_bytes": size, "idioms_seed": idioms_seed}
        scan = run_tasks(scan_unit, [task], engine="local", desc="generating idioms", unit="unit",
                         progress=progress)[0]
        scans.append({**scan, "index": task["index"], "source_index": task["source_index"], "files": 0})
        corpus.per_source[IDIOMS_SOURCE] = scan["texts"]
    for scan in scans:
        corpus.skipped.update(scan["skipped"])
    real = [i for i, s in enumerate(sources) if s != IDIOMS_SOURCE]
    order = real + [i for i, s in enumerate(sources) if s == IDIOMS_SOURCE]  # dedup keeps the first
    parts = bucket_parts(scans, buckets)
    tasks = [{"work": str(work), "bucket": b, "parts": parts[b], "val_fraction": val_fraction,
              "priority": {str(i): rank for rank, i in enumerate(order)},
              "budgets": {str(i): [before[b], budget] for i, (before, budget) in budgets.items()}}
             for b in range(buckets)]
    results = run_tasks(bucket_task, tasks, engine=engine, desc="deduplicating buckets", unit="bucket",
                        progress=progress)
    for result in results:
        corpus.skipped["duplicate"] += result["duplicates"]
    if not corpus.skipped["duplicate"]:
        del corpus.skipped["duplicate"]
    for i in order:
        corpus.bytes_per_source[sources[i]] = sum(r["bytes_per_source"].get(str(i), 0) for r in results)
    if not sum(r["documents"]["train"] + r["documents"]["val"] for r in results):
        raise DataError(f"data.sources: no usable documents in {sources} (skipped: {dict(corpus.skipped)})")
    resumed = {"scan": sum(bool(s.get("resumed")) for s in scans),
               "buckets": sum(bool(r.get("resumed")) for r in results)}
    return corpus, results, resumed


def collect_documents(
    sources: list[str], *, exclude: list[str], text_column: str, progress: bool = True,
    mix: dict[str, float] | None = None, idioms_bytes: int = 20_000_000, idioms_seed: int = 0,
) -> Corpus:
    """Every document of the sources in memory (deduplicated, mixed, in digest order): the build's scan
    and bucket stages, run locally in a temporary folder. For analyses and tests; the build streams."""
    with tempfile.TemporaryDirectory(prefix="circuitscale-corpus-") as tmp:
        corpus, results, _ = scan_corpus(Path(tmp), sources, exclude=exclude, text_column=text_column,
                                      mix=dict(mix or {}), idioms_bytes=idioms_bytes, idioms_seed=idioms_seed,
                                      val_fraction=0.5, engine="local", progress=progress, bucket_bytes=1e9)
        for bucket in range(len(results)):
            table = read_bucket(Path(tmp), bucket, ["digest", "size", "text"])
            corpus.documents += [Document(text=t, digest=d.hex(), size=s) for d, s, t in zip(
                table.column("digest").to_pylist(), table.column("size").to_pylist(),
                table.column("text").to_pylist(), strict=True)]
    return corpus

