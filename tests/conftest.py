"""Shared fixtures: small real-code corpora copied from the running interpreter's standard library."""

import os
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

from pipeline.config import ExperimentConfig, resolve_config
from pipeline.data import DataResult, build_data

if not torch.cuda.is_available():
    # Triton kernels are checked on CPU by its interpreter; this must precede any import of triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SMALL_PACKAGES = ("json", "html", "urllib", "http")  # about 0.5 MB of real Python


def copy_packages(dest: Path, packages: tuple[str, ...] = SMALL_PACKAGES) -> Path:
    for name in packages:
        shutil.copytree(STDLIB / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    return copy_packages(tmp_path_factory.mktemp("corpus"))


def small_config(corpus: Path, cache: Path, *extra: str) -> ExperimentConfig:
    return resolve_config(
        None,
        [f"data.sources=[{corpus}]", f"data.cache_dir={cache}", "data.vocab_size=512", "data.val_fraction=0.2", *extra],
    )


@pytest.fixture(scope="session")
def small_dataset(small_corpus, tmp_path_factory) -> DataResult:
    cfg = small_config(small_corpus, tmp_path_factory.mktemp("cache"), "data.shard_tokens=20000")
    return build_data(cfg.data, progress=False)


@pytest.fixture(scope="session")
def stdlib_dataset(tmp_path_factory) -> DataResult:
    """The default corpus and tokenizer (the running interpreter's standard library, vocab 2048)."""
    cfg = resolve_config(None, [f"data.cache_dir={tmp_path_factory.mktemp('stdlib')}"])
    return build_data(cfg.data, progress=False)
