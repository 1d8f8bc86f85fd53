"""The data stage: sources -> deduplicated documents -> train/val split -> BPE -> token shards.

Output is content-addressed: the folder name hashes the documents and every setting that shapes the
tokens, so the same sources and config reuse the existing shards. A build happens in a temporary
folder renamed into place, so an interrupted run leaves nothing half-written.
"""

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import tokenizers
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from infra.checkpoint import file_sha256, write_atomic
from infra.storage import Mirror, StorageError, is_uri
from pipeline import idioms
from pipeline.build import (
    ENGINES,
    Plan,
    drawn_for_tokenizer,
    encode_task,
    encoded_tokens,
    is_val,
    plan_units,
    publish,
    published,
    read_bucket,
    run_tasks,
    scan_corpus,
)
from pipeline.corpus import IDIOMS_SOURCE, STDLIB_SOURCE, Corpus, Document
from pipeline.errors import DataError
from pipeline.shards import ShardWriter, token_dtype, verify_shard
from pipeline.tokenizer import NUM_BYTE_TOKENS, PRETOKENIZE_PATTERN, eot_id, tokenizer_digest, train_tokenizer

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
NODE_CACHE_ENV = "CIRCUITSCALE_DATA_CACHE"
BUILD = "build.json"  # when and how it was built: kept out of the manifest, which depends on the input only
TOKENIZER = "tokenizer.json"
SPLITS = ("train", "val")


@dataclass(kw_only=True, frozen=True)
class DataConfig:
    sources: list[str] = field(default_factory=lambda: [STDLIB_SOURCE])  # folders, globs, datasets, URIs
    exclude: list[str] = field(default_factory=list)  # fnmatch patterns on paths relative to a source
    text_column: str = "text"  # column read from Parquet / Arrow sources
    vocab_size: int = 2048  # METHOD.md 2: 2048-token BPE, end-of-text is the last id
    # Strings that must be single tokens; the task suite needs these and the stdlib corpus does not
    # learn them (measured: `]]\n` splits as `]` + `]\n`, ` enumerate` as four pieces).
    required_tokens: list[str] = field(default_factory=lambda: ["]]\n", " enumerate"])
    val_fraction: float = 0.05  # share of documents (by content hash) held out for validation
    shard_tokens: int = 1 << 24
    cache_dir: str = "runs/data"
    # Byte shares of the sources (source -> weight, e.g. {idioms: 1, "python:stdlib": 3}); null: all of each.
    # (null, not {}, clears a preset's mix: OmegaConf merges dicts key by key)
    mix: dict[str, float] | None = None
    idioms_mb: float = 20.0  # size of the generated `idioms` source when no mix sizes it
    idioms_seed: int = 0
    # BPE is trained on a seeded sample of the train split of about this size (documents drawn by a hash
    # of the seed and their content, so the draw is fixed by the corpus, not by reading order); a train
    # split no larger than it is used whole. Training needs the sample in memory, not the corpus.
    tokenizer_sample_mb: float = 200.0
    tokenizer_sample_seed: int = 0
    # local: the build's tasks run one after another in this process; ray: as Ray Data tasks on every CPU of
    # the cluster (RAY_ADDRESS's, else a local Ray), cache_dir then on storage every node mounts. The same
    # input gives the same shards and manifest either way.
    engine: str = "local"
    bucket_mb: float = 64.0  # text per hash bucket: what one dedup / encode task holds in memory


def check_data_config(cfg: DataConfig) -> None:
    if not cfg.sources:
        raise ValueError("data.sources: must list at least one folder, glob or dataset")
    minimum = NUM_BYTE_TOKENS + 1
    if cfg.vocab_size < minimum:
        raise ValueError(
            f"data.vocab_size: must be at least {minimum} (256 byte tokens + end-of-text), got {cfg.vocab_size}"
        )
    if not 0.0 < cfg.val_fraction < 1.0:
        raise ValueError(f"data.val_fraction: must lie in (0, 1), got {cfg.val_fraction}")
    if cfg.shard_tokens < 1024:
        raise ValueError(f"data.shard_tokens: must be at least 1024, got {cfg.shard_tokens}")
    if any(not token for token in cfg.required_tokens):
        raise ValueError("data.required_tokens: entries must be non-empty strings")
    if not cfg.text_column:
        raise ValueError("data.text_column: must not be empty")
    if cfg.idioms_mb <= 0:
        raise ValueError(f"data.idioms_mb: must be > 0, got {cfg.idioms_mb}")
    if cfg.engine not in ENGINES:
        raise ValueError(f"data.engine: must be one of {', '.join(ENGINES)}, got {cfg.engine!r}")
    if cfg.engine == "ray" and is_uri(cfg.cache_dir):
        raise ValueError("data.engine=ray: its tasks share a work folder under data.cache_dir, so that must be a "
                         f"path every node mounts, not the URI {cfg.cache_dir!r} (data.engine=local builds on "
                         "the driver and uploads there)")
    if not cfg.bucket_mb > 0:
        raise ValueError(f"data.bucket_mb: must be > 0, got {cfg.bucket_mb}")
    if not cfg.tokenizer_sample_mb > 0:
        raise ValueError(f"data.tokenizer_sample_mb: must be > 0, got {cfg.tokenizer_sample_mb}")
    if cfg.mix and set(cfg.mix) != set(cfg.sources):
        raise ValueError(f"data.mix: must weigh exactly the sources {list(cfg.sources)}, got {sorted(cfg.mix)} "
                         "(data.mix=null uses every source whole)")
    if any(w <= 0 for w in (cfg.mix or {}).values()):
        raise ValueError(f"data.mix: weights must be > 0, got {dict(cfg.mix)}")


