import json
import os
import shutil
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from pipeline import data as data_stage
from pipeline.build import collect_documents
from pipeline.config import resolve_config
from pipeline.data import Dataset, build_data, split_documents
from pipeline.errors import DataError
from tests.conftest import copy_packages, small_config


def test_build_writes_manifest_tokenizer_and_shards(small_dataset):
    ds = small_dataset.dataset
    m = ds.manifest
    assert not small_dataset.reused
    assert m["tokenizer"]["vocab_size"] == 512 and m["tokenizer"]["eot_id"] == 511
    assert m["splits"]["train"]["tokens"] > 50_000 and m["splits"]["val"]["tokens"] > 0
    assert sum(s["tokens"] for s in ds.shards("train")) == m["splits"]["train"]["tokens"]
    assert len(ds.shards("train")) > 1  # shard_tokens=20000 cut the train split
    tok = Tokenizer.from_file(str(ds.folder / "tokenizer.json"))
    assert len(tok.encode("]]\n").ids) == 1


def test_second_build_is_a_cache_hit(small_corpus, tmp_path):
    cfg = small_config(small_corpus, tmp_path)
    first = build_data(cfg.data, progress=False)
    start = time.perf_counter()
    second = build_data(cfg.data, progress=False)
    assert second.reused and not first.reused
    assert second.dataset.folder == first.dataset.folder
    assert time.perf_counter() - start < 10
    changed = build_data(small_config(small_corpus, tmp_path, "data.vocab_size=500").data, progress=False)
    assert not changed.reused and changed.dataset.folder != first.dataset.folder


