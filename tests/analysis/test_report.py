import json

import pytest

from analysis.load import task_table, to_table, trial_records
from analysis.report import analyse, write_report
from pipeline.records import TrialRecord


def record(name: str, d_model: int, density: float, loss: float, edges: dict[str, int | None]) -> TrialRecord:
    circuits = {t: {"status": "found" if e is not None else "unreachable", "edges": e or 0, "nodes": (e or 0) // 2,
                    "unpruned_loss": 0.1, "target_loss": 0.15, "sufficiency_loss": 0.1, "necessity_loss": 1.0,
                    "target_curve": [[0.3, 5, (e or 0) // 3]] if e else []}
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
        (tmp_path / "trials" / t.trial).mkdir(parents=True)
        t.save(tmp_path / "trials" / t.trial / "trial.json")
    return tmp_path


def test_tables_have_one_row_per_trial_and_per_circuit(study):
    records = trial_records(study)
    table = to_table(records)
    assert table.num_rows == 4 and table.column("dense").to_pylist() == [True, True, False, False]
    assert task_table(records).num_rows == 12


def test_analysis_uses_common_tasks_and_matches_losses(study):
    a = analyse(trial_records(study))
    # no task is found by every trial (one trial found none): each trial's own found tasks are used
    assert a.tasks_basis == "per-trial"
    sparse = next(r for r in a.rows if r["trial"] == "002-sparse")
    assert sparse["edges"] == pytest.approx(20.0)  # geometric mean of 10 and 40
    # dense models at losses 3.0 (gm of 1000, 4000, 50) and 4.0 (gm 100, 400): interpolated at 3.5
    dense_lo = (1000 * 4000 * 50) ** (1 / 3)
    expected = 20.0 / (dense_lo * 200.0) ** 0.5
    assert a.ratio == pytest.approx(expected)
    labels = [a.rows[i]["trial"] for i in a.front]
    assert labels == ["001-dense-big", "002-sparse"]  # the small dense model is dominated by the sparse one


def test_report_writes_markdown_html_and_figures(study):
    report = write_report(study, wall_s=40.0)
    for name in ("report.md", "report.html", "frontier.png", "frontier.svg", "size_vs_target.png",
                 "task_sizes.svg", "structure.png", "headline.json"):
        assert (report.folder / name).stat().st_size > 0, name
    headline = json.loads((report.folder / "headline.json").read_text())
    assert headline["overhead_ratio"] == pytest.approx(40.0 / 60.0) and headline["frontier_points"] == 2
    html = (report.folder / "report.html").read_text()
    assert "data:image/png;base64," in html and "002-sparse" in html and "<table>" in html
    again = write_report(study)  # `circuitscale report` later: the wall time is remembered
    assert again.headline["wall_s"] == 40.0


def test_report_verb_rewrites_the_report_and_rejects_other_folders(study, tmp_path, capsys):
    from pipeline.cli import main

    assert main(["report", str(study)]) == 0
    out = capsys.readouterr().out
    assert f"report: {(study / 'report' / 'report.html').resolve()}" in out and "4 trials" in out
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "not a study folder" in capsys.readouterr().err
