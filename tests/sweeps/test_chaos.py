"""The CI-sized chaos run (issue 17): benchmarks/chaos.py on the smoke study with one fault of each kind,
compared against the session's fault-free smoke study. `make chaos` runs the full schedule (5 of each)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KINDS = ("worker_kill", "driver_kill", "mlflow_down", "disk_full", "corrupt_shard", "corrupt_checkpoint")


@pytest.mark.slow
def test_the_smoke_study_survives_one_fault_of_each_kind(smoke_study, tmp_path):
    folder, _, _ = smoke_study
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "chaos.py"), "--per-kind", "1", "--seed", "1",
         "--reference", str(folder), "--out", str(tmp_path / "chaos")],
        cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=1500)
    assert proc.stdout.strip(), proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert summary["lost"] == summary["duplicated_runs"] == summary["running_runs"] == summary["temp_left"] == 0
    assert summary["report_equal"] and summary["recovered"] == summary["faults_injected"]
    mounted = summary["disk_full_mounted"]  # a machine that forbids mounts gets no disk_full (the run says so)
    assert all(summary["per_kind"][k] >= (1 if k != "disk_full" or mounted else 0) for k in KINDS), summary
