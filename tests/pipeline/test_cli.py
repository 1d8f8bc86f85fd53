import subprocess
import sys
from pathlib import Path

import pytest

from cli.main import main
from pipeline.config import resolve_config
from tests.conftest import copy_packages

SCRIPT = Path(sys.executable).parent / "circuitscale"


def data_args(corpus, cache, *extra):
    """The `data` command line; `extra` replaces a default key (the CLI rejects a key set twice)."""
    args = {"data.sources": f"[{corpus}]", "data.cache_dir": str(cache), "data.vocab_size": "400",
            "data.val_fraction": "0.2"}
    args.update(e.split("=", 1) for e in extra)
    return ["data", "--no-progress", *(f"{k}={v}" for k, v in args.items())]


def test_data_verb_builds_then_reuses_and_saves_its_config(tmp_path, capsys):
    corpus = copy_packages(tmp_path / "src", ("json", "html"))
    assert main(data_args(corpus, tmp_path / "cache")) == 0
    first = capsys.readouterr().out
    assert first.startswith("built dataset") and "train:" in first and "end-of-text id 399" in first
    assert main(data_args(corpus, tmp_path / "cache")) == 0
    second = capsys.readouterr().out
    assert second.startswith("reused cached dataset")
    (folder,) = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]  # .index, .lock
    assert str(folder) in second
    saved = resolve_config(folder / "config.yaml")
    assert saved.data.vocab_size == 400 and saved.data.sources == [str(corpus)]


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["sparsity.density=2"], "sparsity.density: must lie in (0, 1]"),
        (["model.d_model=100"], "model.d_model: must be divisible"),
        (["model.nope=1"], "model.nope"),
        (["data.sources=[/no/such/dir]"], "does not exist"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, extra, fragment):
    corpus = copy_packages(tmp_path / "src", ("json",))
    assert main(data_args(corpus, tmp_path / "cache", *extra)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("circuitscale: error: ") and fragment in err
    assert not (tmp_path / "cache").exists()


def test_a_key_set_twice_on_the_command_line_is_an_error(tmp_path, capsys):
    """Which of two values wins is not for the user to guess (Hydra refuses it too)."""
    corpus = copy_packages(tmp_path / "src", ("json",))
    assert main([*data_args(corpus, tmp_path / "cache"), "data.vocab_size=500"]) == 2
    err = capsys.readouterr().err
    assert err == ("circuitscale: error: overrides 'data.vocab_size=400' and 'data.vocab_size=500' set "
                   "data.vocab_size twice; keep one\n")
    assert not (tmp_path / "cache").exists()


def test_console_script_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run(
        [str(SCRIPT), "data", "--config", str(tmp_path / "missing.yaml")],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"circuitscale: error: --config: file {tmp_path / 'missing.yaml'} does not exist"
