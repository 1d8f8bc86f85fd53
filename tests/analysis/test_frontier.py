import math

import numpy as np
import pytest

from analysis.frontier import common_tasks, edges_geomean, grouped_fits, loglog_fit, matched_loss_ratio, pareto_front


def test_pareto_front_keeps_exactly_the_undominated_points():
    loss = [3.0, 3.5, 3.2, 4.0, 3.0, 2.9]
    edges = [100, 20, 150, 10, 120, None]  # the last has no circuit: never on the front
    assert pareto_front(loss, edges) == [0, 1, 3]  # 2 and 4 are dominated by 0


def test_pareto_front_of_ties_keeps_both():
    assert pareto_front([1.0, 1.0], [5, 5]) == [0, 1]


def test_common_tasks_and_geomean_skip_missing_circuits():
    a = {"t1": {"status": "found", "edges": 10}, "t2": {"status": "found", "edges": 1000},
         "t3": {"status": "unreachable", "edges": 0}}
    b = {"t1": {"status": "found", "edges": 40}, "t2": {"status": "unreachable", "edges": 0}}
    assert common_tasks([a, b]) == ["t1"]
    assert edges_geomean(a, ["t1", "t2"]) == pytest.approx(100.0)
    assert edges_geomean(b, ["t2"]) is None
    assert edges_geomean({"t": {"status": "found", "edges": 0}}, ["t"]) == 1.0  # empty circuit counts as 1


def test_loglog_fit_recovers_a_power_law_with_uncertainty():
    x = np.array([64, 128, 256, 512])
    rng = np.random.default_rng(0)
    y = 3.0 * x ** -0.7 * np.exp(rng.normal(0, 0.05, 4))
    fit = loglog_fit(list(x), list(y))
    assert fit.slope == pytest.approx(-0.7, abs=0.1) and fit.n == 4 and 0 < fit.slope_se < 0.1
    exact = loglog_fit([1, 10], [2, 20])
    assert exact.slope == pytest.approx(1.0) and math.isnan(exact.slope_se)  # two points: no error estimate
    assert loglog_fit([5, 5], [1, 2]) is None


def test_grouped_fits_fit_each_group():
    rows = [{"density": d, "d_model": w, "edges": w * (2 if d == 0.5 else 1)} for d in (0.25, 0.5) for w in (32, 64)]
    fits = grouped_fits(rows, "density", "d_model", "edges")
    assert set(fits) == {0.25, 0.5} and all(f.slope == pytest.approx(1.0) for f in fits.values())


def test_matched_loss_ratio_interpolates_dense_edges_in_log_space():
    dense = [(3.0, 1000.0), (4.0, 100.0)]
    ratio, matches = matched_loss_ratio(dense, [(3.5, 10.0), (5.0, 1.0)])  # 5.0 is outside the dense range
    assert matches == [(3.5, pytest.approx(10.0 / math.sqrt(1000 * 100)))]
    assert ratio == pytest.approx(10.0 / math.sqrt(1000 * 100))
    assert matched_loss_ratio([(3.0, 10.0)], [(3.0, 1.0)]) == (None, [])  # one dense model: no interpolation
