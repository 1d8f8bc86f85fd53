"""A study's trial records: from the trial records in the study folder (offline), or from the study's
MLflow experiment (the child runs' `trial.json` artifacts), and as a pyarrow table for notebooks.

`to_table` has one row per trial (the columns of `pipeline.records.TrialRecord` and `dense`), its
`circuits` a list of structs, one per task.
"""

from dataclasses import asdict
from pathlib import Path

import pyarrow as pa

from infra.tracking import download_run_artifacts
from pipeline.records import TRIAL_FILE, TrialRecord

CURVE_POINT = pa.struct([("target", pa.float64()), ("k", pa.int64()), ("edges", pa.int64())])
CIRCUIT = pa.struct([
    ("task", pa.string()), ("status", pa.string()), ("nodes", pa.int64()), ("edges", pa.int64()),
    ("unpruned_loss", pa.float64()), ("target_loss", pa.float64()), ("sufficiency_loss", pa.float64()),
    ("necessity_loss", pa.float64()), ("target_curve", pa.list_(CURVE_POINT)), ("empty_loss", pa.float64()),
    ("random_loss", pa.float64()), ("random_edges", pa.int64()), ("attribution_edges", pa.int64()),
    ("test_accuracy", pa.float64()),
])
TRIAL = pa.schema([
    ("trial", pa.string()), ("study", pa.string()), ("d_model", pa.int64()), ("num_layers", pa.int64()),
    ("density", pa.float64()), ("params_total", pa.int64()), ("l0_total", pa.float64()),
    ("val_loss", pa.float64()), ("residual_kurtosis", pa.float64()), ("task_accuracy_mean", pa.float64()),
    ("circuit_edges_geomean", pa.float64()), ("circuits_found", pa.int64()), ("circuits_tried", pa.int64()),
    ("overlap_nodes_mean", pa.float64()), ("train_seconds", pa.float64()), ("prune_seconds", pa.float64()),
    ("circuits", pa.list_(CIRCUIT)), ("seed", pa.int64()), ("lr", pa.float64()),
    ("task_accuracy", pa.map_(pa.string(), pa.float64())), ("dense", pa.bool_()),
])


def trial_records(study_folder: str | Path) -> list[TrialRecord]:
    """Every finished trial's record under `<study>/trials/*/trial.json`, sorted by trial name."""
    folder = Path(study_folder)
    if not (folder / "trials").is_dir():
        raise FileNotFoundError(f"{folder} is not a study folder (no trials/ in it); run `circuitscale study` first")
    return [TrialRecord.load(p) for p in sorted((folder / "trials").glob(f"*/{TRIAL_FILE}"))]


def latest_study(root: str | Path = "runs/studies") -> Path:
    """The study folder under `root` whose trials changed last (what `make lab` opens), as an absolute path
    (the notebook's kernel runs in analysis/)."""
    studies = [p for p in Path(root).glob("*") if (p / "trials").is_dir()]
    if not studies:
        raise FileNotFoundError(f"no study under {Path(root).resolve()}; run `make study` first")
    latest = max(studies, key=lambda p: max([q.stat().st_mtime for q in (p / "trials").iterdir()] + [0.0]))
    return latest.resolve()


def mlflow_records(tracking_uri: str, experiment: str) -> list[TrialRecord]:
    """The same records from MLflow: each finished child run's `trial.json` artifact, by start time."""
    return [TrialRecord.from_json(text) for text in download_run_artifacts(tracking_uri, experiment, TRIAL_FILE)]


def to_table(records: list[TrialRecord]) -> pa.Table:
    """One row per trial; `circuits` holds one struct per task (sorted by task)."""
    rows = [asdict(r) | {"circuits": [{"task": t} | asdict(c) for t, c in sorted(r.circuits.items())],
                         "dense": r.dense} for r in records]
    return pa.Table.from_pylist(rows, schema=TRIAL)
