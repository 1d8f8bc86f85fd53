"""The study end to end: `circuitscale study sweeps/smoke.yaml` on a small corpus, resumed after a
SIGKILL, re-run without re-running finished trials, and the analysis notebook executed against it."""

import json
import os
import signal
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[2]


def child_runs(folder: Path) -> list:
    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("smoke")
    return [r for r in client.search_runs([experiment.experiment_id])
            if "mlflow.parentRunId" in r.data.tags and r.data.tags.get("kind") != "lr_search"]


def metrics_lines(folder: Path) -> dict[str, int]:
    return {p.parent.name: len(p.read_text().splitlines()) for p in (folder / "trials").glob("*/metrics.jsonl")}


@pytest.fixture(scope="module")
def smoke(smoke_study):
    return smoke_study


@pytest.mark.slow
def test_smoke_study_runs_every_trial_and_reports_a_frontier(smoke):
    folder, _, out = smoke
    final = json.loads(out.strip().splitlines()[-1])
    assert set(final) == {"wall_s", "overhead_ratio", "sparse_dense_edge_ratio"} and final["wall_s"] > 0
    assert f"report: {folder / 'report' / 'report.html'}" in out
    trials = sorted(p.name for p in (folder / "trials").iterdir())
    assert len(trials) == 3
    for name in trials:
        record = json.loads((folder / "trials" / name / "trial.json").read_text())
        assert record["circuits_tried"] == 2 and record["val_loss"] > 0
        # the driver built the data once; every rank on every node names the same absolute folder
        assert Path(yaml.safe_load((folder / "trials" / name / "config.yaml").read_text())["data"]["cache_dir"]
                    ).is_absolute()
        for task, circuit in record["circuits"].items():
            # 20 steps teach no task: honest pruning finds circuits only where the whole model reaches the target
            assert circuit["status"] in ("found", "unreachable", "direct") and circuit["empty_loss"] is not None
            assert (folder / "trials" / name / "circuits" / f"{task}.html").is_file()  # the viewer says why
    headline = json.loads((folder / "report" / "headline.json").read_text())
    assert headline["trials"] == 3 and headline["seeds"] == {name: 1 for name in trials}
    for key in ("sparse_dense_edge_ratio", "sparse_dense_edge_ratio_ci95", "ratio_tasks", "direct_path_tasks"):
        assert key in headline
    assert (folder / "report" / "frontier.png").stat().st_size > 10_000
    runs = child_runs(folder)  # one nested child run per trial, all finished, tagged
    assert sorted(r.data.tags["trial"] for r in runs) == trials
    assert all(r.info.status == "FINISHED" and r.data.tags["study"] == "smoke" for r in runs)
    assert all("circuit/if_equals/seconds" in r.data.metrics and "val_loss" in r.data.metrics for r in runs)
    assert all(r.data.tags["kind"] == "trial" and r.data.tags["point"] == r.data.tags["trial"] for r in runs)
    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    parent = client.get_run(runs[0].data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials"] == 3


@pytest.mark.slow
def test_lr_search_chooses_each_points_rate_before_the_trials(small_corpus, smoke_cache, tmp_path, study_cli,
                                                              smoke_args):
    """The smoke study's sparse point alone, unpruned, after a search over two learning rates."""
    args = smoke_args(small_corpus, smoke_cache, tmp_path) + [
        "study.name=lr", "study.points=[]", "study.prune=false", "study.lr_search.lrs=[0.001,0.03]"]
    proc = study_cli(args)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-5000:]
    folder = tmp_path / "lr"
    search = json.loads((folder / "lr_search.json").read_text())
    assert search["lrs"] == [0.001, 0.03] and list(search["points"]) == ["000-d_model=32-density=0.25"]
    chosen = search["points"]["000-d_model=32-density=0.25"]
    (rung,) = chosen["rungs"]  # two rates, eta 2: one rung decides
    losses = {float(lr): loss for lr, loss in rung["val_loss"].items()}
    assert rung["steps"] == 5 and all(loss is not None for loss in losses.values())  # a quarter of 20 steps
    assert chosen["lr"] == min(losses, key=losses.get)
    record = json.loads((folder / "trials" / "000-d_model=32-density=0.25" / "trial.json").read_text())
    assert record["lr"] == chosen["lr"]  # the trial trained at its point's chosen rate
    candidates = sorted(p.name for p in (folder / "lr_search").iterdir())
    assert candidates == ["000-d_model=32-density=0.25-lr=0.001-steps=5", "000-d_model=32-density=0.25-lr=0.03-steps=5"]
    assert f"learning rates: 000-d_model=32-density=0.25 {chosen['lr']:g}" in out
    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    parent_id = json.loads((folder / "mlflow_run.json").read_text())["run_id"]
    assert [k for k in client.get_run(parent_id).data.metrics if k.startswith("lr/")] == [
        "lr/000-d_model_32-density_0.25"]
    searched = [r for r in client.search_runs([client.get_experiment_by_name("lr").experiment_id])
                if r.data.tags.get("kind") == "lr_search"]
    assert len(searched) == 2 and all(r.info.status == "FINISHED" for r in searched)
    report = (folder / "report" / "report.md").read_text()
    assert "Chosen per point by successive halving" in report


