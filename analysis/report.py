"""The study report: `report/report.md`, `report/report.html` (self-contained, figures inline) and the
figures as PNG/SVG, from the study's trial records. `analyse` is the one function the report, the CLI
and the notebook share; the two documents are the templates `templates/report.md.j2` and
`templates/report.html.j2`, rendered from the same analysis."""

import base64
import json
from dataclasses import dataclass
from pathlib import Path

from analysis.frontier import (
    Fit,
    TrialPoint,
    common_tasks,
    grouped_fits,
    matched_loss_ratio,
    pareto_front,
    trial_points,
)
from analysis.load import trial_records
from analysis.plots import frontier_figure, save, structure_figure, target_curve_figure, task_sizes_figure
from pipeline.records import TrialRecord
from pipeline.templating import environment

TIMING_FILE = "timing.json"  # written by the study driver: wall seconds of the last run


@dataclass(frozen=True)
class Analysis:
    trials: list[TrialPoint]  # one per trial, in the records' order
    tasks: list[str]  # the tasks the frontier's edges average over
    tasks_basis: str  # "common" (tasks every trial found) or "per-trial" (each trial's own found tasks)
    front: list[int]  # indices into trials
    ratio: float | None  # sparse / dense edges at matched loss (geometric mean over matched sparse models)
    matches: list[tuple[float, float]]
    fits: dict[str, dict[object, Fit]]  # name -> {group value: Fit}


def analyse(records: list[TrialRecord]) -> Analysis:
    tasks = common_tasks(records)
    trials = trial_points(records, tasks)
    front = pareto_front([p.record.val_loss for p in trials], [p.edges for p in trials])
    ratio, matches = matched_loss_ratio([(p.record.val_loss, p.edges) for p in trials if p.record.dense],
                                        [(p.record.val_loss, p.edges) for p in trials if not p.record.dense])
    sparse = [(p.record, p.edges) for p in trials if not p.record.dense]
    fits = {
        "edges_vs_width_at_density": grouped_fits((r.density, r.d_model, edges) for r, edges in sparse),
        "edges_vs_l0_at_width": grouped_fits((r.d_model, r.l0_total, edges) for r, edges in sparse),
        "loss_vs_width_at_density": grouped_fits((r.density, r.d_model, r.val_loss) for r, _ in sparse),
        "loss_vs_l0_at_width": grouped_fits((r.d_model, r.l0_total, r.val_loss) for r, _ in sparse),
    }
    return Analysis(trials, tasks, "common" if tasks else "per-trial", front, ratio, matches, fits)


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
    a = analyse(trial_records(study_folder))
    figures = {
        "frontier": save(frontier_figure(a.trials, a.front), folder, "frontier"),
        "size_vs_target": save(target_curve_figure(a.trials), folder, "size_vs_target"),
        "task_sizes": save(task_sizes_figure(a.trials), folder, "task_sizes"),
        "structure": save(structure_figure(a.trials), folder, "structure"),
    }
    work = sum(p.record.train_seconds + p.record.prune_seconds for p in a.trials)
    headline = {
        "trials": len(a.trials),
        "frontier_points": len(a.front),
        "sparse_dense_edge_ratio": a.ratio,
        "wall_s": wall_s,
        "trial_work_s": work,
        "overhead_ratio": (wall_s / work) if wall_s and work else None,
        "tasks_basis": a.tasks_basis,
        "tasks": a.tasks,
    }
    (folder / "headline.json").write_text(json.dumps(headline, indent=1))
    env = environment("analysis")
    context = {"name": study_folder.name, "a": a, "h": headline, "per_task": _per_task(a.trials)}
    (folder / "report.md").write_text(env.get_template("report.md.j2").render(context), encoding="utf-8")
    images = {name: _data_uri(paths[0]) for name, paths in figures.items()}
    (folder / "report.html").write_text(env.get_template("report.html.j2").render(context, images=images),
                                        encoding="utf-8")
    return Report(folder, headline, figures)


def _per_task(trials: list[TrialPoint]) -> dict[str, list[int | None]]:
    """Task -> each trial's circuit edges (None where it found no circuit), for every task any trial tried."""
    tasks = sorted({t for p in trials for t in p.record.circuits})
    return {t: [c.edges if (c := p.record.circuits.get(t)) is not None and c.status == "found" else None
                for p in trials] for t in tasks}


def _data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