def node_cache() -> Path:
    """This node's cache of datasets kept on object storage ($CIRCUITSCALE_DATA_CACHE, else
    ~/.cache/circuitscale/data): every rank on the node opens the same copy, fetched once."""
    return Path(os.environ.get(NODE_CACHE_ENV) or "~/.cache/circuitscale/data").expanduser().resolve()


@dataclass(frozen=True)
class Dataset:
    """A built dataset folder: manifest, tokenizer and shards. Opened by URI (`data.cache_dir` on object
    storage), the folder is this node's copy (`node_cache()`): the manifest and tokenizer are fetched at
    open, each shard when first asked for (`shard_path`), checked against the manifest's sha256."""

    folder: Path
    manifest: dict
    source: str | None = None  # the URI the folder is a node-local copy of

    @classmethod
    def open(cls, location: str | Path) -> "Dataset":
        if is_uri(str(location)):
            return cls._fetch(str(location).rstrip("/"))
        folder = Path(location)
        path = folder / MANIFEST
        if not path.is_file():
            raise DataError(f"{folder} is not a dataset folder (no {MANIFEST}); run `circuitscale data`")
        return cls(folder=folder, manifest=json.loads(path.read_text(encoding="utf-8")))

    @classmethod
    def _fetch(cls, uri: str) -> "Dataset":
        mirror = _mirror(uri)
        folder = node_cache() / uri.rsplit("/", 1)[1]
        folder.mkdir(parents=True, exist_ok=True)
        with _locked(folder.parent):  # the ranks of one node fetch once
            for name in (TOKENIZER, MANIFEST):  # the manifest last: a folder with one is complete
                if not (folder / name).is_file():
                    _download(mirror, name, folder / name)
        return cls(folder=folder, manifest=json.loads((folder / MANIFEST).read_text(encoding="utf-8")), source=uri)

    @property
    def location(self) -> str:
        """How another process, on any node, opens this dataset: its URI, else its folder."""
        return self.source or str(self.folder)

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_file(str(self.folder / TOKENIZER))

    def shards(self, split: str) -> list[dict]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return [s for s in self.manifest["shards"] if s["split"] == split]

    def shard_path(self, entry: dict) -> Path:
        """The local file of a manifest's shard entry, fetched (and checked) first if this is a node copy."""
        path = self.folder / entry["file"]
        if self.source is not None and not path.is_file():
            with _locked(self.folder.parent):
                if not path.is_file():
                    _download(_mirror(self.source), entry["file"], path, sha256=entry["sha256"])
        return path


def _mirror(uri: str) -> Mirror:
    try:
        return Mirror.open(uri)
    except StorageError as err:
        raise DataError(f"data.cache_dir: {err}") from None


