import pyarrow.compute as pc
import pytest

from analysis.load import mlflow_records, to_table, trial_records
from infra.tracking import RunTracker, TrackingConfig
from pipeline.records import TRIAL_FILE, TrialRecord


def test_table_has_one_row_per_trial_and_typed_circuits(study):
    records = trial_records(study)
    table = to_table(records)
    assert table.num_rows == 4 and table.column("dense").to_pylist() == [True, True, False, False]
    circuits = pc.list_flatten(table.column("circuits"))
    assert len(circuits) == 12 and circuits.type.field("edges").type == "int64"
    first = table.column("circuits")[1].as_py()[2]  # 001-dense-big, task c
    assert first == {"task": "c", "status": "found", "nodes": 25, "edges": 50, "unpruned_loss": 0.1,
                     "target_loss": 0.15, "sufficiency_loss": 0.1, "necessity_loss": 1.0,
                     "target_curve": [{"target": 0.3, "k": 5, "edges": 16}], "empty_loss": None, "random_loss": None,
                     "random_edges": None, "attribution_edges": None, "test_accuracy": None}
    assert table.column("seed").to_pylist() == [0, 0, 0, 0] and table.column("lr").to_pylist() == [0.01] * 4
    assert table.column("task_accuracy")[0].as_py() == [("a", 0.9), ("b", 0.9), ("c", 0.9)]
    assert to_table([]).num_rows == 0


def test_trial_records_refuse_a_folder_that_is_not_a_study(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a study folder"):
        trial_records(tmp_path)


def log_run(uri: str, folder, name: str, record_path, status: str, parent: str | None = None) -> str:
    """A run like a study's: tagged with its trial (unless it is the study's parent run), its record logged."""
    (folder / name).mkdir(parents=True)
    tags = {"trial": name} if parent else {}
    tracker = RunTracker(TrackingConfig(uri=uri, experiment="s", parent_run_id=parent, tags=tags), folder / name,
                         run_name=name, params={})
    tracker.log_artifact(record_path)
    tracker.finish(status)
    return tracker.run_id


def test_mlflow_records_equal_the_study_folder_records(study, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    records = trial_records(study)
    paths = {r.trial: study / "trials" / r.trial / TRIAL_FILE for r in records}
    # the study's parent run, FINISHED and holding a trial record, is not a trial
    parent = log_run(uri, tmp_path / "runs", "study", paths["000-dense-small"], "FINISHED")
    for r in records:
        log_run(uri, tmp_path / "runs", r.trial, paths[r.trial], "FINISHED", parent)
    failed = TrialRecord.load(paths["002-sparse"])
    failed.trial = "004-failed"
    (tmp_path / "failed").mkdir()
    failed.save(tmp_path / "failed" / TRIAL_FILE)
    log_run(uri, tmp_path / "runs", failed.trial, tmp_path / "failed" / TRIAL_FILE, "FAILED", parent)

    from_mlflow = mlflow_records(uri, "s")
    assert sorted(from_mlflow, key=lambda r: r.trial) == records
    assert all(isinstance(r, TrialRecord) for r in from_mlflow)
    with pytest.raises(ValueError, match="no MLflow experiment"):
        mlflow_records(uri, "other")


def test_latest_study_is_the_one_whose_trials_changed_last(study, seeded_study, tmp_path):
    import os

    from analysis.load import latest_study

    os.utime(study / "trials" / "002-sparse", (1e9, 2e9))
    assert latest_study(tmp_path) == study.resolve() and latest_study(tmp_path).is_absolute()
    os.utime(seeded_study / "trials" / "000-d_model=32-density=1.0", (1e9, 3e9))
    assert latest_study(tmp_path) == seeded_study.resolve()
    with pytest.raises(FileNotFoundError, match="run `make study` first"):
        latest_study(tmp_path / "none")
