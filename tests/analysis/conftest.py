"""Study folders of hand-made trial records: `study` (two dense, two sparse, one without any circuit) and
`seeded_study` (two seeds per sparse point, a direct-path task by nature and one by the empty circuit)."""

import pytest

from pipeline.records import TRIAL_FILE, CircuitSummary, CurvePoint, TrialRecord


def circuit(e: int | str | None, **extra) -> CircuitSummary:
    """A circuit of `e` edges; None: unreachable; "direct": the empty circuit reaches the target."""
    found = isinstance(e, int)
    fields = dict(status="found" if found else e or "unreachable", nodes=e // 2 if found else 0,
                  edges=e if found else 0, unpruned_loss=0.1, target_loss=0.15,
                  sufficiency_loss=0.1 if found else None, necessity_loss=1.0 if found else None,
                  target_curve=[CurvePoint(0.3, 5, e // 3)] if found and e else [])
    return CircuitSummary(**fields | extra)


def record(name: str, d_model: int, density: float, loss: float, edges: dict[str, int | str | None], *,
           seed: int = 0, extra: dict | None = None) -> TrialRecord:
    circuits = {t: circuit(e, **(extra or {}).get(t, {})) for t, e in edges.items()}
    return TrialRecord(trial=name, study="s", d_model=d_model, num_layers=2, density=density,
                       params_total=1000 * d_model, l0_total=1000 * d_model * density, val_loss=loss,
                       residual_kurtosis=3.0 / density, task_accuracy_mean=0.7, circuit_edges_geomean=None,
                       circuits_found=sum(isinstance(e, int) for e in edges.values()), circuits_tried=len(edges),
                       overlap_nodes_mean=0.1, train_seconds=10.0, prune_seconds=5.0, circuits=circuits, seed=seed,
                       lr=0.01, task_accuracy={t: 0.9 for t in edges})


def write_study(folder, trials: list[TrialRecord]):
    for t in trials:
        (folder / "trials" / t.trial).mkdir(parents=True)
        t.save(folder / "trials" / t.trial / TRIAL_FILE)
    return folder


@pytest.fixture
def study(tmp_path):
    return write_study(tmp_path / "study", [
        record("000-dense-small", 32, 1.0, 4.0, {"a": 100, "b": 400, "c": None}),
        record("001-dense-big", 64, 1.0, 3.0, {"a": 1000, "b": 4000, "c": 50}),
        record("002-sparse", 64, 0.25, 3.5, {"a": 10, "b": 40, "c": None}),
        record("003-sparse-nocircuit", 32, 0.25, 4.5, {"a": None, "b": None, "c": None}),
    ])


@pytest.fixture
def seeded_study(tmp_path):
    """Dense d32 (loss 4.0) and d64 (3.0); sparse d64 1/4 at two seeds (3.5, 3.25); sparse d32 1/4 at two
    seeds, one without circuits (4.5, 3.75). else_elif is direct-path by nature, e by the empty circuit."""
    both = {"necessity_loss": 2.0, "attribution_edges": 30}
    return write_study(tmp_path / "seeded", [
        record("000-d_model=32-density=1.0", 32, 1.0, 4.0, {"a": 100, "b": 400, "else_elif": 3, "e": 7}),
        record("001-d_model=64-density=1.0", 64, 1.0, 3.0, {"a": 1000, "b": 4000, "else_elif": 3, "e": 9}),
        record("002-d_model=64-density=0.25-seed=0", 64, 0.25, 3.5, {"a": 10, "b": 40, "else_elif": 1, "e": 2},
               extra={"a": both}),
        record("002-d_model=64-density=0.25-seed=1", 64, 0.25, 3.25, {"a": 20, "b": 80, "else_elif": 1, "e": "direct"},
               seed=1, extra={"a": both}),
        record("003-d_model=32-density=0.25-seed=0", 32, 0.25, 4.5,
               {"a": None, "b": None, "else_elif": None, "e": None}),
        record("003-d_model=32-density=0.25-seed=1", 32, 0.25, 3.75, {"a": 5, "b": None, "else_elif": 1, "e": 3},
               seed=1),
    ])
