"""Search over circuit-pruning settings for one (model, task), through Ray Tune.

The paper tuned every (model, task) with a Bayesian search (CARBS, 32 iterations x 8 runs, METHOD.md
4). This runs `budget` trials of `prune_task`: the first at the paper's search centres (the config's
prune settings), the rest sampled around them (log-uniform, a decade each way; seeded), and keeps
the circuit with the fewest edges among those that reach the target.

Each trial prunes on a GPU of its own when the search runs on CUDA: given by the caller, or chosen when
the Ray cluster has GPUs (the driver of `circuitscale prune` on a cluster runs on the CPU-only head, so
its own `torch.cuda.is_available()` says nothing about where the trials run).
"""

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import ray
from ray import tune

from infra.storage import is_uri
from pipeline.circuits import load_for_pruning
from pipeline.config import ExperimentConfig
from pipeline.data import Dataset
from pipeline.prune import prune_task
from pipeline.records import CircuitRecord
from pipeline.tasks import TASKS, encode_task
from pipeline.tokenizer import eot_id
from sweeps.ray_session import init_ray

SEARCHED = ("k_coef", "lr", "temperature", "weight_decay")
RECORD = "circuit.json"


@dataclass(frozen=True)
class SearchResult:
    task: str
    best: CircuitRecord | None  # None: no trial reached the target
    best_settings: dict[str, float]
    trials: list[dict]  # settings and outcome of every trial


def search_space(cfg: ExperimentConfig) -> dict:
    centres = {key: getattr(cfg.prune, key) for key in SEARCHED}
    return {key: tune.loguniform(value / 10, value * 10) for key, value in centres.items()}


def search_device(device: str | None) -> str:
    """`device` ("cpu" or "cuda") when given; else "cuda" when the Ray cluster has a GPU now. A cluster
    whose GPU nodes are all scaled away shows none, so a caller that wants GPUs there says "cuda"."""
    if device is None:
        return "cuda" if ray.cluster_resources().get("GPU", 0) >= 1 else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device: must be cpu or cuda for a pruning search, got {device!r}")
    return device


def trial_resources(device: str) -> dict[str, float]:
    """What one pruning trial asks Ray for: a CPU, and on CUDA a GPU of its own (Ray then sets
    CUDA_VISIBLE_DEVICES to it, so "cuda" in the trial is that GPU)."""
    return {"cpu": 1, "gpu": 1} if device == "cuda" else {"cpu": 1}


def _trial(config: dict) -> None:
    cfg, device = config["cfg"], config["device"]
    prune_cfg = replace(cfg.prune, **{k: config[k] for k in SEARCHED})
    dataset = Dataset.open(config["data"])  # built by the caller: a search trial only opens it
    model, tokenizer, means = load_for_pruning(Path(config["run_dir"]), cfg, dataset, device)
    task = TASKS[config["task"]]
    train = encode_task(task, tokenizer, split="train", pairs=prune_cfg.pairs, seed=cfg.train.seed)
    test = encode_task(task, tokenizer, split="test", pairs=prune_cfg.pairs, seed=cfg.train.seed)
    record = prune_task(model, train, test, means, prune_cfg, pad_id=eot_id(tokenizer), device=device,
                        seed=cfg.train.seed)
    found = record.status == "found"
    record.save(Path(tune.get_context().get_trial_dir()) / RECORD)  # the full record beside the trial
    tune.report({"edges": float(record.edges) if found else math.inf, "found": found})


def search_prune(run_dir: Path, cfg: ExperimentConfig, task: str, budget: int, *, storage: Path,
                 data: Path, device: str | None = None) -> SearchResult:
    """Run `budget` pruning trials for `task` on the trained model in `run_dir` (a local Ray by
    default, the cluster when RAY_ADDRESS is set), on `device` (search_device: None picks cuda when the
    cluster has GPUs)."""
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # no TensorBoard/CSV per trial
    init_ray(verbose=0)
    device = search_device(device)
    centres = {key: getattr(cfg.prune, key) for key in SEARCHED}
    space = search_space(cfg) | {"cfg": cfg, "run_dir": str(run_dir.resolve()), "task": task,
                                 "data": data if is_uri(str(data)) else str(Path(data).resolve()), "device": device}
    tuner = tune.Tuner(
        tune.with_resources(_trial, trial_resources(device)),
        param_space=space,
        tune_config=tune.TuneConfig(
            num_samples=budget,
            search_alg=tune.search.BasicVariantGenerator(points_to_evaluate=[centres], random_state=cfg.train.seed),
        ),
        run_config=tune.RunConfig(name=f"prune-{task}", storage_path=str(storage.resolve()), verbose=0),
    )
    grid = tuner.fit()
    trials, done = [], []
    for result in grid:
        path = Path(result.path) / RECORD
        if result.error is not None or not path.is_file():
            continue
        settings = {key: result.config[key] for key in SEARCHED}
        record = CircuitRecord.load(path)
        trials.append({**settings, "status": record.status, "edges": record.edges})
        done.append((record, settings))
    best, best_settings = best_of(done)
    return SearchResult(task=task, best=best, best_settings=best_settings, trials=trials)


def best_of(done: list[tuple[CircuitRecord, dict]]) -> tuple[CircuitRecord | None, dict]:
    """The smallest found circuit (first on ties) and its settings; else a `direct` record (the empty circuit
    reaches the target whatever the settings: no circuit to search for); else (None, {})."""
    found = [(r, s) for r, s in done if r.status == "found"]
    if found:
        return min(found, key=lambda rs: rs[0].edges)
    direct = [(r, s) for r, s in done if r.status == "direct"]
    return direct[0] if direct else (None, {})
