import dataclasses
import json

import pytest

from pipeline.records import (
    CircuitRecord,
    CircuitSummary,
    CurvePoint,
    EdgeRecord,
    NodeRecord,
    TrialRecord,
    edge_geomean,
    geometric_mean_edges,
)


def circuit(task: str = "t", status: str = "found", edges: int = 2) -> CircuitRecord:
    nodes = [NodeRecord(-1, "embed", 3, 0.5), NodeRecord(1, "final", 3, -0.25)] if status == "found" else []
    return CircuitRecord(
        task=task, target_loss=0.15, unpruned_loss=0.1, total_nodes=10, status=status, nodes=nodes, edges=edges,
        edge_list=[EdgeRecord(-1, "embed", 3, 1, "final", 3, 0.75), EdgeRecord(1, "final", 3, 2, "logit", 17, -1.5)],
        sufficiency_loss=0.12, necessity_loss=2.0, random_loss=0.6, random_edges=7, attribution_edges=None,
        target_curve=[CurvePoint(0.3, 1, 1), CurvePoint(0.01, None, None)], seconds=1.5)


def trial(circuits: dict[str, CircuitSummary]) -> TrialRecord:
    return TrialRecord(trial="000", study="s", d_model=32, num_layers=1, density=0.25, params_total=100,
                       l0_total=25.0, val_loss=3.0, residual_kurtosis=float("nan"), task_accuracy_mean=0.5,
                       circuit_edges_geomean=2.0, circuits_found=1, circuits_tried=1, overlap_nodes_mean=None,
                       train_seconds=1.0, prune_seconds=2.0, circuits=circuits)


def test_circuit_record_round_trips_through_json_with_named_keys(tmp_path):
    rec = circuit()
    data = json.loads(rec.to_json())
    assert data["nodes"][1] == {"layer": 1, "kind": "final", "index": 3, "mean": -0.25}
    assert data["edge_list"][1] == {"src_layer": 1, "src_kind": "final", "src_index": 3, "dst_layer": 2,
                                    "dst_kind": "logit", "dst_index": 17, "weight": -1.5}
    assert data["target_curve"][1] == {"target": 0.01, "k": None, "edges": None}
    assert CircuitRecord.from_json(rec.to_json()) == rec
    rec.save(tmp_path / "circuit.json")
    loaded = CircuitRecord.load(tmp_path / "circuit.json")
    assert loaded == rec and isinstance(loaded.nodes[0], NodeRecord) and isinstance(loaded.edge_list[0], EdgeRecord)
    assert loaded.nodes[0].key == (-1, "embed", 3) and loaded.edge_list[1].dst == (2, "logit", 17)


def test_trial_record_keeps_each_circuits_summary(tmp_path):
    rec = circuit()
    summary = rec.summary(test_accuracy=0.75)
    assert summary == CircuitSummary(status="found", nodes=2, edges=2, unpruned_loss=0.1, target_loss=0.15,
                                     sufficiency_loss=0.12, necessity_loss=2.0, target_curve=rec.target_curve,
                                     random_loss=0.6, random_edges=7, test_accuracy=0.75)
    record = trial({"t": summary})
    record.save(tmp_path / "trial.json")
    text = (tmp_path / "trial.json").read_text()
    assert json.loads(text)["circuits"]["t"]["target_curve"][0] == {"target": 0.3, "k": 1, "edges": 1}
    loaded = TrialRecord.from_json(text)
    assert loaded.circuits == {"t": summary} and isinstance(loaded.circuits["t"].target_curve[0], CurvePoint)
    assert loaded.val_loss == 3.0 and loaded.overlap_nodes_mean is None and not loaded.dense


def test_geometric_mean_of_edges_counts_found_circuits_and_an_empty_one_as_one_edge():
    assert edge_geomean([10, 1000]) == pytest.approx(100.0)
    assert edge_geomean([0, 4]) == pytest.approx(2.0)  # the empty circuit counts as 1 edge
    assert edge_geomean([]) is None
    records = {"a": circuit("a", edges=10), "b": circuit("b", edges=1000), "c": circuit("c", "unreachable", 0)}
    assert geometric_mean_edges(records.values()) == pytest.approx(100.0)
    assert geometric_mean_edges(r.summary() for r in records.values()) == pytest.approx(100.0)
    assert geometric_mean_edges([records["c"]]) is None


def test_records_written_before_the_typed_records_still_load():
    # Old files stored nodes, edges and curve points as positional lists; a study started then must resume.
    old_circuit = """{"task": "t", "target_loss": 0.15, "unpruned_loss": 0.1, "total_nodes": 10, "status": "found",
     "nodes": [[-1, "embed", 3, 0.5], [1, "final", 3, -0.25]], "edges": 2,
     "edge_list": [[-1, "embed", 3, 1, "final", 3, 0.75], [1, "final", 3, 2, "logit", 17, -1.5]],
     "sufficiency_loss": 0.12, "necessity_loss": 2.0, "random_loss": 0.6, "random_edges": 7,
     "attribution_edges": null, "target_curve": [[0.3, 1, 1], [0.01, null, null]], "seconds": 1.5}"""
    loaded = CircuitRecord.from_json(old_circuit)
    assert loaded == circuit() and CircuitRecord.from_json(circuit().to_json()) == loaded
    assert isinstance(loaded.nodes[0], NodeRecord) and isinstance(loaded.edge_list[0], EdgeRecord)
    assert isinstance(loaded.target_curve[0], CurvePoint)
    old_trial = """{"trial": "000", "study": "s", "d_model": 32, "num_layers": 1, "density": 0.25, "params_total": 100,
     "l0_total": 25.0, "val_loss": 3.0, "residual_kurtosis": 1.5, "task_accuracy_mean": 0.5,
     "circuit_edges_geomean": 2.0, "circuits_found": 1, "circuits_tried": 1, "overlap_nodes_mean": null,
     "train_seconds": 1.0, "prune_seconds": 2.0,
     "circuits": {"t": {"status": "found", "edges": 2, "unpruned_loss": 0.1, "target_loss": 0.15,
                        "sufficiency_loss": 0.12, "necessity_loss": 2.0,
                        "target_curve": [[0.3, 1, 1], [0.01, null, null]], "nodes": 2}}}"""
    new = trial({"t": dataclasses.replace(circuit().summary(), random_loss=None, random_edges=None)})
    new.residual_kurtosis = 1.5  # NaN never equals itself
    loaded_trial = TrialRecord.from_json(old_trial)
    assert loaded_trial == new and TrialRecord.from_json(new.to_json()) == loaded_trial
    assert isinstance(loaded_trial.circuits["t"], CircuitSummary)
    assert isinstance(loaded_trial.circuits["t"].target_curve[0], CurvePoint)
