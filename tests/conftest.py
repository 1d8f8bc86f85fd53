"""Shared fixtures: small real-code corpora copied from the running interpreter's standard library."""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from pipeline.config import ExperimentConfig, resolve_config
from pipeline.data import DataResult, build_data

if not torch.cuda.is_available():
    # Triton kernels are checked on CPU by its interpreter; this must precede any import of triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")



def pytest_terminal_summary(terminalreporter):
    """The fuzzing table (issue 17): inputs tried per family, all of which ended in a clean exit-2 error."""
    fuzz = sys.modules.get("tests.test_fuzz_inputs") or sys.modules.get("test_fuzz_inputs")
    if fuzz is None or not fuzz.TRIED:
        return
    terminalreporter.section("fuzzed inputs: tried = clean errors (exit 2, one line, nothing written)")
    for family, n in sorted(fuzz.TRIED.items()):
        terminalreporter.write_line(f"{family:<45} {n:>6}")
    terminalreporter.write_line(f"{'total':<45} {sum(fuzz.TRIED.values()):>6}")


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


# --- the smoke study (sweeps/smoke.yaml) on the small corpus: run once per session, shared by the study
# tests and the cluster rehearsal (which compares its results against this single-node run) ----------

ROOT = Path(__file__).resolve().parents[1]


def _smoke_args(corpus: Path, cache: Path, storage: Path) -> list[str]:
    return [str(ROOT / "sweeps" / "smoke.yaml"), f"study.storage_path={storage}", f"data.sources=[{corpus}]",
            f"data.cache_dir={cache}", "data.mix=null", "data.vocab_size=512", "data.val_fraction=0.2",
            "data.shard_tokens=20000", "prune.tasks=[if_equals,while_return_true]"]


def _study_cli(args: list[str], env: dict | None = None, **kw) -> subprocess.Popen:
    """`circuitscale study ARGS` in a subprocess (stdout and stderr together)."""
    env = os.environ | {"PYTHONUNBUFFERED": "1"} | (env or {})
    return subprocess.Popen([sys.executable, "-m", "cli.main", "study", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.fixture(scope="session")
def smoke_args():
    return _smoke_args


@pytest.fixture(scope="session")
def study_cli():
    return _study_cli


@pytest.fixture(scope="session")
def smoke_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("smoke-cache")


@pytest.fixture(scope="session")
def smoke_study(small_corpus, smoke_cache, tmp_path_factory):
    """(study folder, its CLI arguments, its output) of one finished single-node smoke study."""
    storage = tmp_path_factory.mktemp("studies")
    args = _smoke_args(small_corpus, smoke_cache, storage)
    proc = _study_cli(args)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-5000:]
    return storage / "smoke", args, out


@pytest.fixture(scope="session")
def tiny_task_setup(small_dataset):
    """(model, node means, train pairs, test pairs, pad id, loader, tokenizer): a 1-layer d32 untrained
    model on the small corpus with 8 if_equals pairs per split, for pruning and viewer tests."""
    from model.config import ModelConfig
    from model.gpt import GPT
    from pipeline.loader import TokenLoader
    from pipeline.prune import node_means
    from pipeline.tasks import TASKS, encode_task
    from pipeline.tokenizer import eot_id

    ds = small_dataset.dataset
    tok = ds.tokenizer()
    torch.manual_seed(0)
    model = GPT(ModelConfig(d_model=32, num_layers=1, d_head=8, context_length=32), tok.get_vocab_size()).eval()
    loader = TokenLoader(ds, split="train", batch_size=4, context_length=32)
    means = node_means(model, loader, 2, "pooled")
    train = encode_task(TASKS["if_equals"], tok, split="train", pairs=8)
    test = encode_task(TASKS["if_equals"], tok, split="test", pairs=8)
    return model, means, train, test, eot_id(tok), loader, tok
