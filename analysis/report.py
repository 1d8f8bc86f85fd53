"""The study report: `report/report.md`, `report/report.html` (self-contained, figures inline),
`report/headline.json` and the figures as PNG/SVG, from the study's trial records. `analyse` is the one
function the report, the CLI and the notebook share. The report is one template,
`templates/report.md.j2`; the HTML page is that markdown rendered by markdown-it-py inside
`templates/report.html.j2`, with the figures inlined as data URIs."""

import base64
import json
import re
from dataclasses import dataclass
from pathlib import Path

from markdown_it import MarkdownIt

from analysis.frontier import (
    SIZES,
    Fit,
    Match,
    PointSummary,
    Ratio,
    TrialPoint,
    Unmatched,
    attribution_over_learned,
    circuit_ratio,
    direct_path_tasks,
    edge_ratio,
    frontier_tasks,
    grouped_fits,
    match_task,
    necessity_over_sufficiency,
    pareto_front,
    per_task_ratios,
    point_summaries,
    trial_points,
)
from analysis.load import trial_records
from analysis.plots import (
    frontier_figure,
    ratio_figure,
    save,
    structure_figure,
    target_curve_figure,
    task_sizes_figure,
)
from pipeline.records import LR_SEARCH_FILE, TrialRecord
from pipeline.templating import environment

TIMING_FILE = "timing.json"  # written by the study driver: wall seconds of the last run


@dataclass(frozen=True)
class Analysis:
    trials: list[TrialPoint]  # one per trial, in the records' order
    tasks: list[str]  # the frontier's fixed task set (edges average over it; coverage counts it)
    direct: dict[str, str]  # direct-path task -> why (out of every ratio and of the frontier)
    points: list[PointSummary]  # the seeds of each point, aggregated
    front: list[int]  # indices into trials
    matches: list[Match]  # sparse circuits matched against dense ones at the same loss
    unmatched: list[Unmatched]
    ratio: Ratio | None  # the headline: sparse / dense edges at matched loss
    by_method: dict[str, Ratio | None]  # the same ratio per circuit size (frontier.SIZES), learned masks first
    task_ratios: dict[str, Ratio]
    necessity: dict[str, Ratio | None]  # "sparse" / "dense": necessity loss / sufficiency loss
    attribution: dict[str, Ratio | None]  # "sparse" / "dense": attribution-baseline edges / learned-mask edges
    fits: dict[str, dict[object, Fit]]  # name -> {group value: Fit}

    @property
    def ratio_tasks(self) -> list[str]:
        return sorted({m.task for m in self.matches})

    @property
    def direction_depends_on_method(self) -> bool:
        """Whether the ratio lies below 1 by one way of sizing circuits and above it by another."""
        values = [r.value for r in self.by_method.values() if r is not None]
        return any(v < 1 for v in values) and any(v > 1 for v in values)


def analyse(records: list[TrialRecord]) -> Analysis:
    tasks = frontier_tasks(records)
    direct = direct_path_tasks(records)
    trials = trial_points(records, tasks)
    front = pareto_front([p.record.val_loss for p in trials], [p.edges for p in trials])
    candidates = sorted({t for r in records for t in r.circuits} - set(direct))
    by_size: dict[str, list[Match]] = {name: [] for name in SIZES}  # the learned masks' are the headline's
    unmatched = []
    for task in candidates:
        for name, size in SIZES.items():
            found, missed = match_task(records, task, size)
            by_size[name] += found
            unmatched += missed if name == "learned_masks" else []
    matches = by_size["learned_masks"]
    by_method = {name: edge_ratio(found) for name, found in by_size.items()}
    sparse = [(p.record, p.edges) for p in trials if not p.record.dense]
    fits = {
        "edges_vs_width_at_density": grouped_fits((r.density, r.d_model, edges) for r, edges in sparse),
        "edges_vs_l0_at_width": grouped_fits((r.d_model, r.l0_total, edges) for r, edges in sparse),
        "loss_vs_width_at_density": grouped_fits((r.density, r.d_model, r.val_loss) for r, _ in sparse),
        "loss_vs_l0_at_width": grouped_fits((r.d_model, r.l0_total, r.val_loss) for r, _ in sparse),
    }
    kinds = {"sparse": False, "dense": True}
    return Analysis(
        trials=trials, tasks=tasks, direct=direct, points=point_summaries(trials), front=front, matches=matches,
        unmatched=unmatched, ratio=by_method["learned_masks"], by_method=by_method,
        task_ratios=per_task_ratios(matches),
        necessity={k: circuit_ratio(records, candidates, d, necessity_over_sufficiency) for k, d in kinds.items()},
        attribution={k: circuit_ratio(records, candidates, d, attribution_over_learned) for k, d in kinds.items()},
        fits=fits)


