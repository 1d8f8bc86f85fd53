import math

import numpy as np
import pytest

from analysis.frontier import (
    common_tasks,
    grouped_fits,
    loglog_fit,
    matched_loss_ratio,
    pareto_front,
    trial_points,
)
from tests.analysis.conftest import record


def test_pareto_front_keeps_exactly_the_undominated_points():
    loss = [3.0, 3.5, 3.2, 4.0, 3.0, 2.9]
    edges = [100, 20, 150, 10, 120, None]  # the last has no circuit: never on the front
    assert pareto_front(loss, edges) == [0, 1, 3]  # 2 and 4 are dominated by 0


def test_pareto_front_of_ties_keeps_both():
    assert pareto_front([1.0, 1.0], [5, 5]) == [0, 1]


def test_common_tasks_and_trial_edges_skip_missing_circuits():
    a = record("a", 32, 1.0, 3.0, {"t1": 10, "t2": 1000, "t3": None})
    b = record("b", 64, 0.25, 3.0, {"t1": 40, "t2": None})
    empty = record("c", 32, 0.0625, 3.0, {"t1": 0})
    assert common_tasks([a, b]) == ["t1"] and common_tasks([]) == []
    assert [p.edges for p in trial_points([a, b], ["t1", "t2"])] == pytest.approx([100.0, 40.0])
    assert trial_points([b], ["t2"])[0].edges is None
    assert [p.edges for p in trial_points([a, b], [])] == pytest.approx([100.0, 40.0])  # each trial's own tasks
    assert trial_points([empty], ["t1"])[0].edges == 1.0  # an empty circuit counts as 1 edge
    assert [p.label for p in trial_points([a, b, empty], [])] == ["d32 dense", "d64 1/4", "d32 1/16"]


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


def test_matched_loss_ratio_interpolates_dense_edges_in_log_space():
    dense = [(3.0, 1000.0), (4.0, 100.0)]
    ratio, matches = matched_loss_ratio(dense, [(3.5, 10.0), (5.0, 1.0)])  # 5.0 is outside the dense range
    assert matches == [(3.5, pytest.approx(10.0 / math.sqrt(1000 * 100)))]
    assert ratio == pytest.approx(10.0 / math.sqrt(1000 * 100))
    assert matched_loss_ratio([(3.0, 10.0)], [(3.0, 1.0)]) == (None, [])  # one dense model: no interpolation
