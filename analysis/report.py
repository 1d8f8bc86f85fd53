"""The study report: `report/report.md`, `report/report.html` (self-contained, figures inline) and the
figures as PNG/SVG, from the study's trial records. `analyse` is the one function the report, the CLI
and the notebook share."""

import base64
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path

from analysis.frontier import common_tasks, edges_geomean, grouped_fits, matched_loss_ratio, pareto_front
from analysis.load import to_table, trial_records
from analysis.plots import frontier_figure, save, structure_figure, target_curve_figure, task_sizes_figure

TIMING_FILE = "timing.json"  # written by the study driver: wall seconds of the last run


@dataclass(frozen=True)
class Analysis:
    rows: list[dict]  # one per trial: the table's columns + `edges` (the frontier's y) and `label`
    tasks: list[str]  # the tasks the frontier's edges average over
    tasks_basis: str  # "common" (tasks every trial found) or "per-trial" (each trial's own found tasks)
    front: list[int]  # indices into rows
    ratio: float | None  # sparse / dense edges at matched loss (geometric mean over matched sparse models)
    matches: list[tuple[float, float]]
    fits: dict[str, dict]  # name -> {group value: Fit}


def analyse(records) -> Analysis:
    rows = to_table(records).to_pylist()
    per = [json.loads(r["circuits"]) for r in rows]
    tasks = common_tasks(per)
    basis = "common" if tasks else "per-trial"
    for r, circuits in zip(rows, per, strict=True):
        r["edges"] = edges_geomean(circuits, tasks or sorted(circuits))
        kind = "dense" if r["dense"] else f"1/{round(1 / r['density'])}"
        r["label"] = f"d{r['d_model']} {kind}"
    front = pareto_front([r["val_loss"] for r in rows], [r["edges"] for r in rows])
    ratio, matches = matched_loss_ratio([(r["val_loss"], r["edges"]) for r in rows if r["dense"]],
                                        [(r["val_loss"], r["edges"]) for r in rows if not r["dense"]])
    sparse = [r for r in rows if not r["dense"]]
    fits = {
        "edges_vs_width_at_density": grouped_fits(sparse, "density", "d_model", "edges"),
        "edges_vs_l0_at_width": grouped_fits(sparse, "d_model", "l0_total", "edges"),
        "loss_vs_width_at_density": grouped_fits(sparse, "density", "d_model", "val_loss"),
        "loss_vs_l0_at_width": grouped_fits(sparse, "d_model", "l0_total", "val_loss"),
    }
    return Analysis(rows, tasks, basis, front, ratio, matches, fits)


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
        "frontier": save(frontier_figure(a.rows, a.front), folder, "frontier"),
        "size_vs_target": save(target_curve_figure(a.rows), folder, "size_vs_target"),
        "task_sizes": save(task_sizes_figure(a.rows), folder, "task_sizes"),
        "structure": save(structure_figure(a.rows), folder, "structure"),
    }
    work = sum(r["train_seconds"] + r["prune_seconds"] for r in a.rows)
    headline = {
        "trials": len(a.rows),
        "frontier_points": len(a.front),
        "sparse_dense_edge_ratio": a.ratio,
        "wall_s": wall_s,
        "trial_work_s": work,
        "overhead_ratio": (wall_s / work) if wall_s and work else None,
        "tasks_basis": a.tasks_basis,
        "tasks": a.tasks,
    }
    (folder / "headline.json").write_text(json.dumps(headline, indent=1))
    md = _markdown(study_folder.name, a, headline)
    (folder / "report.md").write_text(md, encoding="utf-8")
    (folder / "report.html").write_text(_html(study_folder.name, md, figures), encoding="utf-8")
    return Report(folder, headline, figures)


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


