"""The learning rate of each point, chosen by successive halving on Ray Tune (issue: the paper tuned the
LR per model; one LR for every width and density favours some models over others).

Per point (a width x density of the study, dense included), every LR of `lr_search.lrs` trains for
`budget` x train.steps (seed as the point's first trial, no pruning); the best 1/eta of them by final
validation loss train again, eta x longer, and so on until one LR is left or the rung reaches the full
budget. A candidate that diverges (non-finite loss) fails its run and counts as infinitely bad. Each rung
of every point runs as one Ray Tune grid through the study's own trainable (`study._fit`), so the
candidates share the cluster like the trials do, each is a nested MLflow run tagged `kind=lr_search`,
and a rerun reuses every finished candidate. Candidates train from scratch at each rung (the LR
schedule depends on the run's length, so a longer run cannot continue a shorter one exactly).

The result, `lr_search.json` in the study folder, maps each point to its chosen LR and every rung's
losses; the study then trains its trials with those LRs, and the report shows them.
"""

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path

from infra.checkpoint import write_atomic
from pipeline.config import ExperimentConfig
from pipeline.records import LR_SEARCH_FILE
from pipeline.trial import finished_metrics
from sweeps.spec import StudyConfig, TrialSpec

# (configs by name, Tune experiment name) -> (finished names, failed name -> error): the study's `_fit`
FitFn = Callable[[dict[str, ExperimentConfig], str], tuple[set[str], dict[str, str]]]


def rung_steps(total: int, budget: float, eta: int, rung: int) -> int:
    """Training steps of rung `rung`: budget x eta^rung of `total`, at least 1, at most `total`."""
    return max(1, min(total, math.ceil(total * budget * eta**rung)))


def survivors(count: int, steps: int, total: int, eta: int) -> int:
    """How many of a point's `count` rates a rung of `steps` (of `total`) keeps: the best 1/eta, at least
    one; only one once the rung trained the full budget."""
    return 1 if steps >= total else max(1, math.ceil(count / eta))


def candidate_config(cfg: ExperimentConfig, lr: float, steps: int, run_dir: Path) -> ExperimentConfig:
    """The point's config trained at `lr` for `steps` steps in `run_dir`, evaluated at its end."""
    train = dataclasses.replace(cfg.train, lr=lr, steps=steps, run_dir=str(run_dir),
                                eval_every=min(cfg.train.eval_every, steps),
                                checkpoint_every=min(cfg.train.checkpoint_every, steps))
    tracking = dataclasses.replace(cfg.tracking, tags=dict(cfg.tracking.tags) | {"kind": "lr_search",
                                                                                 "lr": f"{lr:g}"})
    return dataclasses.replace(cfg, train=train, tracking=tracking)


def search_lrs(study: StudyConfig, trials: dict[str, tuple[TrialSpec, ExperimentConfig]], folder: Path, fit: FitFn,
               log=print) -> dict[str, dict]:
    """Each point's LR (`point name -> {"lr", "rungs"}`), from `lr_search.json` when it holds every
    point for this search (rates, budget, eta), else searched (finished candidates are reused). `trials`
    maps each trial name to its spec and its config (pointed at the study's MLflow store); a point's first
    trial stands for it."""
    search = study.lr_search
    points: dict[str, ExperimentConfig] = {}
    for spec, cfg in trials.values():
        points.setdefault(spec.point_name, cfg)
    path = folder / LR_SEARCH_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        if (saved.get("lrs"), saved.get("budget"), saved.get("eta")) == (list(search.lrs), search.budget, search.eta) \
                and set(saved["points"]) == set(points):
            return saved["points"]
    alive = {name: list(search.lrs) for name in points}
    rungs: dict[str, list[dict]] = {name: [] for name in points}
    rung = 0
    while True:
        configs, owner = {}, {}
        for name, lrs in alive.items():
            cfg = points[name]
            steps = rung_steps(cfg.train.steps, search.budget, search.eta, rung)
            for lr in lrs:
                candidate = f"{name}-lr={lr:g}-steps={steps}"
                configs[candidate] = candidate_config(cfg, lr, steps, folder / "lr_search" / candidate)
                owner[candidate] = (name, lr, steps)
        log(f"lr search, rung {rung}: {len(configs)} runs over {len(alive)} points")
        finished, failed = fit(configs, f"lr_search-rung{rung}")
        losses: dict[str, dict[float, float]] = {name: {} for name in alive}
        for candidate, (name, lr, _) in owner.items():
            losses[name][lr] = _final_val_loss(Path(configs[candidate].train.run_dir)) if candidate in finished \
                else math.inf
        done = True
        for name, by_lr in losses.items():
            mine = [c for c, o in owner.items() if o[0] == name]
            steps = owner[mine[0]][2]
            rungs[name].append({"steps": steps, "val_loss": {f"{lr:g}": v if math.isfinite(v) else None
                                                          for lr, v in by_lr.items()},
                                "failed": sorted(f"{owner[c][1]:g}" for c in mine if c in failed)})
            ranked = sorted(by_lr, key=lambda lr: (by_lr[lr], lr))
            keep = survivors(len(ranked), steps, points[name].train.steps, search.eta)
            alive[name] = ranked[:keep]
            done &= keep == 1
        rung += 1
        if done:
            break
    chosen = {}
    for name, (lr,) in alive.items():
        if rungs[name][-1]["val_loss"][f"{lr:g}"] is None:
            raise RuntimeError(f"lr search: every learning rate of point {name} failed ({search.lrs}); see the "
                               f"runs under {folder / 'lr_search'}")
        chosen[name] = {"lr": lr, "rungs": rungs[name]}
    write_atomic(path, json.dumps({"lrs": list(search.lrs), "budget": search.budget, "eta": search.eta,
                                   "points": chosen}, indent=1))
    return chosen


def _final_val_loss(run_dir: Path) -> float:
    loss = finished_metrics(run_dir)["val_loss"]
    return loss if math.isfinite(loss) else math.inf
