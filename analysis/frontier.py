"""The capability-interpretability frontier (METHOD.md: Figure 3 axes), as pure functions of the
trial records.

Interpretability is the geometric mean of circuit edges over tasks. Different trials find circuits for
different tasks (a task a model has not learned has none), so by default the mean is taken over the
tasks *every* trial found a circuit for (`common_tasks`), which compares like with like; when no task is
common to all, each trial's own found tasks are used and the report says so. Trials with no circuit at
all sit out of the frontier (listed in the report).
"""

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from scipy import stats

from pipeline.records import TrialRecord, geometric_mean_edges


@dataclass(frozen=True)
class TrialPoint:
    """One trial in the analysis: its record, the frontier's y and its label in plots and tables."""

    record: TrialRecord
    edges: float | None  # geometric mean of circuit edges over the analysed tasks (None: no circuit among them)
    label: str  # width and density, e.g. "d64 1/4"


def common_tasks(records: list[TrialRecord]) -> list[str]:
    """Tasks whose circuit every trial found."""
    if not records:
        return []
    sets = [{t for t, c in r.circuits.items() if c.status == "found"} for r in records]
    return sorted(set.intersection(*sets))


def trial_points(records: list[TrialRecord], tasks: list[str]) -> list[TrialPoint]:
    """Each trial with its edges averaged over `tasks` (empty: over the trial's own tasks)."""
    points = []
    for r in records:
        over = tasks or sorted(r.circuits)
        edges = geometric_mean_edges(r.circuits[t] for t in over if t in r.circuits)
        kind = "dense" if r.dense else f"1/{round(1 / r.density)}"
        points.append(TrialPoint(r, edges, f"d{r.d_model} {kind}"))
    return points


def pareto_front(loss: list[float], edges: list[float | None]) -> list[int]:
    """Indices of the points no other point beats on both (lower loss, fewer edges), by loss."""
    points = [(i, loss[i], edges[i]) for i in range(len(loss)) if edges[i] is not None and math.isfinite(loss[i])]
    front = []
    for i, li, ei in points:
        dominated = any(lj <= li and ej <= ei and (lj < li or ej < ei) for j, lj, ej in points if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (loss[i], edges[i]))


@dataclass(frozen=True)
class Fit:
    """log y = slope * log x + intercept, with the slope's standard error (nan with 2 points)."""

    slope: float
    intercept: float
    slope_se: float
    n: int


def loglog_fit(x: list[float], y: list[float]) -> Fit | None:
    """Least-squares fit in log-log space; None with fewer than 2 distinct x."""
    pairs = [(a, b) for a, b in zip(x, y, strict=True) if a and b and a > 0 and b > 0]
    if len({a for a, _ in pairs}) < 2:
        return None
    result = stats.linregress(np.log([a for a, _ in pairs]), np.log([b for _, b in pairs]))
    n = len(pairs)
    return Fit(float(result.slope), float(result.intercept), float(result.stderr) if n > 2 else math.nan, n)


def grouped_fits(points: Iterable[tuple[object, float, float | None]]) -> dict[object, Fit]:
    """One log-log fit of y against x per group, from (group, x, y) points (e.g. edges vs width at each
    density); a y of None sits out."""
    by_group: dict[object, list[tuple[float, float]]] = {}
    for group, x, y in points:
        members = by_group.setdefault(group, [])
        if y is not None:
            members.append((x, y))
    fits = {group: loglog_fit([x for x, _ in xy], [y for _, y in xy]) for group, xy in by_group.items()}
    return {group: fits[group] for group in sorted(fits) if fits[group] is not None}


def matched_loss_ratio(dense: list[tuple[float, float]], sparse: list[tuple[float, float]]
                       ) -> tuple[float | None, list[tuple[float, float]]]:
    """Sparse / dense circuit edges at matched pretraining loss.

    `dense` and `sparse` are (val loss, edges) points. Dense log-edges are interpolated linearly in
    loss along the dense models; a sparse model whose loss lies outside the dense range has no match.
    Returns the geometric mean ratio over matched sparse models (None if none matched) and the
    (loss, ratio) of each match."""
    points = sorted((loss, edges) for loss, edges in dense if edges)
    if len(points) < 2:
        return None, []
    losses = np.array([p[0] for p in points])
    logs = np.log([p[1] for p in points])
    matches = []
    for loss, edges in sparse:
        if not edges or not losses[0] <= loss <= losses[-1]:
            continue
        matched = float(np.exp(np.interp(loss, losses, logs)))
        matches.append((loss, edges / matched))
    if not matches:
        return None, []
    # not records.edge_geomean: these are ratios, often below 1, which its 1-edge floor would clip
    return float(np.exp(np.mean(np.log([m[1] for m in matches])))), matches
