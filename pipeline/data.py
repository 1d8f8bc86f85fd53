"""The data stage: sources -> deduplicated documents -> train/val split -> BPE -> token shards.

Output is content-addressed: the folder name hashes the documents and every setting that shapes the
tokens, so the same sources and config reuse the existing shards. A build happens in a temporary
folder renamed into place, so an interrupted run leaves nothing half-written.
"""

import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import tokenizers
from tokenizers import Tokenizer

from pipeline.corpus import STDLIB_SOURCE, Corpus, Document, collect_documents
from pipeline.errors import DataError
from pipeline.shards import encode_documents, token_dtype, verify_shard, write_shards
from pipeline.tokenizer import NUM_BYTE_TOKENS, PRETOKENIZE_PATTERN, eot_id, tokenizer_digest, train_tokenizer

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
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
    if not cfg.tokenizer_sample_mb > 0:
        raise ValueError(f"data.tokenizer_sample_mb: must be > 0, got {cfg.tokenizer_sample_mb}")
    if cfg.mix and set(cfg.mix) != set(cfg.sources):
        raise ValueError(f"data.mix: must weigh exactly the sources {list(cfg.sources)}, got {sorted(cfg.mix)} "
                         "(data.mix=null uses every source whole)")
    if any(w <= 0 for w in (cfg.mix or {}).values()):
        raise ValueError(f"data.mix: weights must be > 0, got {dict(cfg.mix)}")