@pytest.mark.slow
def test_rerun_keeps_finished_trials(smoke, study_cli):
    folder, args, _ = smoke
    before = metrics_lines(folder)
    proc = study_cli(args)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert metrics_lines(folder) == before  # no trial trained or logged again
    assert len(child_runs(folder)) == 3


@pytest.mark.slow
def test_notebook_executes_against_the_study(smoke):
    import nbformat
    from nbclient import NotebookClient

    folder, _, _ = smoke
    nb = nbformat.read(ROOT / "analysis" / "frontier.ipynb", as_version=4)
    os.environ["CIRCUITSCALE_STUDY"] = str(folder)
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    finally:
        del os.environ["CIRCUITSCALE_STUDY"]
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 5  # the report's five figures
    assert any("3 trials" in o.get("text", "") for o in outputs)


@pytest.mark.slow
def test_interrupted_study_resumes_with_one_run_per_trial(small_corpus, smoke_cache, tmp_path, study_cli, smoke_args):
    """Ctrl-C after the first trial, SIGKILL after the second, then the same command finishes the study:
    finished trials are not rerun and MLflow holds exactly one finished child run per trial."""
    storage = tmp_path / "studies"
    args = smoke_args(small_corpus, smoke_cache, storage) + ["study.max_concurrent_trials=1"]
    folder = storage / "smoke"

    def run_until(done: int, sig: int) -> tuple[int, str]:
        proc = study_cli(args, start_new_session=True)
        deadline = time.time() + 600
        while len(list((folder / "trials").glob("*/trial.json"))) < done:
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.5)
        if sig == signal.SIGINT:
            proc.send_signal(signal.SIGINT)  # Ctrl-C reaches the driver
        else:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
        out, _ = proc.communicate(timeout=300)
        return proc.returncode, out

    code, out = run_until(1, signal.SIGINT)
    assert code == 130 and "interrupted" in out, out[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    parent_id = json.loads((folder / "mlflow_run.json").read_text())["run_id"]
    assert client.get_run(parent_id).info.status == "KILLED"
    run_until(2, signal.SIGKILL)
    done_before = {p.parent.name for p in (folder / "trials").glob("*/trial.json")}
    lines_before = metrics_lines(folder)
    proc = study_cli(args)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-5000:]
    assert "(resumed)" in out
    after = metrics_lines(folder)
    assert len(done_before) >= 2 and all(after[name] == lines_before[name] for name in done_before)
    runs = child_runs(folder)
    assert len(runs) == 3 and len({r.data.tags["trial"] for r in runs}) == 3
    assert all(r.info.status == "FINISHED" for r in runs)
    assert client.get_run(parent_id).info.status == "FINISHED"


@pytest.mark.slow
def test_ui_serves_the_study_store_on_loopback(smoke):
    import subprocess
    import sys

    from tests.servers import assert_serves_on_loopback, free_port

    folder, _, _ = smoke
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "ui", str(folder), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert_serves_on_loopback(proc, port)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
