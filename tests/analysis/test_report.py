import json

import pytest

from analysis.load import trial_records
from analysis.report import analyse, write_report


def test_analysis_of_the_plain_study(study):
    a = analyse(trial_records(study))
    assert a.tasks == ["a", "b", "c"] and a.direct == {}  # every trial tried them; none is direct-path
    sparse = next(p for p in a.trials if p.record.trial == "002-sparse")
    assert sparse.edges == pytest.approx(20.0) and (sparse.found, sparse.tried) == (2, 3)  # gm of 10 and 40
    assert next(p for p in a.trials if p.record.trial == "003-sparse-nocircuit").edges is None
    # per task: sparse loss 3.5 between dense 3.0 and 4.0; task c has one dense circuit only: unmatched
    assert a.ratio_tasks == ["a", "b"] and len(a.matches) == 2
    assert a.ratio.value == pytest.approx(10 / (1000 * 100) ** 0.5) and a.ratio.ci95 == (a.ratio.value, a.ratio.value)
    labels = [a.trials[i].record.trial for i in a.front]
    assert labels == ["001-dense-big", "002-sparse"]
    assert a.fits["edges_vs_width_at_density"] == {}  # one sparse width with a circuit: nothing to fit
    assert a.fits["loss_vs_width_at_density"][0.25].n == 2


def test_report_writes_markdown_html_figures_and_the_headline(seeded_study):
    report = write_report(seeded_study, wall_s=40.0)
    for name in ("report.md", "report.html", "frontier.png", "frontier.svg", "ratios.png", "size_vs_target.png",
                 "task_sizes.svg", "structure.png", "headline.json"):
        assert (report.folder / name).stat().st_size > 0, name
    headline = json.loads((report.folder / "headline.json").read_text())
    a = analyse(trial_records(seeded_study))
    assert headline["sparse_dense_edge_ratio"] == pytest.approx(a.ratio.value)
    low, high = headline["sparse_dense_edge_ratio_ci95"]
    assert low < headline["sparse_dense_edge_ratio"] < high
    assert headline["ratio_tasks"] == ["a", "b"] and headline["direct_path_tasks"] == ["e", "else_elif"]
    assert headline["seeds"] == {"000-d_model=32-density=1.0": 1, "001-d_model=64-density=1.0": 1,
                                 "002-d_model=64-density=0.25": 2, "003-d_model=32-density=0.25": 2}
    assert headline["tasks"] == ["a", "b"] and headline["coverage"]["003-d_model=32-density=0.25-seed=1"] == [1, 2]
    assert headline["per_task_ratio"]["a"]["n"] == 3 and headline["necessity_sufficiency_ratio"]["sparse"]["units"] == 4
    methods = headline["sparse_dense_edge_ratio_by_method"]
    assert list(methods) == ["learned_masks", "attribution", "smallest"]
    assert methods["learned_masks"]["value"] == pytest.approx(a.ratio.value)
    assert methods["attribution"] is None  # no dense circuit has an attribution size here: nothing to match
    assert methods["smallest"]["value"] == pytest.approx(a.ratio.value)  # attribution (30) beats no mask circuit
    assert headline["direction_depends_on_pruning_method"] is False
    assert (headline["trials"], headline["wall_s"], headline["trial_work_s"]) == (6, 40.0, 90.0)
    md = (report.folder / "report.md").read_text()
    assert f"sparse / dense circuit edges at matched pretraining loss: {a.ratio.value:.3g} (95% CI" in md
    assert "else_elif (by nature" in md and "e (the empty circuit reaches the target in 1 of 6 models)" in md
    assert "| d64 1/4 | 0, 1 | 0.01 | 3.375 ± 0.18 |" in md  # seeds aggregated per point
    # a match beside the dense circuits it was interpolated from
    assert ("| a | 002-d_model=64-density=0.25-seed=0 | 3.5 | 10 | 001-d_model=64-density=1.0, 3, 1000 | "
            "000-d_model=32-density=1.0, 4, 100 | 316 | 0.0316 |") in md
    assert "| e (direct-path) | 7 | 9 | 2 | direct | unreachable | 3 |" in md
    assert "No search ran in this study" in md
    html = (report.folder / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5 and "<td>002-d_model=64-density=0.25-seed=0</td>" in html
    assert "<table>" in html and "<strong>sparse / dense circuit edges" in html
    again = write_report(seeded_study)  # `circuitscale report` later: the wall time is remembered
    assert again.headline["wall_s"] == 40.0


def test_report_shows_the_learning_rate_search(seeded_study):
    search = {"lrs": [0.01, 0.03], "budget": 0.25, "eta": 2, "points": {"002-d_model=64-density=0.25": {
        "lr": 0.01, "rungs": [{"steps": 5, "val_loss": {"0.01": 4.1, "0.03": None}, "failed": ["0.03"]}]}}}
    (seeded_study / "lr_search.json").write_text(json.dumps(search))
    md = (write_report(seeded_study).folder / "report.md").read_text()
    assert "| 002-d_model=64-density=0.25 | 0.01 | 5: 0.01 4.1, 0.03 — |" in md


def test_report_verb_rewrites_the_report_and_rejects_other_folders(study, tmp_path, capsys):
    from cli.main import main

    assert main(["report", str(study)]) == 0
    out = capsys.readouterr().out
    assert f"report: {(study / 'report' / 'report.html').resolve()}" in out and "4 trials" in out
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "not a study folder" in capsys.readouterr().err


def test_report_says_when_the_direction_depends_on_the_pruning_method(tmp_path):
    from tests.analysis.conftest import record, write_study

    flip = {"t": {"attribution_edges": 10}}
    folder = write_study(tmp_path / "flip", [
        record("000-d_model=32-density=1.0", 32, 1.0, 4.0, {"t": 1000}, extra=flip),
        record("001-d_model=64-density=1.0", 64, 1.0, 3.0, {"t": 1000}, extra=flip),
        record("002-d_model=64-density=0.25", 64, 0.25, 3.5, {"t": 100}, extra={"t": {"attribution_edges": 400}})])
    report = write_report(folder)
    methods = report.headline["sparse_dense_edge_ratio_by_method"]
    assert methods["learned_masks"]["value"] == pytest.approx(0.1)
    assert methods["attribution"]["value"] == pytest.approx(40) and methods["smallest"]["value"] == pytest.approx(10)
    assert report.headline["direction_depends_on_pruning_method"]
    md = (report.folder / "report.md").read_text()
    assert "**The direction depends on the pruning method" in md and "the smaller of the two per circuit 10" in md
