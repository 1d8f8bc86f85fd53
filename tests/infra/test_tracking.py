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