def _download(mirror: Mirror, name: str, path: Path, *, sha256: str | None = None) -> None:
    tmp = path.with_name(f".{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        try:
            pafs.copy_files(f"{mirror.root}/{name}", str(tmp), source_filesystem=mirror.fs,
                            destination_filesystem=pafs.LocalFileSystem())
        except (OSError, pa.ArrowInvalid) as err:
            raise DataError(f"{mirror.uri}/{name}: cannot fetch it ({str(err).splitlines()[0]}); "
                            "is it a dataset `circuitscale data` built?") from None
        if sha256 is not None and (actual := file_sha256(tmp)) != sha256:
            raise DataError(f"shard {mirror.uri}/{name} is corrupt: sha256 {actual[:12]}... does not match the "
                            f"manifest's {sha256[:12]}...; rerun `circuitscale data` to upload it again")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class DataResult:
    dataset: Dataset
    reused: bool
    seconds: float


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_data(
    cfg: DataConfig, *, config_yaml: str | None = None, progress: bool = True, warn=_stderr
) -> DataResult:
    """Build (or reuse) the dataset for `cfg`; `config_yaml` is written beside the shards. A cached copy is
    checked against its manifest's checksums first; a damaged one is reported (`warn`, with the file's path)
    and rebuilt. A build killed midway resumes from its work folder (`<cache_dir>/.build-<listing key>`)."""
    start = time.perf_counter()
    plan = plan_units(cfg.sources, exclude=cfg.exclude, text_column=cfg.text_column)  # bad sources fail here
    listing = listing_key(cfg, plan)
    if is_uri(cfg.cache_dir):
        return _build_remote(cfg, listing, start, config_yaml=config_yaml, progress=progress, warn=warn)
    cache = Path(cfg.cache_dir).expanduser().resolve()
    created = not cache.exists()
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache):
        index = cache / ".index" / f"{listing}.json"
        known = _read_json(index).get("key")
        if known and _usable(cache / known, warn):  # these very files were built before: no need to read them
            return DataResult(Dataset.open(cache / known), reused=True, seconds=time.perf_counter() - start)
        work = cache / f".build-{listing}"
        if (work / "scan").is_dir() and progress:
            _stderr(f"resuming the build in {work}")
        try:
            corpus, buckets, resumed = scan_corpus(
                work, cfg.sources, exclude=cfg.exclude, text_column=cfg.text_column, mix=dict(cfg.mix or {}),
                idioms_bytes=int(cfg.idioms_mb * 1e6), idioms_seed=cfg.idioms_seed, val_fraction=cfg.val_fraction,
                engine=cfg.engine, progress=progress, bucket_bytes=cfg.bucket_mb * 1e6, plan=plan)
            for name in SPLITS:
                if not sum(b["documents"][name] for b in buckets):
                    raise DataError(f"data.val_fraction: the {name} split is empty with "
                                    f"{sum(sum(b['documents'].values()) for b in buckets)} documents; "
                                    "adjust data.val_fraction or add sources")
        except DataError:
            shutil.rmtree(work, ignore_errors=True)  # bad input, not an interruption: nothing to resume
            if created and {p.name for p in cache.iterdir()} <= {".lock"}:
                shutil.rmtree(cache, ignore_errors=True)  # nor a cache folder this build made for nothing
            raise
        train_bytes = sum(b["bytes"]["train"] for b in buckets)
        share = cfg.tokenizer_sample_mb * 1e6 / max(train_bytes, 1)
        key = cache_key(cfg, _digests(work, len(buckets)), sampled=share < 1.0)
        folder = cache / key
        if not _usable(folder, warn):
            _assemble(folder, work, cfg, corpus, buckets, min(share, 1.0), key, config_yaml, progress, plan, resumed)
            reused = False
        else:
            reused = True
        index.parent.mkdir(exist_ok=True)
        write_atomic(index, json.dumps({"key": key}, indent=2) + "\n")
        shutil.rmtree(work, ignore_errors=True)
    return DataResult(Dataset.open(folder), reused=reused, seconds=time.perf_counter() - start)


def _build_remote(cfg: DataConfig, listing: str, start: float, **kwargs) -> DataResult:
    """`data.cache_dir` on object storage: a dataset this listing built is opened from there (this node
    fetches what it reads); else it is built (or reused) in this node's cache and uploaded, its index
    entry last, so an entry names a complete upload."""
    mirror = _mirror(cfg.cache_dir)
    index = f".index/{listing}.json"
    try:
        with mirror.fs.open_input_stream(f"{mirror.root}/{index}") as stream:
            known = json.loads(stream.read().decode("utf-8"))["key"]
    except (OSError, ValueError, KeyError):
        known = None
    if known:
        return DataResult(Dataset.open(f"{mirror.uri}/{known}"), reused=True, seconds=time.perf_counter() - start)
    local = build_data(dataclasses.replace(cfg, cache_dir=str(node_cache())), **kwargs)
    key = local.dataset.folder.name
    mirror.child(key).push(local.dataset.folder)
    tmp = node_cache() / ".index" / f"{listing}.json"
    mirror.fs.create_dir(f"{mirror.root}/.index", recursive=True)
    pafs.copy_files(str(tmp), f"{mirror.root}/{index}", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=mirror.fs)
    dataset = Dataset(folder=local.dataset.folder, manifest=local.dataset.manifest, source=f"{mirror.uri}/{key}")
    return DataResult(dataset, reused=local.reused, seconds=time.perf_counter() - start)


