"""The study's figures (matplotlib, written as PNG and SVG): the frontier (the paper's Figure 3 axes),
circuit size vs target loss sparse vs dense (Figure 2), per-task circuit sizes, and kurtosis / overlap
against L0 and width. Each function draws from the analysed trials only and returns the figure."""

from pathlib import Path

from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from analysis.frontier import Ratio, TrialPoint
from pipeline.records import edge_geomean

# Figures are built with the object API (no pyplot state, no GUI backend): the report saves them, a
# notebook displays them.


def subplots(ncols: int = 1, figsize=(7, 5)):
    fig = Figure(figsize=figsize)
    axes = fig.subplots(1, ncols)
    return fig, axes


def frontier_figure(trials: list[TrialPoint], front: list[int], tasks: list[str] | None = None):
    """Pretraining loss vs geometric-mean circuit edges over the fixed task set `tasks`; colour = L0
    (nonzero weights), size = total params; dense models as squares; the Pareto front as a line; each
    point labelled with its coverage (tasks found / tasks in the set)."""
    fig, ax = subplots()
    pts = [p for p in trials if p.edges is not None]
    if pts:
        l0 = [max(p.record.l0_total, 1.0) for p in pts]
        norm = LogNorm(vmin=min(l0), vmax=max(max(l0), min(l0) * 1.01))
        size_max = max(p.record.params_total for p in pts)
        for marker, dense in (("o", False), ("s", True)):
            sel = [p for p in pts if p.record.dense == dense]
            if not sel:
                continue
            sc = ax.scatter([p.record.val_loss for p in sel], [p.edges for p in sel],
                            c=[max(p.record.l0_total, 1.0) for p in sel], cmap="viridis", norm=norm, marker=marker,
                            s=[40 + 260 * p.record.params_total / size_max for p in sel], edgecolors="k",
                            label="dense" if dense else "weight-sparse")
        fig.colorbar(sc, ax=ax, label="L0 (nonzero weights)")
        line = [trials[i] for i in front]
        ax.plot([p.record.val_loss for p in line], [p.edges for p in line], "k--", lw=1, label="Pareto front")
        for p in pts:
            ax.annotate(f"{p.label} s{p.record.seed} {p.found}/{p.tried}", (p.record.val_loss, p.edges), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no trial has a circuit among the frontier tasks", ha="center", transform=ax.transAxes)
    title = "capability vs interpretability" + (f" over {len(tasks)} tasks (labels: coverage)" if tasks else "")
    return _finish(fig, ax, "pretraining validation loss (nats/token)", title)


def ratio_figure(task_ratios: dict[str, Ratio], overall: Ratio | None,
                 by_method: dict[str, Ratio | None] | None = None):
    """Sparse / dense circuit edges at matched loss per task and overall, with bootstrap 95% intervals
    (log scale; 1 = no difference, left of it the sparse circuits are smaller); below, in orange, the
    overall ratio again with circuits sized by the other pruning methods of `by_method`."""
    rows = [(t, r, "tab:blue", "o") for t, r in task_ratios.items()]
    rows += [("all tasks, learned masks" if by_method else "all tasks", overall, "k", "D")] if overall else []
    rows += [(f"all tasks, {name.replace('_', ' ')}", r, "tab:orange", "D")
             for name, r in (by_method or {}).items() if r is not None and name != "learned_masks"]
    fig, ax = subplots(figsize=(7, 1.2 + 0.4 * max(len(rows), 1)))
    if rows:
        for y, (_, r, color, marker) in enumerate(rows):
            low, high = r.ci95 if r.ci95 else (r.value, r.value)
            ax.plot([low, high], [y, y], "-", color=color, lw=2)
            ax.plot([r.value], [y], marker, color=color)
        ax.set_yticks(range(len(rows)), [f"{n} (n={r.n})" for n, r, _, _ in rows], fontsize=8)
        ax.axvline(1.0, color="grey", ls=":", lw=1)
        ax.set_xscale("log")
    else:
        ax.text(0.5, 0.5, "no matched sparse/dense circuits", ha="center", transform=ax.transAxes)
    ax.set_xlabel("sparse / dense circuit edges at matched loss (95% bootstrap interval)")
    ax.set_title("matched-loss ratios per task")
    fig.tight_layout()
    return fig


def target_curve_figure(trials: list[TrialPoint]):
    """Circuit edges vs target loss per model, geometric mean over the tasks with a curve (Figure 2):
    weight-sparse solid, dense dashed."""
    fig, ax = subplots()
    drawn = False
    for p in trials:
        by_target: dict[float, list[int]] = {}
        for c in p.record.circuits.values():
            for point in c.target_curve:
                if point.edges is not None:
                    by_target.setdefault(point.target, []).append(point.edges)
            if c.status == "found":
                by_target.setdefault(c.target_loss, []).append(c.edges)
        if not by_target:
            continue
        xs = sorted(by_target)
        ys = [edge_geomean(by_target[x]) for x in xs]
        dense = p.record.dense
        ax.plot(xs, ys, "--" if dense else "-", marker="s" if dense else "o", label=p.label)
        drawn = True
    if drawn:
        ax.set_yscale("log")
        ax.invert_xaxis()  # tighter targets to the right
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no circuits", ha="center", transform=ax.transAxes)
    return _finish(fig, ax, "target task loss (tighter to the right)",
                   "circuit size vs target loss: sparse (solid) vs dense (dashed)")


def task_sizes_figure(trials: list[TrialPoint]):
    """Edges of each task's circuit in each trial (missing: no circuit)."""
    tasks = sorted({t for p in trials for t, c in p.record.circuits.items() if c.status == "found"})
    fig, ax = subplots(figsize=(max(7, 0.45 * len(tasks) + 3), 5))
    width = 0.8 / max(len(trials), 1)
    for j, p in enumerate(trials):
        found = {t: c.edges for t, c in p.record.circuits.items() if c.status == "found"}
        xs = [i + j * width for i, t in enumerate(tasks) if t in found]
        ys = [max(found[t], 1) for t in tasks if t in found]
        ax.bar(xs, ys, width=width, label=p.label, hatch="//" if p.record.dense else None)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], tasks, rotation=60, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("circuit edges")
    ax.set_title("per-task circuit sizes (hatched: dense)")
    if trials:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def structure_figure(trials: list[TrialPoint]):
    """Residual-stream kurtosis and circuit overlap against L0 (colour: width)."""
    fig, (a, b) = subplots(2, figsize=(10, 4))
    records = [p.record for p in trials]
    for ax, values, label in ((a, [r.residual_kurtosis for r in records], "residual kurtosis"),
                              (b, [r.overlap_nodes_mean for r in records], "mean node overlap between task circuits")):
        sel = [(r, v) for r, v in zip(records, values, strict=True) if v is not None]
        if sel:
            sc = ax.scatter([max(r.l0_total, 1.0) for r, _ in sel], [v for _, v in sel],
                            c=[r.d_model for r, _ in sel], cmap="plasma", edgecolors="k")
            fig.colorbar(sc, ax=ax, label="d_model")
            ax.set_xscale("log")
        ax.set_xlabel("L0 (nonzero weights)")
        ax.set_ylabel(label)
    fig.tight_layout()
    return fig