@dataclass(frozen=True)
class Report:
    folder: Path
    headline: dict
    figures: dict[str, list[Path]]


def write_report(study_folder: str | Path, *, wall_s: float | None = None) -> Report:
    study_folder = Path(study_folder)
    folder = study_folder / "report"
    folder.mkdir(parents=True, exist_ok=True)
    timing_path = study_folder / TIMING_FILE
    if wall_s is not None:
        timing_path.write_text(json.dumps({"wall_s": wall_s}))
    elif timing_path.is_file():
        wall_s = json.loads(timing_path.read_text())["wall_s"]
    lr_path = study_folder / LR_SEARCH_FILE
    lr_search = json.loads(lr_path.read_text()) if lr_path.is_file() else None
    a = analyse(trial_records(study_folder))
    figures = {
        "frontier": save(frontier_figure(a.trials, a.front, a.tasks), folder, "frontier"),
        "ratios": save(ratio_figure(a.task_ratios, a.ratio, a.by_method), folder, "ratios"),
        "size_vs_target": save(target_curve_figure(a.trials), folder, "size_vs_target"),
        "task_sizes": save(task_sizes_figure(a.trials), folder, "task_sizes"),
        "structure": save(structure_figure(a.trials), folder, "structure"),
    }
    headline = headline_figures(a, wall_s)
    (folder / "headline.json").write_text(json.dumps(headline, indent=1))
    env = environment("analysis")
    context = {"name": study_folder.name, "a": a, "h": headline, "per_task": _per_task(a.trials),
               "lr_search": lr_search}
    markdown = env.get_template("report.md.j2").render(context)
    (folder / "report.md").write_text(markdown, encoding="utf-8")
    images = {f"{name}.png": _data_uri(paths[0]) for name, paths in figures.items()}
    body = MarkdownIt("commonmark").enable("table").render(markdown)
    body = re.sub(r'src="([^"]+\.png)"', lambda m: f'src="{images.get(m.group(1), m.group(1))}"', body)
    (folder / "report.html").write_text(env.get_template("report.html.j2").render(name=study_folder.name, body=body),
                                        encoding="utf-8")
    return Report(folder, headline, figures)


def headline_figures(a: Analysis, wall_s: float | None) -> dict:
    """`report/headline.json`: the study's figures under stable names (checks outside the tests read them)."""
    work = sum(p.record.train_seconds + p.record.prune_seconds for p in a.trials)

    def ratio(r: Ratio | None) -> dict | None:
        return None if r is None else {"value": r.value, "ci95": list(r.ci95) if r.ci95 else None, "n": r.n,
                                       "units": r.units}

    return {
        "trials": len(a.trials),
        "frontier_points": len(a.front),
        "sparse_dense_edge_ratio": a.ratio.value if a.ratio else None,
        "sparse_dense_edge_ratio_ci95": list(a.ratio.ci95) if a.ratio and a.ratio.ci95 else None,
        "ratio_tasks": a.ratio_tasks,
        "sparse_dense_edge_ratio_by_method": {k: ratio(r) for k, r in a.by_method.items()},
        "direction_depends_on_pruning_method": a.direction_depends_on_method,
        "ratio_matches": len(a.matches),
        "per_task_ratio": {t: ratio(r) for t, r in a.task_ratios.items()},
        "direct_path_tasks": sorted(a.direct),
        "seeds": {p.point: len(p.seeds) for p in a.points},
        "learning_rates": {p.point: p.lr for p in a.points},
        "necessity_sufficiency_ratio": {k: ratio(r) for k, r in a.necessity.items()},
        "attribution_ratio": {k: ratio(r) for k, r in a.attribution.items()},
        "tasks": a.tasks,
        "coverage": {p.record.trial: [p.found, p.tried] for p in a.trials},
        "wall_s": wall_s,
        "trial_work_s": work,
        "overhead_ratio": (wall_s / work) if wall_s and work else None,
    }


def _per_task(trials: list[TrialPoint]) -> dict[str, list[str]]:
    """Task -> each trial's circuit (edges, or why there is none), for every task any trial tried."""
    tasks = sorted({t for p in trials for t in p.record.circuits})
    def cell(c) -> str:
        return "not tried" if c is None else str(c.edges) if c.status == "found" else c.status

    return {t: [cell(p.record.circuits.get(t)) for p in trials] for t in tasks}


def _data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