def listing_key(cfg: DataConfig, plan: Plan) -> str:
    """Hash of the listed files (path, size, mtime) and of every setting but where the output goes and which
    engine builds it: names the work folder a killed build resumes from, and the index entry that lets an
    unchanged listing reuse its dataset without reading the files again."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("cache_dir", "engine")}
    if IDIOMS_SOURCE in cfg.sources:  # generated: its code is part of its content
        settings["idioms_code"] = hashlib.sha256(Path(idioms.__file__).read_bytes()).hexdigest()
    digest = hashlib.sha256(json.dumps([FORMAT_VERSION, settings, tokenizers.__version__], sort_keys=True,
                                       default=str).encode("utf-8"))
    for path, size, mtime in plan.fingerprint:
        digest.update(f"{path}\0{size}\0{mtime}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:20]


@contextlib.contextmanager
def _locked(cache: Path) -> Iterator[None]:
    """One build (or one node copy's fetch) at a time per folder: a second waits, then finds the first's."""
    with open(cache / ".lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _usable(folder: Path, warn) -> bool:
    """Whether `folder` holds an intact dataset; a damaged one is reported and moved out of the way."""
    if not (folder / MANIFEST).is_file():
        return False
    if problem := _damage(folder):
        # the cache is ours and content-addressed: a damaged copy is rebuilt, byte-identical, not trusted
        warn(f"dataset {folder}: {problem}; rebuilding it")
        trash = folder.parent / f".tmp-damaged-{folder.name}-{uuid.uuid4().hex[:8]}"
        os.rename(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)
        return False
    return True


def _digests(work: Path, buckets: int) -> Iterator[bytes]:
    for bucket in range(buckets):
        yield from read_bucket(work, bucket, ["digest"]).column("digest").to_pylist()


def _damage(folder: Path) -> str | None:
    """What is wrong with a cached dataset's files (a shard that fails its manifest checksum, a manifest that
    does not parse), or None. Reading every shard once costs about a second per 100M tokens."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        shards = [(folder / e["file"], e["sha256"]) for e in manifest["shards"]]
    except (ValueError, KeyError, TypeError) as err:
        return f"{folder / MANIFEST} is not a readable manifest ({type(err).__name__}: {err})"
    for path, sha256 in shards:
        try:
            verify_shard(path, sha256)
        except DataError as err:
            return str(err).split(";")[0]
    return None


def split_documents(documents: list[Document], val_fraction: float) -> dict[str, list[Document]]:
    """Deterministic split by content hash: a file lands in the same split in every run."""
    splits: dict[str, list[Document]] = {"train": [], "val": []}
    for doc in documents:
        splits["val" if is_val(bytes.fromhex(doc.digest), val_fraction) else "train"].append(doc)
    for name, docs in splits.items():
        if not docs:
            raise DataError(
                f"data.val_fraction: the {name} split is empty with {len(documents)} documents; "
                "adjust data.val_fraction or add sources"
            )
    return splits


def cache_key(cfg: DataConfig, digests: Iterable[bytes], *, sampled: bool = False) -> str:
    """Hash of the documents and of every setting that changes the tokens (not where they came from). The
    tokenizer sample's settings count only where they draw a sample (`sampled`): a corpus used whole keeps
    the key it had before the sample existed."""
    settings = {
        "format": FORMAT_VERSION,
        "tokenizers": tokenizers.__version__,
        "pattern": PRETOKENIZE_PATTERN,
        "vocab_size": cfg.vocab_size,
        "required_tokens": list(cfg.required_tokens),
        "val_fraction": cfg.val_fraction,
        "shard_tokens": cfg.shard_tokens,
    }
    if sampled:
        settings["tokenizer_sample"] = {"mb": cfg.tokenizer_sample_mb, "seed": cfg.tokenizer_sample_seed}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode("utf-8"))
    for raw in digests:  # the documents' sha256 digests, in digest order
        digest.update(raw)
    return digest.hexdigest()[:20]