@dataclass(frozen=True)
class Dataset:
    """A built dataset folder: manifest, tokenizer and shards."""

    folder: Path
    manifest: dict

    @classmethod
    def open(cls, folder: str | Path) -> "Dataset":
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.is_file():
            raise DataError(f"{folder} is not a dataset folder (no {MANIFEST}); run `circuitscale data`")
        return cls(folder=folder, manifest=json.loads(path.read_text(encoding="utf-8")))

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_file(str(self.folder / TOKENIZER))

    def shards(self, split: str) -> list[dict]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return [s for s in self.manifest["shards"] if s["split"] == split]


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
    and rebuilt."""
    start = time.perf_counter()
    corpus = collect_documents(
        cfg.sources, exclude=cfg.exclude, text_column=cfg.text_column, progress=progress,
        mix=dict(cfg.mix or {}),
        idioms_bytes=int(cfg.idioms_mb * 1e6), idioms_seed=cfg.idioms_seed,
    )
    splits = split_documents(corpus.documents, cfg.val_fraction)
    sample = tokenizer_sample(cfg, splits["train"])
    key = cache_key(cfg, corpus.documents, sampled=sample is not None)
    folder = Path(cfg.cache_dir).expanduser().resolve() / key
    if (folder / MANIFEST).is_file() and (problem := _damage(folder)):
        # the cache is ours and content-addressed: a damaged copy is rebuilt, byte-identical, not trusted
        warn(f"dataset {folder}: {problem}; rebuilding it")
        trash = folder.parent / f".tmp-damaged-{key}-{uuid.uuid4().hex[:8]}"
        os.rename(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)
    if not (folder / MANIFEST).is_file():
        _build_into(folder, cfg, corpus, splits, sample, key, config_yaml, progress)
        return DataResult(Dataset.open(folder), reused=False, seconds=time.perf_counter() - start)
    return DataResult(Dataset.open(folder), reused=True, seconds=time.perf_counter() - start)


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
        position = int(doc.digest[:16], 16) / float(1 << 64)
        splits["val" if position < val_fraction else "train"].append(doc)
    for name, docs in splits.items():
        if not docs:
            raise DataError(
                f"data.val_fraction: the {name} split is empty with {len(documents)} documents; "
                "adjust data.val_fraction or add sources"
            )
    return splits


def tokenizer_sample(cfg: DataConfig, train: list[Document]) -> tuple[list[Document], float] | None:
    """The train documents BPE is trained on and the share drawn, or None when the split is used whole
    (it holds no more than `data.tokenizer_sample_mb`). A document is drawn when a hash of the seed and
    its content digest falls below share = sample bytes / split bytes: the draw depends on the corpus and
    the seed only, and a streaming reader can make it one document at a time."""
    total = sum(d.size for d in train)
    share = cfg.tokenizer_sample_mb * 1e6 / max(total, 1)
    if share >= 1.0:
        return None
    seed = str(cfg.tokenizer_sample_seed).encode("ascii")
    drawn = [d for d in train
             if int.from_bytes(hashlib.sha256(seed + bytes.fromhex(d.digest)).digest()[:8], "big") < share * 2**64]
    return drawn, share


def cache_key(cfg: DataConfig, documents: list[Document], *, sampled: bool = False) -> str:
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
    for doc in documents:
        digest.update(bytes.fromhex(doc.digest))
    return digest.hexdigest()[:20]


def _build_into(
    folder: Path,
    cfg: DataConfig,
    corpus: Corpus,
    splits: dict[str, list[Document]],
    sample: tuple[list[Document], float] | None,
    key: str,
    config_yaml: str | None,
    progress: bool,
) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    for stale in folder.parent.glob(f".tmp-{key}-*"):  # a build of this key killed midway on this machine
        pid = stale.name.split("-")[2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    staging = folder.parent / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        manifest = _write_dataset(staging, cfg, corpus, splits, sample, key, progress)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if config_yaml is not None:
            (staging / "config.yaml").write_text(config_yaml, encoding="utf-8")
        try:
            os.rename(staging, folder)
        except OSError:
            if not (folder / MANIFEST).is_file():  # not a concurrent twin build: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_dataset(
    staging: Path, cfg: DataConfig, corpus: Corpus, splits: dict[str, list[Document]],
    sample: tuple[list[Document], float] | None, key: str, progress: bool
) -> dict:
    drawn, share = sample if sample is not None else (splits["train"], 1.0)
    try:
        if not drawn:
            raise DataError("the sample drew no documents")
        tokenizer = train_tokenizer(
            [d.text for d in drawn], vocab_size=cfg.vocab_size, required_tokens=cfg.required_tokens, progress=progress
        )
    except DataError as err:
        if sample is None:
            raise
        raise DataError(f"data.tokenizer_sample_mb: BPE trained on a sample of {share:.1%} of the train split "
                        f"({cfg.tokenizer_sample_mb:g} MB): {err}; raise data.tokenizer_sample_mb") from None
    tokenizer.save(str(staging / TOKENIZER))
    dtype = token_dtype(cfg.vocab_size)
    shards, split_stats = [], {}
    for name, docs in splits.items():
        texts = [d.text for d in docs]
        tokens = encode_documents(
            tokenizer, texts, eot=eot_id(tokenizer), dtype=dtype, desc=f"encoding {name}", progress=progress
        )
        shards += write_shards(tokens, staging, split=name, shard_tokens=cfg.shard_tokens)
        num_bytes = sum(d.size for d in docs)
        split_stats[name] = {"documents": len(docs), "bytes": num_bytes, "tokens": int(len(tokens))}
    return {
        "format_version": FORMAT_VERSION,
        "key": key,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sources": list(cfg.sources),
        "exclude": list(cfg.exclude),
        "files": {"read": corpus.files, "per_source": corpus.per_source, "skipped": dict(corpus.skipped)},
        "bytes_per_source": corpus.bytes_per_source,
        "documents": len(corpus.documents),
        "splits": split_stats,
        "tokenizer": {
            "file": TOKENIZER,
            "sha256": tokenizer_digest(tokenizer),
            "vocab_size": tokenizer.get_vocab_size(),
            "eot_id": eot_id(tokenizer),
            "required_tokens": {t: tokenizer.token_to_id(_byte_level(tokenizer, t)) for t in cfg.required_tokens},
            "trained_on": {"documents": len(drawn), "bytes": sum(d.size for d in drawn),
                           "share": share, "seed": cfg.tokenizer_sample_seed if sample is not None else None},
        },
        "dtype": dtype.name,
        "shards": shards,
    }


def _byte_level(tokenizer: Tokenizer, text: str) -> str:
    return tokenizer.pre_tokenizer.pre_tokenize_str(text)[0][0]
