"""The capability-interpretability frontier and the study's statistics, as pure functions of the trial
records (METHOD.md 4 and 6: Figure 3's axes, the sparse/dense circuit-size ratio at matched loss).

Which tasks count:
- A task is *direct-path* when the pair's last tokens alone tell the answer, by the task's nature
  (`Task.direct_path`, e.g. else_elif) or because some model's empty circuit (the bigram table alone,
  calibrated) reaches the target (`CircuitSummary.status == "direct"`). Such a task says nothing about
  circuits: it never enters a ratio or the frontier, and the report lists it apart.
- The frontier's interpretability axis averages circuit edges over one fixed, named task set
  (`frontier_tasks`: every task every trial tried, direct-path ones out); each model's coverage (tasks
  found of the set) stands beside it. A model that found none of them has no point.

The headline ratio: per task, each sparse model that found the task is matched against the dense models
that found it, by interpolating dense log-edges linearly in validation loss between the two dense
models whose losses bracket the sparse one (no extrapolation: a sparse model outside the dense range is
unmatched and listed). The ratio is the geometric mean over matches, taken as the mean over (task, seed)
units of their mean log ratio, with a percentile bootstrap 95% interval over those units
(`scipy.stats.bootstrap`); per task, the same over that task's matches. The same ratio is computed again
with each circuit's size from the gradient-attribution ranking, and from the smaller of the two
(`SIZES`): a direction that flips with the pruning method is not a finding about the models.
"""

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from scipy import stats

from pipeline.records import TrialRecord, edge_geomean
from pipeline.tasks import TASKS

BOOTSTRAP_RESAMPLES = 9999
BOOTSTRAP_SEED = 0  # the report is reproducible: the same records give the same interval


@dataclass(frozen=True)
class TrialPoint:
    """One trial in the analysis: its record, the frontier's y, its coverage and its label."""

    record: TrialRecord
    edges: float | None  # geometric mean of circuit edges over the frontier tasks it found (None: none)
    found: int  # frontier tasks whose circuit it found
    tried: int  # frontier tasks
    label: str  # width and density, e.g. "d64 1/4"

    @property
    def coverage(self) -> float:
        return self.found / self.tried if self.tried else 0.0


def label(record: TrialRecord) -> str:
    return f"d{record.d_model} " + ("dense" if record.dense else f"1/{round(1 / record.density)}")


def direct_path_tasks(records: list[TrialRecord]) -> dict[str, str]:
    """Task -> why it is direct-path: "by nature" or "empty circuit in N of M models"."""
    tried = sorted({t for r in records for t in r.circuits})
    out = {}
    for t in tried:
        direct = sum(1 for r in records if (c := r.circuits.get(t)) is not None and c.status == "direct")
        if t in TASKS and TASKS[t].direct_path:
            out[t] = "by nature: the pair's last tokens differ"
        elif direct:
            out[t] = f"the empty circuit reaches the target in {direct} of {len(records)} models"
    return out


def frontier_tasks(records: list[TrialRecord]) -> list[str]:
    """The fixed task set of the frontier's y axis: tasks every trial tried, direct-path ones out."""
    if not records:
        return []
    tried = set.intersection(*[set(r.circuits) for r in records])
    return sorted(tried - set(direct_path_tasks(records)))


def trial_points(records: list[TrialRecord], tasks: list[str]) -> list[TrialPoint]:
    """Each trial with its edges averaged over the circuits it found among `tasks`, and its coverage."""
    points = []
    for r in records:
        found = [r.circuits[t].edges for t in tasks if t in r.circuits and r.circuits[t].status == "found"]
        points.append(TrialPoint(r, edge_geomean(found), len(found), len(tasks), label(r)))
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


# --- per-point aggregation over seeds -----------------------------------------------------------------

@dataclass(frozen=True)
class PointSummary:
    """The seeds of one study point: mean and standard deviation (ddof 1; nan with one seed)."""

    point: str
    label: str
    dense: bool
    d_model: int
    density: float
    seeds: list[int]
    lr: float | None
    val_loss: tuple[float, float]
    edges: tuple[float, float] | None  # over the seeds with a frontier point (None: none has one)
    coverage: tuple[float, float]
    task_accuracy: tuple[float, float]


