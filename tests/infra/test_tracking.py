import json
from contextlib import nullcontext

import pytest
from mlflow.tracking import MlflowClient

from infra.tracking import RunTracker, TrackingConfig, tracked_run


def test_run_is_resumed_nested_and_finished_even_after_a_failed_call(tmp_path, monkeypatch):
    cfg = TrackingConfig(experiment="e", parent_run_id=None, tags={"trial": "t0"})
    tracker = RunTracker(cfg, tmp_path, run_name="r", params={"a": 1})
    tracker.log_metrics({"loss": 1.5, "bad": float("nan")}, step=3)
    first = tracker.client
    calls = []

    def flaky(run_id, status):  # an interrupt left the client unusable: the first attempt fails
        calls.append(status)
        raise RuntimeError("session gone")

    monkeypatch.setattr(first, "set_terminated", flaky)
    tracker.finish("FINISHED")
    assert calls == ["FINISHED"] and tracker.client is not first  # retried with a fresh client
    client = MlflowClient(tracking_uri=tracker.uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["trial"] == "t0" and run.data.params["a"] == "1"
    assert run.data.metrics == {"loss": 1.5}  # non-finite values stay in metrics.jsonl only
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["step"] == 3
    again = RunTracker(cfg, tmp_path, run_name="r", params={})
    assert again.resumed and again.run_id == tracker.run_id
    (tmp_path / "child").mkdir()
    child = RunTracker(TrackingConfig(uri=tracker.uri, experiment="e", parent_run_id=tracker.run_id),
                       tmp_path / "child", run_name="c", params={})
    assert client.get_run(child.run_id).data.tags["mlflow.parentRunId"] == tracker.run_id
    again.finish("KILLED", "stopped")
    child.finish("FINISHED")
    assert client.get_run(tracker.run_id).info.status == "KILLED"


@pytest.mark.parametrize(("raised", "status", "reason"), [
    (None, "FINISHED", None),
    (ValueError("bad shard"), "FAILED", "ValueError: bad shard"),
    (KeyboardInterrupt(), "KILLED", "interrupted"),
])
def test_tracked_run_owns_the_status_of_every_outcome(tmp_path, raised, status, reason):
    cfg = TrackingConfig(experiment="e")
    with pytest.raises(type(raised)) if raised else nullcontext():
        with tracked_run(cfg, tmp_path / "run", params={"a": 1}) as tracker:
            tracker.log_metrics({"loss": 1.0}, step=1)
            if raised:
                raise raised
    run = MlflowClient(tracking_uri=tracker.uri).get_run(tracker.run_id)
    assert run.info.status == status and run.data.tags.get("failure_reason") == reason
    with tracked_run(cfg, tmp_path / "run") as again:  # the same folder continues the same run
        assert again.resumed and again.run_id == tracker.run_id


def test_a_copied_run_folder_gets_a_new_run_in_its_new_store(tmp_path):
    """A run folder copied elsewhere and pruned with another tracking.uri named a run that store does not
    hold, and MLflow's "Run with id=... not found" came out as a traceback."""
    original = tmp_path / "original"
    with tracked_run(TrackingConfig(experiment="e"), original) as first:
        pass
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "mlflow_run.json").write_text((original / "mlflow_run.json").read_text())
    elsewhere = f"sqlite:///{tmp_path / 'other.db'}"
    with tracked_run(TrackingConfig(uri=elsewhere, experiment="e"), copy) as second:
        assert not second.resumed and second.run_id != first.run_id
    run = MlflowClient(tracking_uri=elsewhere).get_run(second.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["circuitscale.continues"].startswith(first.run_id)
    assert json.loads((copy / "mlflow_run.json").read_text())["run_id"] == second.run_id
    with tracked_run(TrackingConfig(uri=elsewhere, experiment="e"), copy) as third:  # and resumes from then on
        assert third.resumed and third.run_id == second.run_id


def test_a_resumed_run_sends_the_metrics_its_store_lacks(tmp_path):
    """A process killed while its metrics waited for the tracking server: metrics.jsonl has them (one line
    torn by the kill), the store does not. The resumed run sends each missing (key, step) once."""
    cfg = TrackingConfig(experiment="e")
    first = RunTracker(cfg, tmp_path, run_name="r", params={})
    first.log_metrics({"loss": 3.0}, step=1)
    assert first.flush() == 0
    with open(tmp_path / "metrics.jsonl", "a") as jsonl:  # what reached the file and never the store
        jsonl.write(json.dumps({"step": 2, "time": 1.0, "loss": 2.0, "acc": 0.5}) + "\n")
        jsonl.write(json.dumps({"step": 3, "time": 2.0, "loss": 1.0}) + "\n")
        jsonl.write('{"step": 4, "time": 3.0, "lo')
    again = RunTracker(cfg, tmp_path, run_name="r", params={})
    assert again.resumed and again.run_id == first.run_id
    again.log_metrics({"loss": 0.5}, step=5)
    again.finish("FINISHED")
    client = MlflowClient(tracking_uri=again.uri)
    assert sorted((m.step, m.value) for m in client.get_metric_history(again.run_id, "loss")) == [
        (1, 3.0), (2, 2.0), (3, 1.0), (5, 0.5)]
    assert [(m.step, m.value) for m in client.get_metric_history(again.run_id, "acc")] == [(2, 0.5)]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 5  # after the torn line, on a line of its own
    third = RunTracker(cfg, tmp_path, run_name="r", params={})  # nothing missing: nothing sent twice
    third.finish("FINISHED")
    assert len(client.get_metric_history(again.run_id, "loss")) == 4


@pytest.mark.slow
def test_metrics_logged_while_the_server_is_down_reach_it_afterwards(tmp_path):
    """An MLflow server stopped mid-run and started again: logging never waits on it, and every metric
    reaches it once it is back; the run ends FINISHED."""
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    from tests.servers import free_port

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    command = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
               f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(tmp_path / "artifacts"),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]

    def start() -> subprocess.Popen:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                return proc
            except OSError:
                time.sleep(0.5)
        raise AssertionError("mlflow server did not start")

    def stop(proc: subprocess.Popen) -> None:
        import os
        import signal
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    server = start()
    try:
        (tmp_path / "run").mkdir()
        tracker = RunTracker(TrackingConfig(uri=uri, experiment="e"), tmp_path / "run", run_name="r", params={})
        tracker.log_metrics({"loss": 4.0}, step=0)
        assert tracker.flush() == 0
        stop(server)
        for step in (1, 2, 3):
            began = time.perf_counter()
            tracker.log_metrics({"loss": 4.0 - step}, step=step)
            assert time.perf_counter() - began < 1.0  # training does not wait for the server
        time.sleep(3)
        server = start()
        tracker.finish("FINISHED")
        client = MlflowClient(tracking_uri=uri)
        assert sorted(m.step for m in client.get_metric_history(tracker.run_id, "loss")) == [0, 1, 2, 3]
        assert client.get_run(tracker.run_id).info.status == "FINISHED"
    finally:
        stop(server)


