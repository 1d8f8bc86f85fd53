"""A study folder of four hand-made trial records (two dense, two sparse, one without any circuit)."""

import pytest

from pipeline.records import TRIAL_FILE, CircuitSummary, CurvePoint, TrialRecord


def record(name: str, d_model: int, density: float, loss: float, edges: dict[str, int | None]) -> TrialRecord:
    circuits = {t: CircuitSummary(status="found" if e is not None else "unreachable", nodes=(e or 0) // 2,
                                  edges=e or 0, unpruned_loss=0.1, target_loss=0.15, sufficiency_loss=0.1,
                                  necessity_loss=1.0, target_curve=[CurvePoint(0.3, 5, (e or 0) // 3)] if e else [])
                for t, e in edges.items()}
    return TrialRecord(trial=name, study="s", d_model=d_model, num_layers=2, density=density,
                       params_total=1000 * d_model, l0_total=1000 * d_model * density, val_loss=loss,
                       residual_kurtosis=3.0 / density, task_accuracy_mean=0.7, circuit_edges_geomean=None,
                       circuits_found=sum(e is not None for e in edges.values()), circuits_tried=len(edges),
                       overlap_nodes_mean=0.1, train_seconds=10.0, prune_seconds=5.0, circuits=circuits)


@pytest.fixture
def study(tmp_path):
    trials = [
        record("000-dense-small", 32, 1.0, 4.0, {"a": 100, "b": 400, "c": None}),
        record("001-dense-big", 64, 1.0, 3.0, {"a": 1000, "b": 4000, "c": 50}),
        record("002-sparse", 64, 0.25, 3.5, {"a": 10, "b": 40, "c": None}),
        record("003-sparse-nocircuit", 32, 0.25, 4.5, {"a": None, "b": None, "c": None}),
    ]
    for t in trials:
        (tmp_path / "study" / "trials" / t.trial).mkdir(parents=True)
        t.save(tmp_path / "study" / "trials" / t.trial / TRIAL_FILE)
    return tmp_path / "study"
