"""A study's trials as a pyarrow table: from the trial records in the study folder (offline), or from
the study's MLflow experiment (the same columns, read from the child runs' `trial.json` artifacts).

One row per trial (columns of `pipeline.records.TrialRecord`, `circuits` as a JSON string), and
`task_table` one row per (trial, task) circuit.
"""

import json
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa

from pipeline.records import TRIAL_FILE, TrialRecord


def trial_records(study_folder: str | Path) -> list[TrialRecord]:
    """Every finished trial's record under `<study>/trials/*/trial.json`, sorted by trial name."""
    folder = Path(study_folder)
    if not (folder / "trials").is_dir():
        raise FileNotFoundError(f"{folder} is not a study folder (no trials/ in it); run `circuitscale study` first")
    return [TrialRecord.load(p) for p in sorted((folder / "trials").glob(f"*/{TRIAL_FILE}"))]


def mlflow_records(tracking_uri: str, experiment: str) -> list[TrialRecord]:
    """The same records from MLflow: each finished child run's `trial.json` artifact."""
    from infra.tracking import download_run_artifacts

    return [TrialRecord(**json.loads(text)) for text in download_run_artifacts(tracking_uri, experiment, TRIAL_FILE)]


def to_table(records: list[TrialRecord]) -> pa.Table:
    rows = []
    for r in records:
        row = asdict(r)
        row["circuits"] = json.dumps(row["circuits"], sort_keys=True)
        row["dense"] = r.density >= 1.0
        rows.append(row)
    schema = pa.schema([
        ("trial", pa.string()), ("study", pa.string()), ("d_model", pa.int64()), ("num_layers", pa.int64()),
        ("density", pa.float64()), ("params_total", pa.int64()), ("l0_total", pa.float64()),
        ("val_loss", pa.float64()), ("residual_kurtosis", pa.float64()), ("task_accuracy_mean", pa.float64()),
        ("circuit_edges_geomean", pa.float64()), ("circuits_found", pa.int64()), ("circuits_tried", pa.int64()),
        ("overlap_nodes_mean", pa.float64()), ("train_seconds", pa.float64()), ("prune_seconds", pa.float64()),
        ("circuits", pa.string()), ("dense", pa.bool_()),
    ])
    return pa.Table.from_pylist(rows, schema=schema)


def task_table(records: list[TrialRecord]) -> pa.Table:
    rows = []
    for r in records:
        for task, c in sorted(r.circuits.items()):
            rows.append({"trial": r.trial, "task": task, "density": r.density, "d_model": r.d_model,
                         "status": c["status"], "nodes": c.get("nodes", 0), "edges": c.get("edges", 0),
                         "unpruned_loss": c.get("unpruned_loss"), "target_loss": c.get("target_loss"),
                         "sufficiency_loss": c.get("sufficiency_loss")})
    return pa.Table.from_pylist(rows, schema=pa.schema([
        ("trial", pa.string()), ("task", pa.string()), ("density", pa.float64()), ("d_model", pa.int64()),
        ("status", pa.string()), ("nodes", pa.int64()), ("edges", pa.int64()), ("unpruned_loss", pa.float64()),
        ("target_loss", pa.float64()), ("sufficiency_loss", pa.float64())]))
