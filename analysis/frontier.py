"""The capability-interpretability frontier (METHOD.md: Figure 3 axes), as pure functions of the
trial table.

Interpretability is the geometric mean of circuit edges over tasks. Different trials find circuits for
different tasks (a task a model has not learned has none), so by default the mean is taken over the
tasks *every* trial found a circuit for (`common_tasks`), which compares like with like; when no task is
common to all, each trial's own found tasks are used and the report says so. Trials with no circuit at
all sit out of the frontier (listed in the report).
"""

import math
from dataclasses import dataclass

import numpy as np


def common_tasks(circuits: list[dict]) -> list[str]:
    """Tasks whose circuit every trial found (`circuits`: one {task: circuit dict} per trial)."""
    if not circuits:
        return []
    sets = [{t for t, c in per.items() if c["status"] == "found"} for per in circuits]
    return sorted(set.intersection(*sets))


def edges_geomean(per: dict, tasks: list[str]) -> float | None:
    """Geometric mean of edges over `tasks` (an empty circuit counts as 1 edge, so logs stay finite)."""
    values = [max(per[t]["edges"], 1) for t in tasks if t in per and per[t]["status"] == "found"]
    return float(np.exp(np.mean(np.log(values)))) if values else None


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
    lx, ly = np.log([a for a, _ in pairs]), np.log([b for _, b in pairs])
    slope, intercept = np.polyfit(lx, ly, 1)
    n = len(pairs)
    if n > 2:
        resid = ly - (slope * lx + intercept)
        se = math.sqrt(float(resid @ resid) / (n - 2) / float(((lx - lx.mean()) ** 2).sum()))
    else:
        se = math.nan
    return Fit(float(slope), float(intercept), se, n)


def grouped_fits(rows: list[dict], group: str, x: str, y: str) -> dict[object, Fit]:
    """One log-log fit of y against x per value of `group` (e.g. edges vs width at each density)."""
    out = {}
    for value in sorted({r[group] for r in rows}):
        members = [r for r in rows if r[group] == value and r[y] is not None]
        fit = loglog_fit([r[x] for r in members], [r[y] for r in members])
        if fit is not None:
            out[value] = fit
    return out


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
    return float(np.exp(np.mean(np.log([m[1] for m in matches])))), matches
