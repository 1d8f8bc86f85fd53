"""The study's figures (matplotlib, written as PNG and SVG): the frontier (the paper's Figure 3 axes),
circuit size vs target loss sparse vs dense (Figure 2), per-task circuit sizes, and kurtosis / overlap
against L0 and width. Each function draws from the analysis frame only and returns the figure."""

import json
from pathlib import Path

from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

# Figures are built with the object API (no pyplot state, no GUI backend): the report saves them, a
# notebook displays them.


def subplots(ncols: int = 1, figsize=(7, 5)):
    fig = Figure(figsize=figsize)
    axes = fig.subplots(1, ncols)
    return fig, axes


def frontier_figure(rows: list[dict], front: list[int]):
    """Pretraining loss vs geometric-mean circuit edges; colour = L0 (nonzero weights), size = total
    params; dense models as squares; the Pareto front as a line."""
    fig, ax = subplots()
    pts = [r for r in rows if r["edges"] is not None]
    if pts:
        l0 = [max(r["l0_total"], 1.0) for r in pts]
        norm = LogNorm(vmin=min(l0), vmax=max(max(l0), min(l0) * 1.01))
        size_max = max(r["params_total"] for r in pts)
        for marker, dense in (("o", False), ("s", True)):
            sel = [r for r in pts if r["dense"] == dense]
            if not sel:
                continue
            sc = ax.scatter([r["val_loss"] for r in sel], [r["edges"] for r in sel],
                            c=[max(r["l0_total"], 1.0) for r in sel], cmap="viridis", norm=norm, marker=marker,
                            s=[40 + 260 * r["params_total"] / size_max for r in sel], edgecolors="k",
                            label="dense" if dense else "weight-sparse")
        fig.colorbar(sc, ax=ax, label="L0 (nonzero weights)")
        line = [rows[i] for i in front]
        ax.plot([r["val_loss"] for r in line], [r["edges"] for r in line], "k--", lw=1, label="Pareto front")
        for r in pts:
            ax.annotate(r["label"], (r["val_loss"], r["edges"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no trial has a circuit yet", ha="center", transform=ax.transAxes)
    return _finish(fig, ax, "pretraining validation loss (nats/token)", "capability vs interpretability")


def target_curve_figure(rows: list[dict]):
    """Circuit edges vs target loss per model, geometric mean over the tasks with a curve (Figure 2):
    weight-sparse solid, dense dashed."""
    import numpy as np

    fig, ax = subplots()
    drawn = False
    for r in rows:
        by_target: dict[float, list[float]] = {}
        for c in json.loads(r["circuits"]).values():
            for target, _k, edges in c.get("target_curve") or []:
                if edges is not None:
                    by_target.setdefault(target, []).append(max(edges, 1))
            if c["status"] == "found":
                by_target.setdefault(c["target_loss"], []).append(max(c["edges"], 1))
        if len(by_target) < 1:
            continue
        xs = sorted(by_target)
        ys = [float(np.exp(np.mean(np.log(by_target[x])))) for x in xs]
        ax.plot(xs, ys, "--" if r["dense"] else "-", marker="s" if r["dense"] else "o", label=r["label"])
        drawn = True
    if drawn:
        ax.set_yscale("log")
        ax.invert_xaxis()  # tighter targets to the right
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no circuits", ha="center", transform=ax.transAxes)
    return _finish(fig, ax, "target task loss (tighter to the right)",
                   "circuit size vs target loss: sparse (solid) vs dense (dashed)")


def task_sizes_figure(rows: list[dict]):
    """Edges of each task's circuit in each trial (missing: no circuit)."""
    tasks = sorted({t for r in rows for t, c in json.loads(r["circuits"]).items() if c["status"] == "found"})
    fig, ax = subplots(figsize=(max(7, 0.45 * len(tasks) + 3), 5))
    width = 0.8 / max(len(rows), 1)
    for j, r in enumerate(rows):
        per = json.loads(r["circuits"])
        xs = [i + j * width for i, t in enumerate(tasks) if t in per and per[t]["status"] == "found"]
        ys = [max(per[t]["edges"], 1) for t in tasks if t in per and per[t]["status"] == "found"]
        ax.bar(xs, ys, width=width, label=r["label"], hatch="//" if r["dense"] else None)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], tasks, rotation=60, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("circuit edges")
    ax.set_title("per-task circuit sizes (hatched: dense)")
    if rows:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def structure_figure(rows: list[dict]):
    """Residual-stream kurtosis and circuit overlap against L0 (colour: width)."""
    fig, (a, b) = subplots(2, figsize=(10, 4))
    for ax, key, label in ((a, "residual_kurtosis", "residual kurtosis"),
                           (b, "overlap_nodes_mean", "mean node overlap between task circuits")):
        sel = [r for r in rows if r[key] is not None]
        if sel:
            sc = ax.scatter([max(r["l0_total"], 1.0) for r in sel], [r[key] for r in sel],
                            c=[r["d_model"] for r in sel], cmap="plasma", edgecolors="k")
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