def _assemble(folder: Path, work: Path, cfg: DataConfig, corpus: Corpus, buckets: list[dict], share: float,
              key: str, config_yaml: str | None, progress: bool, plan: Plan, resumed: dict[str, int]) -> None:
    """Stages 3 and 4: train BPE on the sample, encode every bucket, cut the shards into `work/out`, write
    the manifest, and rename the folder into place."""
    tokenizer, drawn = _tokenizer(work, cfg, share, len(buckets), progress)
    eot, dtype = eot_id(tokenizer), token_dtype(cfg.vocab_size)
    (work / "encoded").mkdir(exist_ok=True)
    tasks = [{"work": str(work), "bucket": b, "tokenizer": str(work / TOKENIZER), "eot": eot, "dtype": dtype.name}
             for b in range(len(buckets))]
    encoded = run_tasks(encode_task, tasks, engine=cfg.engine, desc="encoding buckets", unit="bucket",
                        progress=progress)
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    shutil.copyfile(work / TOKENIZER, out / TOKENIZER)
    shards, split_stats = [], {}
    for name in SPLITS:
        writer = ShardWriter(out, split=name, shard_tokens=cfg.shard_tokens, dtype=dtype)
        for bucket in tqdm(range(len(buckets)), desc=f"writing {name} shards", unit="bucket", disable=not progress):
            writer.add(encoded_tokens(work, bucket, name))
        shards += writer.close()
        split_stats[name] = {"documents": sum(b["documents"][name] for b in buckets),
                             "bytes": sum(b["bytes"][name] for b in buckets),
                             "tokens": sum(e["tokens"][name] for e in encoded)}
    manifest = {
        "format_version": FORMAT_VERSION,
        "key": key,
        "sources": list(cfg.sources),
        "exclude": list(cfg.exclude),
        "files": {"read": corpus.files, "per_source": corpus.per_source,
                  "skipped": dict(sorted(corpus.skipped.items()))},
        "bytes_per_source": corpus.bytes_per_source,
        "documents": sum(split_stats[n]["documents"] for n in SPLITS),
        "splits": split_stats,
        "tokenizer": {
            "file": TOKENIZER,
            "sha256": tokenizer_digest(tokenizer),
            "vocab_size": tokenizer.get_vocab_size(),
            "eot_id": eot,
            "required_tokens": {t: tokenizer.token_to_id(_byte_level(tokenizer, t)) for t in cfg.required_tokens},
            "trained_on": {"documents": drawn["documents"], "bytes": drawn["bytes"], "share": share,
                           "seed": cfg.tokenizer_sample_seed if share < 1.0 else None},
        },
        "dtype": dtype.name,
        "shards": shards,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    resumed = {**resumed, "encoded": sum(bool(e.get("resumed")) for e in encoded)}
    build = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "engine": cfg.engine,
             "buckets": len(buckets), "scan_units": len(plan.units), "resumed": resumed}
    (out / BUILD).write_text(json.dumps(build, indent=2) + "\n", encoding="utf-8")
    if config_yaml is not None:
        (out / "config.yaml").write_text(config_yaml, encoding="utf-8")
    os.rename(out, folder)


def _tokenizer(work: Path, cfg: DataConfig, share: float, buckets: int, progress: bool) -> tuple[Tokenizer, dict]:
    """BPE trained on the train documents the sample draws (all of them where share is 1), in digest order;
    published in the work folder, so a resumed build encodes with the very same one."""
    path = work / TOKENIZER
    if (done := published(path)) is not None:
        return Tokenizer.from_file(str(path)), done["trained_on"]
    texts, size = [], 0
    for bucket in range(buckets):
        table = read_bucket(work, bucket, ["digest", "val", "size", "text"])
        mask = [not v and (share >= 1.0 or drawn_for_tokenizer(d, share, cfg.tokenizer_sample_seed))
                for d, v in zip(table.column("digest").to_pylist(), table.column("val").to_pylist(), strict=True)]
        chosen = table.filter(pa.array(mask, pa.bool_()))
        texts += chosen.column("text").to_pylist()
        size += sum(chosen.column("size").to_pylist())
    try:
        if not texts:
            raise DataError("the sample drew no documents")
        tokenizer = train_tokenizer(texts, vocab_size=cfg.vocab_size, required_tokens=cfg.required_tokens,
                                    progress=progress)
    except DataError as err:
        if share >= 1.0:
            raise
        raise DataError(f"data.tokenizer_sample_mb: BPE trained on a sample of {share:.1%} of the train split "
                        f"({cfg.tokenizer_sample_mb:g} MB): {err}; raise data.tokenizer_sample_mb") from None
    drawn = {"documents": len(texts), "bytes": size}
    publish(path, lambda tmp: tokenizer.save(str(tmp)), {"trained_on": drawn})
    return tokenizer, drawn


def _byte_level(tokenizer: Tokenizer, text: str) -> str:
    return tokenizer.pre_tokenizer.pre_tokenize_str(text)[0][0]