def _finish(fig, ax, xlabel: str, title: str, ylabel: str = "circuit edges (geometric mean over tasks)"):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def save(fig, folder: Path, name: str) -> list[Path]:
    paths = [folder / f"{name}.png", folder / f"{name}.svg"]
    fig.savefig(paths[0], dpi=130)
    fig.savefig(paths[1])
    return paths


def steering_figure(result: dict):
    """A bridge's steering curve (pipeline/steer.py's steering.json): the dense model's P(correct answer)
    against the edit strength, for the task's cue nodes and for the random control of the same size."""
    fig, ax = subplots(figsize=(6.5, 4.5))
    for key, flip, label, style in (("curve", "flip_strength", f"cue nodes ({len(result['nodes'])})", "-o"),
                                    ("random_curve", "random_flip_strength", "random nodes (control)", "--s")):
        s, p = zip(*result[key], strict=True) if result[key] else ((), ())
        line, = ax.plot(s, p, style, markersize=3, label=label)
        if result[flip] is not None:
            ax.axvline(result[flip], color=line.get_color(), alpha=0.4, linewidth=1)
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    ax.set_ylim(-0.02, 1.02)
    flips = ", ".join(f"{name} {'none' if result[k] is None else format(result[k], 'g')}"
                      for name, k in (("flip at", "flip_strength"), ("control", "random_flip_strength")))
    return _finish(fig, ax, "edit strength s (0: unsteered; 1: the partner prompt's activations)",
                   f"steering {result['task']} through the bridge at {result['site']} ({flips})",
                   ylabel="dense model's P(correct answer)")
