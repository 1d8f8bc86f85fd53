import json

import pytest

from analysis.load import trial_records
from analysis.report import analyse, write_report


def test_analysis_uses_common_tasks_and_matches_losses(study):
    a = analyse(trial_records(study))
    # no task is found by every trial (one trial found none): each trial's own found tasks are used
    assert a.tasks_basis == "per-trial"
    sparse = next(p for p in a.trials if p.record.trial == "002-sparse")
    assert sparse.edges == pytest.approx(20.0) and sparse.label == "d64 1/4"  # geometric mean of 10 and 40
    assert next(p for p in a.trials if p.record.trial == "003-sparse-nocircuit").edges is None
    # dense models at losses 3.0 (gm of 1000, 4000, 50) and 4.0 (gm 100, 400): interpolated at 3.5
    dense_lo = (1000 * 4000 * 50) ** (1 / 3)
    expected = 20.0 / (dense_lo * 200.0) ** 0.5
    assert a.ratio == pytest.approx(expected)
    labels = [a.trials[i].record.trial for i in a.front]
    assert labels == ["001-dense-big", "002-sparse"]  # the small dense model is dominated by the sparse one


def test_analysis_averages_over_the_tasks_every_trial_found(study):
    records = [r for r in trial_records(study) if r.trial != "003-sparse-nocircuit"]
    a = analyse(records)
    assert a.tasks_basis == "common" and a.tasks == ["a", "b"]
    assert [p.edges for p in a.trials] == pytest.approx([200.0, 2000.0, 20.0])  # task c sits out
    fit = a.fits["loss_vs_width_at_density"]
    assert fit == {}  # one sparse width: nothing to fit


def test_report_writes_markdown_html_and_figures(study):
    report = write_report(study, wall_s=40.0)
    for name in ("report.md", "report.html", "frontier.png", "frontier.svg", "size_vs_target.png",
                 "task_sizes.svg", "structure.png", "headline.json"):
        assert (report.folder / name).stat().st_size > 0, name
    headline = json.loads((report.folder / "headline.json").read_text())
    ratio = analyse(trial_records(study)).ratio
    assert headline == {"trials": 4, "frontier_points": 2, "sparse_dense_edge_ratio": ratio, "wall_s": 40.0,
                        "trial_work_s": 60.0, "overhead_ratio": pytest.approx(40.0 / 60.0), "tasks_basis": "per-trial",
                        "tasks": []}
    md = (report.folder / "report.md").read_text()
    assert "| 002-sparse | 64 | 0.25 | 64000 | 1.600e+04 | 3.500 | 0.7 | 2/3 | 20 | 12 | 0.1 | 10 | 5 | yes |" in md
    assert "| c | — | 50 | — | — |" in md  # the per-task table: no circuit shows a dash
    html = (report.folder / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and "<td>002-sparse</td>" in html and "<table>" in html
    assert "<li>circuit edges are the geometric mean over each trial's own found tasks" in html
    again = write_report(study)  # `circuitscale report` later: the wall time is remembered
    assert again.headline["wall_s"] == 40.0


def test_report_verb_rewrites_the_report_and_rejects_other_folders(study, tmp_path, capsys):
    from cli.main import main

    assert main(["report", str(study)]) == 0
    out = capsys.readouterr().out
    assert f"report: {(study / 'report' / 'report.html').resolve()}" in out and "4 trials" in out
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "not a study folder" in capsys.readouterr().err