def test_a_run_created_by_a_process_killed_before_recording_it_is_adopted_not_duplicated(tmp_path):
    """The creating process died after MLflow made the run and before mlflow_run.json named it (SIGKILL, or
    a disk that filled there): the next start adopts that run, so the store never holds a RUNNING orphan
    beside a second run of the same folder."""
    cfg = TrackingConfig(experiment="e", tags={"trial": "t0"})
    uri = f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    (tmp_path / "mlflow_run.json").write_text(json.dumps({"token": "abc123", "uri": uri}))
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("e")
    orphan = client.create_run(experiment, run_name="r", tags={"circuitscale.token": "abc123"}).info.run_id
    with tracked_run(cfg, tmp_path, params={"a": 1}) as tracker:
        assert tracker.resumed and tracker.run_id == orphan
    runs = client.search_runs([experiment])
    assert [r.info.run_id for r in runs] == [orphan] and runs[0].info.status == "FINISHED"
    assert runs[0].data.params == {"a": "1"}
    assert json.loads((tmp_path / "mlflow_run.json").read_text())["run_id"] == orphan
    # died before MLflow made it: the token is reused for the one run made now
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "mlflow_run.json").write_text(json.dumps({"token": "def456", "uri": uri}))
    with tracked_run(TrackingConfig(uri=uri, experiment="e"), tmp_path / "b") as fresh:
        assert not fresh.resumed
    assert client.get_run(fresh.run_id).data.tags["circuitscale.token"] == "def456"
    assert len(client.search_runs([experiment])) == 2


def test_a_run_record_that_does_not_parse_names_the_file(tmp_path):
    (tmp_path / "mlflow_run.json").write_text('{"run_id": "ab')
    with pytest.raises(ValueError, match="mlflow_run.json is not a run record"):
        RunTracker(TrackingConfig(experiment="e"), tmp_path, run_name="r", params={})