def _mean_sd(values: list[float]) -> tuple[float, float]:
    arr = np.array(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else math.nan


def point_summaries(trials: list[TrialPoint]) -> list[PointSummary]:
    groups: dict[str, list[TrialPoint]] = {}
    for p in trials:
        groups.setdefault(p.record.point, []).append(p)
    out = []
    for name, members in groups.items():
        r = members[0].record
        edges = [p.edges for p in members if p.edges is not None]
        out.append(PointSummary(
            point=name, label=label(r), dense=r.dense, d_model=r.d_model, density=r.density,
            seeds=sorted(p.record.seed for p in members), lr=r.lr,
            val_loss=_mean_sd([p.record.val_loss for p in members]),
            edges=_mean_sd(edges) if edges else None, coverage=_mean_sd([p.coverage for p in members]),
            task_accuracy=_mean_sd([p.record.task_accuracy_mean for p in members])))
    return out


# --- the sparse / dense ratio at matched loss -----------------------------------------------------------

@dataclass(frozen=True)
class Match:
    """One sparse model's circuit for one task against the dense circuits at its loss."""

    task: str
    trial: str
    seed: int
    loss: float
    edges: int
    dense_edges: float  # interpolated between `below` and `above`
    below: tuple[str, float, int]  # (dense trial, its loss, its edges) at or under the sparse loss
    above: tuple[str, float, int]  # ... at or over it

    @property
    def ratio(self) -> float:
        return self.edges / self.dense_edges


@dataclass(frozen=True)
class Unmatched:
    task: str
    trial: str
    reason: str


@dataclass(frozen=True)
class Ratio:
    """A geometric-mean ratio with its bootstrap 95% interval (None with fewer than 2 units)."""

    value: float
    ci95: tuple[float, float] | None
    n: int  # matches (or circuits) behind it
    units: int  # resampling units


# How big a found circuit is, by pruning method (METHOD.md 4): the learned masks' circuit (the paper's
# measure, the headline), the gradient-attribution ranking's at the same target, and the smaller of the
# two (both reach the target on the train pairs, so the smaller bounds the minimal circuit more tightly).
SIZES: dict[str, Callable[[object], int | None]] = {
    "learned_masks": lambda c: c.edges,
    "attribution": lambda c: c.attribution_edges,
    "smallest": lambda c: c.edges if c.attribution_edges is None else min(c.edges, c.attribution_edges),
}


def match_task(records: list[TrialRecord], task: str, size: Callable[[object], int | None] = SIZES["learned_masks"]
               ) -> tuple[list[Match], list[Unmatched]]:
    """Every sparse model that found `task`, matched at its loss against the dense models that found it;
    a circuit's size is `size(circuit)` (edges; None: not measured, the circuit is left out)."""
    def found(r: TrialRecord):
        c = r.circuits.get(task)
        return c if c is not None and c.status == "found" and size(c) is not None else None

    dense = sorted((r.val_loss, max(size(c), 1), r.trial) for r in records if r.dense and (c := found(r)))
    matches, unmatched = [], []
    for r in records:
        c = found(r)
        if r.dense or c is None:
            continue
        lower = [d for d in dense if d[0] <= r.val_loss]
        upper = [d for d in dense if d[0] >= r.val_loss]
        if not lower or not upper:
            side = "no dense model found it" if not dense else \
                ("below" if not lower else "above") + " the loss of every dense model that found it"
            unmatched.append(Unmatched(task, r.trial, f"loss {r.val_loss:.3f} {side} (no extrapolation)"))
            continue
        (l0, e0, t0), (l1, e1, t1) = lower[-1], upper[0]
        w = 0.0 if l1 == l0 else (r.val_loss - l0) / (l1 - l0)
        interpolated = float(np.exp((1 - w) * np.log(e0) + w * np.log(e1)))
        matches.append(Match(task, r.trial, r.seed, r.val_loss, max(size(c), 1), interpolated, (t0, l0, e0),
                             (t1, l1, e1)))
    return matches, unmatched


def bootstrap_geomean(units: list[float]) -> Ratio | None:
    """exp(mean of per-unit log values) with a percentile bootstrap 95% interval over the units."""
    if not units:
        return None
    logs = np.array(units, dtype=float)
    value = float(np.exp(logs.mean()))
    if len(logs) < 2 or np.ptp(logs) < 1e-12:  # one unit, or all equal (the bootstrap is degenerate)
        ci = None if len(logs) < 2 else (value, value)
    else:
        res = stats.bootstrap((logs,), np.mean, confidence_level=0.95, n_resamples=BOOTSTRAP_RESAMPLES,
                              method="percentile", random_state=BOOTSTRAP_SEED)
        ci = (float(np.exp(res.confidence_interval.low)), float(np.exp(res.confidence_interval.high)))
    return Ratio(value, ci, len(units), len(units))


def unit_ratio(pairs: list[tuple[tuple, float]]) -> Ratio | None:
    """Values grouped into resampling units by key, each unit its mean log value; the geometric mean over
    units with its interval. `pairs` are (unit key, value > 0)."""
    by_unit: dict[tuple, list[float]] = {}
    for key, value in pairs:
        by_unit.setdefault(key, []).append(math.log(value))
    ratio = bootstrap_geomean([float(np.mean(v)) for v in by_unit.values()])
    return None if ratio is None else Ratio(ratio.value, ratio.ci95, len(pairs), len(by_unit))


def edge_ratio(matches: list[Match]) -> Ratio | None:
    """The headline: sparse / dense edges at matched loss, resampled over (task, seed) units."""
    return unit_ratio([((m.task, m.seed), m.ratio) for m in matches])


def per_task_ratios(matches: list[Match]) -> dict[str, Ratio]:
    """Each task's ratio, resampled over its matches (sparse models and seeds)."""
    out = {}
    for task in sorted({m.task for m in matches}):
        ratio = unit_ratio([((m.trial,), m.ratio) for m in matches if m.task == task])
        if ratio is not None:
            out[task] = ratio
    return out


def circuit_ratio(records: list[TrialRecord], tasks: list[str], dense: bool,
                  value: Callable[[object], float | None]) -> Ratio | None:
    """A per-circuit ratio (e.g. necessity / sufficiency loss) over the found circuits of `tasks` in the
    sparse (or dense) models, resampled over (task, seed) units."""
    pairs = []
    for r in records:
        if r.dense != dense:
            continue
        for t in tasks:
            c = r.circuits.get(t)
            if c is not None and c.status == "found" and (v := value(c)) is not None and v > 0 and math.isfinite(v):
                pairs.append(((t, r.seed), v))
    return unit_ratio(pairs)


def necessity_over_sufficiency(c) -> float | None:
    """How much more mean-ablating the circuit hurts than keeping it alone (> 1: necessary and sufficient)."""
    if c.necessity_loss is None or not c.sufficiency_loss:
        return None
    return c.necessity_loss / c.sufficiency_loss


def attribution_over_learned(c) -> float | None:
    """Edges of the attribution-ranked circuit over the learned masks' (> 1: the masks find smaller)."""
    if c.attribution_edges is None:
        return None
    return max(c.attribution_edges, 1) / max(c.edges, 1)