def test_a_damaged_cached_dataset_is_named_and_rebuilt_byte_identical(small_corpus, tmp_path):
    """A shard flipped on disk (bad sector, a half-finished copy) or a truncated manifest: the next build
    says which file and rebuilds the same bytes, instead of every trial failing on it later."""
    cfg = small_config(small_corpus, tmp_path, "data.shard_tokens=20000")
    first = build_data(cfg.data, progress=False)
    folder = first.dataset.folder
    shards = sorted(folder.glob("*.arrow"))
    originals = {p.name: p.read_bytes() for p in shards}
    raw = bytearray(originals[shards[1].name])
    raw[len(raw) // 2] ^= 0xFF
    shards[1].write_bytes(bytes(raw))
    warnings = []
    again = build_data(cfg.data, progress=False, warn=warnings.append)
    assert not again.reused and again.dataset.folder == folder
    assert len(warnings) == 1 and str(shards[1]) in warnings[0] and "corrupt" in warnings[0], warnings
    assert {p.name: p.read_bytes() for p in sorted(folder.glob("*.arrow"))} == originals
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    (folder / "manifest.json").write_text('{"shards": [')
    warnings.clear()
    assert not build_data(cfg.data, progress=False, warn=warnings.append).reused
    assert "manifest.json is not a readable manifest" in warnings[0]
    assert build_data(cfg.data, progress=False, warn=warnings.append).reused and len(warnings) == 1


def test_unusable_files_are_skipped_and_counted(tmp_path):
    root = copy_packages(tmp_path / "src", ("json",))
    (root / "binary.py").write_bytes(b"x = 1\x00\x01\x02")
    (root / "latin1.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))
    (root / "empty.py").write_text("  \n\n")
    (root / "copy.py").write_text((root / "json" / "decoder.py").read_text())
    (root / "notes.txt").write_text("not python")
    corpus = collect_documents([str(root)], exclude=[], text_column="text", progress=False)
    assert corpus.skipped == {"binary": 1, "not_utf8": 1, "empty": 1, "duplicate": 1}
    assert len(corpus.documents) == len(list((root / "json").glob("*.py")))


def test_split_is_by_content_hash(small_corpus):
    docs = collect_documents([str(small_corpus)], exclude=[], text_column="text", progress=False).documents
    full = split_documents(docs, 0.2)
    part = split_documents(docs[::2], 0.2)
    val = {d.digest for d in full["val"]}
    assert {d.digest for d in part["val"]} == val & {d.digest for d in docs[::2]}
    assert 0.05 < len(full["val"]) / len(docs) < 0.4


def test_exclude_and_glob_sources(small_corpus):
    everything = collect_documents([str(small_corpus)], exclude=[], text_column="text", progress=False)
    no_json = collect_documents([str(small_corpus)], exclude=["json/*"], text_column="text", progress=False)
    globbed = collect_documents([f"{small_corpus}/json/*.py"], exclude=[], text_column="text", progress=False)
    assert len(no_json.documents) + len(globbed.documents) == len(everything.documents)


def test_parquet_arrow_and_uri_sources(small_corpus, tmp_path):
    texts = [p.read_text() for p in sorted(small_corpus.rglob("*.py"))]
    table = pa.table({"id": list(range(len(texts))), "content": texts + []})
    pq.write_table(table, tmp_path / "code.parquet")
    with pa.OSFile(str(tmp_path / "code.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    py = collect_documents([str(small_corpus)], exclude=[], text_column="text", progress=False)
    for source in (str(tmp_path / "code.parquet"), str(tmp_path / "code.arrow"), f"file://{tmp_path}/code.parquet"):
        got = collect_documents([source], exclude=[], text_column="content", progress=False)
        assert [d.digest for d in got.documents] == [d.digest for d in py.documents], source


@pytest.mark.parametrize("case", ["missing", "no_python", "bad_parquet", "no_column", "bad_uri"])
def test_bad_sources_fail_before_writing(case, tmp_path):
    cache = tmp_path / "cache"
    if case == "missing":
        source, fragment = str(tmp_path / "nowhere"), "does not exist"
    elif case == "no_python":
        (tmp_path / "docs").mkdir()
        (tmp_path / "docs" / "README.md").write_text("# hi\n")
        source, fragment = str(tmp_path / "docs"), "no Python files"
    elif case == "bad_parquet":
        (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
        source, fragment = str(tmp_path / "broken.parquet"), "cannot read dataset"
    elif case == "no_column":
        pq.write_table(pa.table({"body": ["x = 1\n"]}), tmp_path / "t.parquet")
        source, fragment = str(tmp_path / "t.parquet"), "has no column 'text' (columns: body)"
    else:
        source, fragment = "nosuchscheme://bucket/data", "cannot open"
    cfg = small_config(tmp_path, cache, f"data.sources=['{source}']")
    with pytest.raises(DataError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        build_data(cfg.data, progress=False)
    assert not cache.exists() or not any(cache.iterdir())


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "build.json"}


def test_an_interrupted_build_resumes_from_its_finished_stages(small_corpus, tmp_path, monkeypatch):
    """Ctrl-C while encoding: the work folder keeps the scanned units and deduplicated buckets, the next
    build says it resumed them, writes the same bytes as an uninterrupted build, and clears the folder."""
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    clean = build_data(small_config(small_corpus, tmp_path / "clean").data, progress=False).dataset
    cfg = small_config(small_corpus, tmp_path / "cache", "data.bucket_mb=0.2")
    monkeypatch.setattr(data_stage, "encode_task", boom)
    with pytest.raises(KeyboardInterrupt):
        build_data(cfg.data, progress=False)
    work = [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".build-")]
    assert len(work) == 1 and list((work[0] / "buckets").glob("*.arrow.json"))
    monkeypatch.undo()
    again = build_data(cfg.data, progress=False).dataset
    record = json.loads((again.folder / "build.json").read_text())
    assert record["buckets"] > 1 and record["resumed"] == {"scan": record["scan_units"], "buckets": record["buckets"],
                                                           "encoded": 0}
    assert again.folder.name == clean.folder.name and _files(again.folder) == _files(clean.folder)
    assert not work[0].exists()


def test_an_unchanged_listing_is_reused_without_reading_the_files(small_corpus, tmp_path, monkeypatch):
    """The second build lists the sources (names, sizes, times) and finds the dataset this very listing
    built; a touched file is read again, and the same documents still name the same dataset."""
    corpus = tmp_path / "src"
    shutil.copytree(small_corpus, corpus)
    cfg = small_config(corpus, tmp_path / "cache")
    first = build_data(cfg.data, progress=False)

    def refuse(*args, **kwargs):
        raise AssertionError("read the corpus again")

    with monkeypatch.context() as patch:
        patch.setattr(data_stage, "scan_corpus", refuse)
        assert build_data(cfg.data, progress=False).reused
    os.utime(next(corpus.rglob("*.py")), (time.time() + 60, time.time() + 60))
    with monkeypatch.context() as patch:
        patch.setattr(data_stage, "scan_corpus", refuse)
        with pytest.raises(AssertionError, match="read the corpus again"):
            build_data(cfg.data, progress=False)
    touched = build_data(cfg.data, progress=False)
    assert touched.reused and touched.dataset.folder == first.dataset.folder


@pytest.fixture(scope="module")
def many_files(small_corpus, tmp_path_factory):
    """A corpus of a few thousand files: 3000 generated programs one per file, the small corpus, a Parquet
    dataset repeating some of them, and the unusable files of every kind; with the dataset one local build
    made of it (the reference the engines, bucket counts and resumed builds must match byte for byte)."""
    from pipeline.idioms import generate

    root = tmp_path_factory.mktemp("many")
    shutil.copytree(small_corpus, root / "src" / "lib")
    programs = [t for _, t in zip(range(3000), generate(7, 10**9), strict=False)]
    for i, text in enumerate(programs):
        folder = root / "src" / f"gen{i // 500}"
        folder.mkdir(exist_ok=True)
        (folder / f"p{i:04d}.py").write_text(text, encoding="utf-8")
    (root / "src" / "binary.py").write_bytes(b"x = 1\x00\x01")
    (root / "src" / "latin1.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))
    (root / "src" / "empty.py").write_text("\n")
    pq.write_table(pa.table({"content": programs[:200] + ["x = 2\n", "", None]}), root / "src" / "rows.parquet",
                   row_group_size=50)
    extra = ["data.text_column=content", "data.shard_tokens=50000"]
    reference = build_data(small_config(root / "src", root / "reference", *extra).data, progress=False).dataset
    return root / "src", extra, reference


@pytest.mark.slow
def test_engines_and_bucket_counts_write_identical_datasets(many_files, tmp_path):
    """`data.engine=local` and `data.engine=ray` (Ray Data tasks on a local Ray) and any bucket size give
    the same folder name, manifest, tokenizer and shards."""
    import ray

    import sweeps.data_engine  # noqa: F401  (what `circuitscale data` imports for engine=ray)

    source, extra, reference = many_files
    m = reference.manifest
    assert m["files"]["read"] > 3000 and len(reference.shards("train")) > 1
    empty = sum(not p.read_text().strip() for p in (source / "lib").rglob("*.py"))  # e.g. a bare __init__.py
    assert m["files"]["skipped"] == {"binary": 1, "duplicate": 200, "empty": 3 + empty, "not_utf8": 1}
    for engine, bucket_mb in (("local", 0.05), ("ray", 0.1)):
        cfg = small_config(source, tmp_path / engine, *extra, f"data.engine={engine}", f"data.bucket_mb={bucket_mb}")
        try:
            built = build_data(cfg.data, progress=False).dataset
        finally:
            ray.shutdown()  # the next test that needs Ray starts its own
        record = json.loads((built.folder / "build.json").read_text())
        assert record["engine"] == engine and record["buckets"] > 10, record
        assert built.folder.name == reference.folder.name and _files(built.folder) == _files(reference.folder), engine


@pytest.mark.slow
def test_a_build_killed_midway_resumes_from_its_checksummed_files(many_files, tmp_path):
    """SIGKILL runs no cleanup: the next build finds the killed one's scanned units and deduplicated buckets
    (each checked against its sidecar's sha256), does only the rest, and writes the same dataset."""
    import signal
    import subprocess
    import sys

    source, extra, reference = many_files
    cache = tmp_path / "cache"
    args = [f"data.sources=[{source}]", f"data.cache_dir={cache}", "data.vocab_size=512", "data.val_fraction=0.2",
            "data.bucket_mb=0.02", *extra]
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "data", "--no-progress", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(list(cache.glob(".build-*/buckets/*.arrow.json"))) >= 3:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, proc.stderr.read()[-2000:]
    work = list(cache.glob(".build-*"))
    assert len(work) == 1 and not list(cache.glob("*/manifest.json"))
    units = len(list(work[0].glob("scan/*.arrow.json")))
    buckets = len(list(work[0].glob("buckets/*.arrow.json")))
    (work[0] / "buckets" / "bucket-00000.arrow").write_bytes(b"half-written")  # a damaged file is redone
    resumed = build_data(small_config(source, cache, *args).data, progress=False).dataset
    record = json.loads((resumed.folder / "build.json").read_text())
    assert record["resumed"]["scan"] == units == record["scan_units"]
    assert record["resumed"]["buckets"] == buckets - 1 and buckets - 1 < record["buckets"]
    assert resumed.folder.name == reference.folder.name and _files(resumed.folder) == _files(reference.folder)
    assert not work[0].exists()


def test_a_cache_on_object_storage_is_built_once_and_fetched_by_each_node(small_corpus, tmp_path, monkeypatch):
    """data.cache_dir as a URI (file:// goes the way s3:// does): the first build happens in the node's cache
    and is uploaded; another node reuses it without reading the sources, fetches the manifest and tokenizer
    at open and the shards its loader reads, each checked; a corrupt upload is named, not trained on."""
    from pipeline.loader import TokenLoader

    remote = f"file://{tmp_path / 'bucket' / 'data'}"
    monkeypatch.setenv(data_stage.NODE_CACHE_ENV, str(tmp_path / "node1"))
    cfg = small_config(small_corpus, remote, "data.shard_tokens=20000").data
    first = build_data(cfg, progress=False)
    key = first.dataset.folder.name
    uploaded = tmp_path / "bucket" / "data" / key
    assert not first.reused and first.dataset.location == f"{remote}/{key}"
    assert _files(uploaded) == _files(first.dataset.folder)
    assert list((tmp_path / "bucket" / "data" / ".index").iterdir())

    monkeypatch.setenv(data_stage.NODE_CACHE_ENV, str(tmp_path / "node2"))
    with monkeypatch.context() as patch:
        patch.setattr(data_stage, "scan_corpus", lambda *a, **k: pytest.fail("read the corpus again"))
        again = build_data(cfg, progress=False)
    assert again.reused and again.dataset.folder == tmp_path / "node2" / key
    assert sorted(p.name for p in again.dataset.folder.iterdir()) == ["manifest.json", "tokenizer.json"]
    loader = TokenLoader(Dataset.open(again.dataset.location), split="val", batch_size=2, context_length=16)
    assert loader.batch(0).shape == (2, 17)
    fetched = sorted(p.name for p in again.dataset.folder.glob("*.arrow"))
    assert fetched == [e["file"] for e in again.dataset.shards("val")]  # the train shards stay remote
    assert all((again.dataset.folder / n).read_bytes() == (uploaded / n).read_bytes() for n in fetched)

    train = again.dataset.shards("train")[0]["file"]
    raw = bytearray((uploaded / train).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (uploaded / train).write_bytes(bytes(raw))
    with pytest.raises(DataError, match=f"shard {remote}/{key}/{train} is corrupt"):
        TokenLoader(again.dataset, split="train", batch_size=2, context_length=16)
    assert not (again.dataset.folder / train).exists()
    with pytest.raises(ValueError, match="data.engine=ray"):
        small_config(small_corpus, remote, "data.engine=ray")


def test_data_engine_is_checked(tmp_path):
    with pytest.raises(ValueError, match="data.engine: must be one of local, ray"):
        small_config(tmp_path, tmp_path, "data.engine=spark")
    with pytest.raises(ValueError, match="data.bucket_mb"):
        small_config(tmp_path, tmp_path, "data.bucket_mb=0")


def test_dataset_open_rejects_other_folders(tmp_path):
    with pytest.raises(DataError, match="not a dataset folder"):
        Dataset.open(tmp_path)


@pytest.mark.slow
def test_stdlib_corpus_learns_the_punctuation_tokens(stdlib_dataset):
    """The default corpus (METHOD.md 8: ~31.5 MB, ~10.3M tokens at 3.04 bytes/token)."""
    result = stdlib_dataset
    cfg = resolve_config(None, [f"data.cache_dir={result.dataset.folder.parent}"])
    m = result.dataset.manifest
    tokens = sum(s["tokens"] for s in m["splits"].values())
    assert 8e6 < tokens < 14e6
    tok = result.dataset.tokenizer()
    for text in ['("', "('", "]\n", "],", "]]\n", " enumerate"]:
        assert len(tok.encode(text).ids) == 1, text
    assert json.loads((result.dataset.folder / "manifest.json").read_text())["tokenizer"]["eot_id"] == 2047
    assert build_data(cfg.data, progress=False).reused


def test_bpe_is_trained_on_a_seeded_sample_of_the_train_split(tmp_path):
    """A train split larger than data.tokenizer_sample_mb trains BPE on a documented, reproducible sample
    of about that size (the manifest says what it drew); one that fits is used whole and keeps the key it
    always had. The corpus: 0.6 MB of generated programs (thousands of small documents)."""
    def config(name, *extra):
        return resolve_config(None, [f"data.cache_dir={tmp_path / name}", "data.sources=[idioms]",
                                     "data.idioms_mb=0.6", "data.vocab_size=512", *extra]).data

    whole = build_data(config("whole"), progress=False).dataset
    trained = whole.manifest["tokenizer"]["trained_on"]
    assert trained["share"] == 1.0 and trained["seed"] is None
    assert trained["documents"] == whole.manifest["splits"]["train"]["documents"] > 1000
    documents = collect_documents(["idioms"], exclude=[], text_column="text", progress=False,
                                  idioms_bytes=600_000).documents
    digests = (bytes.fromhex(d.digest) for d in documents)
    assert whole.manifest["key"] == data_stage.cache_key(config("whole"), digests)  # the key it always had

    sampled = [build_data(config(name, "data.tokenizer_sample_mb=0.15"), progress=False).dataset for name in "ab"]
    drawn = sampled[0].manifest["tokenizer"]["trained_on"]
    assert drawn == sampled[1].manifest["tokenizer"]["trained_on"] and drawn["seed"] == 0
    assert 0.2 < drawn["share"] < 0.35 and 0.8 * 150_000 < drawn["bytes"] < 1.2 * 150_000  # about the size asked for
    assert sampled[0].manifest["key"] == sampled[1].manifest["key"] != whole.manifest["key"]
    vocab = [(d.folder / "tokenizer.json").read_bytes() for d in (*sampled, whole)]
    assert vocab[0] == vocab[1] != vocab[2]  # reproducible, and not the whole split's
    for split in ("train", "val"):  # the sample trains BPE only: every document is still encoded
        assert sampled[0].manifest["splits"][split]["documents"] == whole.manifest["splits"][split]["documents"]
    tok = Tokenizer.from_file(str(sampled[0].folder / "tokenizer.json"))
    assert len(tok.encode("]]\n").ids) == 1 and tok.get_vocab_size() == 512  # required tokens still hold

    other = build_data(config("c", "data.tokenizer_sample_mb=0.15", "data.tokenizer_sample_seed=1"),
                       progress=False).dataset
    assert other.manifest["key"] != sampled[0].manifest["key"]
    assert (other.folder / "tokenizer.json").read_bytes() != vocab[0]  # another seed, another draw

    with pytest.raises(DataError, match="data.tokenizer_sample_mb"):  # a sample too small for the vocabulary
        build_data(config("d", "data.tokenizer_sample_mb=0.0005"), progress=False)
    with pytest.raises(ValueError, match="data.tokenizer_sample_mb"):
        config("e", "data.tokenizer_sample_mb=0")