def _markdown(name: str, a: Analysis, h: dict) -> str:
    lines = [f"# Study {name}", ""]
    basis = (f"the {len(a.tasks)} tasks every trial found a circuit for ({', '.join(a.tasks)})" if a.tasks_basis ==
             "common" else "each trial's own found tasks (no task had a circuit in every trial)")
    lines += [
        "## Headline", "",
        f"- trials: {h['trials']}; frontier points: {h['frontier_points']}",
        f"- sparse / dense circuit edges at matched pretraining loss: {_fmt(h['sparse_dense_edge_ratio'])}"
        + ("" if a.ratio is not None else " (no sparse model's loss lies within the dense models' range)"),
        f"- wall time {_fmt(h['wall_s'], 4)} s; trial work (training + pruning) {_fmt(h['trial_work_s'], 4)} s; "
        f"overhead ratio (wall / work) {_fmt(h['overhead_ratio'])}",
        f"- circuit edges are the geometric mean over {basis}; trials without any circuit sit off the frontier",
        "",
        "![frontier](frontier.png)", "",
        "## Trials", "",
        "| trial | d_model | density | params | L0 | val loss | task acc | circuits | edges (gm) | kurtosis "
        "| overlap | train s | prune s | front |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(a.rows):
        lines.append(
            f"| {r['trial']} | {r['d_model']} | {r['density']:g} | {r['params_total']} | {_fmt(r['l0_total'])} "
            f"| {r['val_loss']:.3f} | {_fmt(r['task_accuracy_mean'])} | {r['circuits_found']}/{r['circuits_tried']} "
            f"| {_fmt(r['edges'])} | {_fmt(r['residual_kurtosis'])} | {_fmt(r['overlap_nodes_mean'])} "
            f"| {r['train_seconds']:.0f} | {r['prune_seconds']:.0f} | {'yes' if i in a.front else ''} |")
    per = {r["trial"]: json.loads(r["circuits"]) for r in a.rows}
    tasks = sorted({t for circuits in per.values() for t in circuits})
    if tasks:
        lines += ["", "## Circuits per task (edges; — where the whole model misses the target)", "",
                  "| task | " + " | ".join(r["label"] for r in a.rows) + " |",
                  "|---|" + "---|" * len(a.rows)]
        for task in tasks:
            cells = [str(per[r["trial"]][task]["edges"]) if per[r["trial"]].get(task, {}).get("status") == "found"
                     else "—" for r in a.rows]
            lines.append(f"| {task} | " + " | ".join(cells) + " |")
    lines += ["", "## How the frontier moves (log-log fits, slope ± standard error)", ""]
    for fit_name, fits in a.fits.items():
        if not fits:
            lines.append(f"- {fit_name}: too few distinct points")
            continue
        parts = [f"{k:g}: {f.slope:+.2f} ± {_fmt(f.slope_se, 2)} (n={f.n})" for k, f in fits.items()]
        lines.append(f"- {fit_name}: " + "; ".join(parts))
    if a.matches:
        lines += ["", "Matched-loss ratios (sparse model loss: ratio): "
                  + ", ".join(f"{loss:.3f}: {ratio:.3g}" for loss, ratio in a.matches)]
    lines += ["", "## Figures", "", "![circuit size vs target](size_vs_target.png)", "",
              "![per-task circuit sizes](task_sizes.png)", "", "![kurtosis and overlap](structure.png)", ""]
    return "\n".join(lines)


def _html(name: str, md: str, figures: dict[str, list[Path]]) -> str:
    """The markdown rendered to plain HTML (headings, lists, tables, images inlined as data URIs)."""
    body, table = [], []

    def flush() -> None:
        if table:
            rows = [r for r in table if not set(r.replace("|", "").strip()) <= {"-"}]
            cells = [[html.escape(c.strip()) for c in r.strip("|").split("|")] for r in rows]
            head = "".join(f"<th>{c}</th>" for c in cells[0])
            rest = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in cells[1:])
            body.append(f"<table><tr>{head}</tr>{rest}</table>")
            table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("![") and "](" in line:
            alt, src = line[2:].split("](", 1)
            png = figures.get(src.rstrip(")").removesuffix(".png"), [None])[0]
            if png is not None:
                data = base64.b64encode(png.read_bytes()).decode()
                body.append(f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></p>')
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("- "):
            body.append(f"<li>{html.escape(line[2:])}</li>")
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    flush()
    style = ("body{font:14px/1.45 system-ui,sans-serif;margin:24px;max-width:1200px}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 6px;font-size:12px}img{max-width:100%}")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Study {html.escape(name)}</title>'
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")
