import math

import numpy as np
import pytest

from analysis.frontier import (
    SIZES,
    attribution_over_learned,
    bootstrap_geomean,
    circuit_ratio,
    direct_path_tasks,
    edge_ratio,
    frontier_tasks,
    grouped_fits,
    loglog_fit,
    match_task,
    necessity_over_sufficiency,
    pareto_front,
    per_task_ratios,
    point_summaries,
    trial_points,
)
from analysis.load import trial_records
from tests.analysis.conftest import record


def test_pareto_front_keeps_exactly_the_undominated_points():
    loss = [3.0, 3.5, 3.2, 4.0, 3.0, 2.9]
    edges = [100, 20, 150, 10, 120, None]  # the last has no circuit: never on the front
    assert pareto_front(loss, edges) == [0, 1, 3]  # 2 and 4 are dominated by 0


def test_pareto_front_of_ties_keeps_both():
    assert pareto_front([1.0, 1.0], [5, 5]) == [0, 1]


def test_direct_path_tasks_leave_the_fixed_frontier_task_set(seeded_study):
    records = trial_records(seeded_study)
    direct = direct_path_tasks(records)
    assert list(direct) == ["e", "else_elif"]
    assert direct["else_elif"].startswith("by nature") and "1 of 6 models" in direct["e"]
    assert frontier_tasks(records) == ["a", "b"] and frontier_tasks([]) == []
    points = {p.record.trial: p for p in trial_points(records, ["a", "b"])}
    assert points["002-d_model=64-density=0.25-seed=0"].edges == pytest.approx(20.0)  # gm of 10 and 40
    assert (points["003-d_model=32-density=0.25-seed=1"].edges, points["003-d_model=32-density=0.25-seed=1"].found,
            points["003-d_model=32-density=0.25-seed=1"].tried) == (pytest.approx(5.0), 1, 2)  # coverage 1/2
    assert points["003-d_model=32-density=0.25-seed=0"].edges is None and points[
        "003-d_model=32-density=0.25-seed=0"].coverage == 0.0
    empty = record("c", 32, 0.0625, 3.0, {"t1": 0})
    assert trial_points([empty], ["t1"])[0].edges == 1.0  # an empty circuit counts as 1 edge
    assert trial_points([empty], ["t1"])[0].label == "d32 1/16"


def test_points_aggregate_their_seeds(seeded_study):
    points = {p.point: p for p in point_summaries(trial_points(trial_records(seeded_study), ["a", "b"]))}
    assert list(points) == ["000-d_model=32-density=1.0", "001-d_model=64-density=1.0", "002-d_model=64-density=0.25",
                            "003-d_model=32-density=0.25"]
    sparse = points["002-d_model=64-density=0.25"]
    assert sparse.seeds == [0, 1] and sparse.label == "d64 1/4" and sparse.lr == 0.01
    assert sparse.val_loss == pytest.approx((3.375, np.std([3.5, 3.25], ddof=1)))
    assert sparse.edges == pytest.approx((30.0, np.std([20.0, 40.0], ddof=1)))  # gm edges 20 and 40
    one = points["003-d_model=32-density=0.25"].edges  # only seed 1 has a frontier point: no spread
    assert one[0] == pytest.approx(5.0) and math.isnan(one[1])
    assert math.isnan(points["000-d_model=32-density=1.0"].val_loss[1])


def test_matches_interpolate_between_the_bracketing_dense_models(seeded_study):
    records = trial_records(seeded_study)
    matches, unmatched = match_task(records, "a")
    assert unmatched == [] and [m.trial[-6:] for m in matches] == ["seed=0", "seed=1", "seed=1"]
    m = matches[0]  # loss 3.5, between dense 3.0 (1000 edges) and 4.0 (100): sqrt(1000 x 100) in log space
    assert m.below == ("001-d_model=64-density=1.0", 3.0, 1000) and m.above == ("000-d_model=32-density=1.0", 4.0, 100)
    assert m.dense_edges == pytest.approx(math.sqrt(1000 * 100)) and m.ratio == pytest.approx(10 / math.sqrt(1e5))
    assert matches[1].dense_edges == pytest.approx(1000 ** 0.75 * 100 ** 0.25)  # loss 3.25
    outside = [record("d0", 32, 1.0, 3.0, {"t": 100}), record("d1", 64, 1.0, 4.0, {"t": 10}),
               record("s-low", 64, 0.25, 2.5, {"t": 5}), record("s-high", 64, 0.25, 4.5, {"t": 5}),
               record("s-none", 64, 0.25, 3.5, {"u": 5})]
    matches, unmatched = match_task(outside, "t")
    assert matches == [] and [(u.trial, "below the loss of every" in u.reason or "above the loss of every" in u.reason)
                                for u in unmatched] == [("s-low", True), ("s-high", True)]
    assert "no dense model found it" in match_task(outside, "u")[1][0].reason


