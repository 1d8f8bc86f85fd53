"""`circuitscale bridge DENSE_RUN` (pipeline/bridge.py) on a tiny dense run of the small corpus: it trains,
exports a bridge that loads back, logs to MLflow, resumes bit-identically after SIGKILL, and refuses bad
inputs in one line."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from cli.main import main
from pipeline.bridge import bridge_figures, load_bridge
from pipeline.config import resolve_config
from pipeline.trial import run_trial
from tests.killing import kill_after_checkpoints

SCRIPT = Path(sys.executable).parent / "circuitscale"
KEYS = {"dense_loss", "bridged_loss", "sparse_loss", "nmse_encode_mean", "nmse_decode_mean", "kl_dense_prefix",
        "kl_sparse_prefix", "loss_correlation"}


def tiny(corpus, cache, run_dir, *extra) -> list[str]:
    return [f"data.sources=[{corpus}]", f"data.cache_dir={cache}", "data.vocab_size=512", "data.val_fraction=0.2",
            "data.shard_tokens=20000", "data.mix=null", "model.d_model=32", "model.num_layers=2",
            "model.context_length=32", "train.batch_size=8", "train.steps=60", "train.eval_every=30",
            "train.checkpoint_every=30", "train.eval_batches=2", "sparsity.density=1.0", f"train.run_dir={run_dir}",
            *extra]


@pytest.fixture(scope="module")
def dense_run(small_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("bridge")
    run_dir = root / "dense"
    run_trial(resolve_config(None, tiny(small_corpus, root / "cache", run_dir)), progress=False, log=lambda _: None)
    return run_dir


def bridge_args(run_dir: Path, *extra: str) -> list[str]:
    """The bridge command line; `extra` replaces a default key (the CLI rejects a key set twice)."""
    defaults = {"bridge.run_dir": str(run_dir.parent / "bridge"), "model.d_model": "16", "sparsity.density": "0.25",
                "bridge.steps": "40", "train.checkpoint_every": "10", "train.eval_every": "20"}
    defaults.update(e.split("=", 1) for e in extra)
    return ["bridge", "--no-progress", str(run_dir), *(f"{k}={v}" for k, v in defaults.items())]


def test_bridge_trains_exports_and_logs_its_figures(dense_run, capsys):
    assert main(bridge_args(dense_run)) == 0
    out = capsys.readouterr().out.strip().splitlines()
    figures = json.loads(out[-1])
    folder = dense_run.parent / "bridge"
    (dense_run.parent / "bridge.done").touch()  # the steering test below uses this bridge
    assert out[-2] == f"bridge run in {folder.resolve()}"
    assert set(figures) == KEYS and all(math.isfinite(v) for v in figures.values())
    assert -1.0 <= figures["loss_correlation"] <= 1.0
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if "nmse_encode_mean" in m]
    assert [m["step"] for m in evals][:2] == [20, 40]  # every evaluation logs the bridge's figures
    for term in ("nmse_encode_mean", "nmse_decode_mean"):  # 40 steps already pull the two streams together
        first = next(m[term] for m in metrics if term in m)
        assert figures[term] < first, term
    assert "nmse_encode/h1.mid" in evals[0] and "substituted_loss/final" in evals[0]
    # the export loads back without the run and reproduces the final figures
    pair = load_bridge(folder)
    assert set(load_file(str(folder / "export" / "bridge.safetensors"))) >= {"encoders.0.weight", "decoders.4.bias"}
    assert json.loads((folder / "export" / "bridge.json").read_text())["sites"] == [
        "h0.pre", "h0.mid", "h1.pre", "h1.mid", "final"]
    from pipeline.config import token_loader
    from pipeline.data import build_data

    cfg = resolve_config(folder / "config.yaml")
    val = token_loader(cfg, build_data(cfg.data, progress=False).dataset, "val", shuffle=False)
    again = bridge_figures(pair, [val.batch(i) for i in range(cfg.train.eval_batches)])
    assert again["bridged_loss"] == pytest.approx(figures["bridged_loss"], rel=1e-5)
    record = json.loads((folder / "mlflow_run.json").read_text())
    run = MlflowClient(tracking_uri=record["uri"]).get_run(record["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["kind"] == "bridge"
    assert "kl_dense_prefix" in run.data.metrics and "loss_correlation" in run.data.metrics
    # a rerun reuses the finished bridge
    assert main(bridge_args(dense_run)) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == figures


@pytest.mark.slow
def test_sigkill_then_rerun_is_bit_identical(dense_run, tmp_path):
    def cli(folder: Path) -> subprocess.Popen:
        args = bridge_args(dense_run, "bridge.steps=120", f"bridge.run_dir={folder}")
        return subprocess.Popen([str(SCRIPT), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert cli(straight).wait(timeout=600) == 0
    done = kill_after_checkpoints(cli(killed), killed)
    assert done < 120, "the run finished before it could be killed"
    rerun = cli(killed)
    output = rerun.communicate(timeout=600)[0]
    assert rerun.returncode == 0, output
    for name in ("model.safetensors", "bridge.safetensors"):
        a, b = load_file(str(straight / "export" / name)), load_file(str(killed / "export" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_bad_inputs_get_one_line_errors(dense_run, small_corpus, tmp_path, capsys):
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    (untrained / "config.yaml").write_text((dense_run / "config.yaml").read_text())
    sparse = tmp_path / "sparse"
    sparse.mkdir()
    dense_yaml = (dense_run / "config.yaml").read_text()
    (sparse / "config.yaml").write_text(dense_yaml.replace("density: 1.0", "density: 0.25"))
    cases = [
        ([str(untrained)], "holds no trained model"),
        ([str(sparse)], "is a sparse run"),
        ([str(dense_run), "sparsity.density=0.01"], "sparsity"),  # 16 wide at 1/100 breaks the per-neuron floor
        ([str(dense_run), "model.num_layers=3"], "layer count"),
        ([str(tmp_path / "nowhere")], "is not a run folder"),
        ([str(tmp_path / "seed=0")], "is not a run folder"),  # a study trial's folder name holds '='
    ]
    (tmp_path / "seed=0").mkdir()
    for extra, message in cases:
        args = ["bridge", "--no-progress", *extra[:1], f"bridge.run_dir={tmp_path / 'b'}", "model.d_model=16",
                "sparsity.density=0.25", "bridge.steps=2", *extra[1:]]
        assert main(args) == 2, extra
        err = capsys.readouterr().err.strip()
        assert err.startswith("circuitscale: error:") and message in err and "\n" not in err, (extra, err)


def test_steer_writes_its_curve_and_control_and_logs_them(dense_run, capsys):
    folder = dense_run.parent / "bridge"
    if not (dense_run.parent / "bridge.done").exists():
        assert main(bridge_args(dense_run)) == 0
    capsys.readouterr()
    args = ["steer", "--no-progress", "--task", "while_return_true", "--nodes", "2", "--max-strength", "2",
            str(folder), "prune.steps=5", "prune.pairs=8", "prune.mean_batches=2"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["task"] == "while_return_true" and len(result["curve"]) == 31
    assert result["curve"][0][0] == 0.0 and result["curve"][-1][0] == 2.0
    assert all(0.0 <= p <= 1.0 for _, p in result["curve"])
    assert result["circuit"]["status"] in ("found", "unreachable", "direct")
    steer = folder / "steer" / "while_return_true"
    saved = json.loads((steer / "steering.json").read_text())
    assert len(saved["nodes"]) == len(saved["random_nodes"]) == 2 and not set(map(tuple, saved["nodes"])) & set(
        map(tuple, saved["random_nodes"]))
    assert (steer / "steering.png").stat().st_size > 5_000 and (steer / "steering.svg").is_file()
    record = json.loads((folder / "mlflow_run.json").read_text())
    client = MlflowClient(tracking_uri=record["uri"])
    assert client.get_run(record["run_id"]).info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(record["run_id"], "steer/while_return_true")} >= {
        "steer/while_return_true/steering.json", "steer/while_return_true/steering.png"}
    assert main(["steer", "--no-progress", "--task", "no_such_task", str(folder)]) == 2


def test_bridge_trains_on_two_deepspeed_workers(dense_run, tmp_path, capsys):
    """The bridge's loss reaches the pair through DeepSpeed's engine (ZeRO-2 on gloo here)."""
    args = bridge_args(dense_run, "trial.workers=2", "deepspeed.zero_stage=2", "bridge.steps=20",
                       f"bridge.run_dir={tmp_path / 'two'}")
    assert main(args) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(figures) == KEYS and all(math.isfinite(v) for v in figures.values())
    assert set(load_file(str(tmp_path / "two" / "export" / "bridge.safetensors"))) >= {"encoders.0.weight"}