def test_headline_ratio_resamples_task_and_seed_units(seeded_study):
    records = trial_records(seeded_study)
    matches = match_task(records, "a")[0] + match_task(records, "b")[0]
    units = {}
    for m in matches:
        units.setdefault((m.task, m.seed), []).append(math.log(m.ratio))
    assert len(units) == 4
    ratio = edge_ratio(matches)
    assert ratio.value == pytest.approx(math.exp(np.mean([np.mean(v) for v in units.values()])))
    assert (ratio.n, ratio.units) == (5, 4) and ratio.ci95[0] < ratio.value < ratio.ci95[1]
    assert edge_ratio(matches) == ratio  # a fixed bootstrap seed: the same records give the same interval
    per_task = per_task_ratios(matches)
    assert list(per_task) == ["a", "b"] and per_task["a"].n == 3 and per_task["b"].units == 2
    one = bootstrap_geomean([math.log(2.0)])
    assert one.value == pytest.approx(2.0) and one.ci95 is None  # one unit: no interval
    assert bootstrap_geomean([]) is None and edge_ratio([]) is None


def test_necessity_and_attribution_ratios_per_kind(seeded_study):
    records = trial_records(seeded_study)
    necessity = circuit_ratio(records, ["a", "b"], False, necessity_over_sufficiency)
    # sparse: 20 (a, both seed-0 and seed-1 d64), 10 elsewhere; units (a,0) 20, (a,1) gm(20, 10), (b,0), (b,1) 10
    expected = math.exp(np.mean([math.log(20), (math.log(20) + math.log(10)) / 2, math.log(10), math.log(10)]))
    assert necessity.value == pytest.approx(expected) and necessity.units == 4
    attribution = circuit_ratio(records, ["a", "b"], False, attribution_over_learned)
    assert attribution.value == pytest.approx(math.sqrt(3.0 * 1.5)) and attribution.n == 2
    assert circuit_ratio(records, ["a", "b"], True, attribution_over_learned) is None  # dense: no baseline recorded


def test_loglog_fit_recovers_a_power_law_with_uncertainty():
    x = np.array([64, 128, 256, 512])
    rng = np.random.default_rng(0)
    y = 3.0 * x ** -0.7 * np.exp(rng.normal(0, 0.05, 4))
    fit = loglog_fit(list(x), list(y))
    assert fit.slope == pytest.approx(-0.7, abs=0.1) and fit.n == 4 and 0 < fit.slope_se < 0.1
    lx, ly = np.log(x), np.log(y)  # the textbook standard error of a least-squares slope
    resid = ly - (fit.slope * lx + fit.intercept)
    assert fit.slope_se == pytest.approx(math.sqrt(resid @ resid / 2 / ((lx - lx.mean()) ** 2).sum()))
    exact = loglog_fit([1, 10], [2, 20])
    assert exact.slope == pytest.approx(1.0) and math.isnan(exact.slope_se)  # two points: no error estimate
    assert loglog_fit([5, 5], [1, 2]) is None
    assert loglog_fit([1, 10, 100], [2, None, 0]) is None  # missing and non-positive values sit out


def test_grouped_fits_fit_each_group():
    points = [(d, w, w * (2 if d == 0.5 else 1)) for d in (0.5, 0.25) for w in (32, 64)]
    fits = grouped_fits(points + [(0.125, 32, 1.0), (0.125, 64, None)])  # 0.125: one point, no fit
    assert list(fits) == [0.25, 0.5] and all(f.slope == pytest.approx(1.0) for f in fits.values())


def test_circuits_sized_by_another_pruning_method_can_reverse_the_ratio():
    """The learned masks find sparse circuits 10x smaller than dense ones; the attribution ranking finds
    the dense ones smaller still, so by it (and by the smaller of the two) the sparse model loses."""
    def attribution(edges: int | None) -> dict:
        return {"t": {"attribution_edges": edges}}

    records = [record("d0", 32, 1.0, 4.0, {"t": 1000}, extra=attribution(50)),
               record("d1", 64, 1.0, 3.0, {"t": 1000}, extra=attribution(50)),
               record("s0", 64, 0.25, 3.5, {"t": 100}, extra=attribution(200)),
               record("s1", 64, 0.25, 3.5, {"t": 100}, extra=attribution(None), seed=1)]
    by_masks = match_task(records, "t")[0]
    assert [m.ratio for m in by_masks] == pytest.approx([0.1, 0.1])
    by_attribution = match_task(records, "t", SIZES["attribution"])[0]
    assert [(m.trial, m.edges, m.dense_edges) for m in by_attribution] == [("s0", 200, pytest.approx(50.0))]
    smallest = match_task(records, "t", SIZES["smallest"])[0]  # s1 has no attribution circuit: its masks' size
    assert [(m.trial, m.edges, m.ratio) for m in smallest] == [("s0", 100, pytest.approx(2.0)),
                                                               ("s1", 100, pytest.approx(2.0))]
