"""One trial: data (built or reused) -> training (resumed if a checkpoint exists) -> export, with a
tracked run that always ends FINISHED, FAILED (reason tagged) or KILLED."""

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.multiprocessing import ProcessRaisedException
from tqdm.auto import tqdm

from infra.distributed import spawn
from infra.tracking import RunTracker
from model.config import param_counts
from model.gpt import GPT
from pipeline.config import ExperimentConfig, config_to_yaml, save_config
from pipeline.data import Dataset, build_data
from pipeline.errors import UserError
from pipeline.evaluate import task_metrics
from pipeline.export import export_model
from pipeline.loader import TokenLoader
from pipeline.prune import geometric_mean_edges, node_means, overlap, prune_task
from pipeline.records import TRIAL_FILE, CircuitRecord, TrialRecord
from pipeline.tasks import EncodedTask, encode_suite
from pipeline.train import NonFiniteLoss, NullTracker, train
from pipeline.viewer import node_examples, padded, render

SUMMARY = "final_metrics.json"


@dataclass(frozen=True)
class TrialResult:
    run_dir: Path
    export_dir: Path
    mlflow_uri: str
    mlflow_run_id: str
    resumed_from: int
    final: dict[str, float]


def run_dir_for(cfg: ExperimentConfig) -> Path:
    """`train.run_dir`, or runs/train/<hash of the resolved config> so a rerun finds its checkpoints."""
    if cfg.train.run_dir:
        return Path(cfg.train.run_dir).expanduser()
    anonymous = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, run_dir=None))
    return Path("runs/train") / hashlib.sha256(config_to_yaml(anonymous).encode()).hexdigest()[:12]


def flat_params(cfg: ExperimentConfig) -> dict[str, object]:
    """The resolved config as dotted keys, for MLflow params."""
    out: dict[str, object] = {}

    def walk(prefix: str, value: object) -> None:
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                walk(f"{prefix}{f.name}.", getattr(value, f.name))
        else:
            out[prefix[:-1]] = value

    walk("", cfg)
    return out


def run_trial(
    cfg: ExperimentConfig, *, device: str = "cpu", progress: bool = True, log: Callable[[str], None] = print
) -> TrialResult:
    """The trial in this process (one worker) or in `trial.workers` spawned ones; this process owns
    the run's status, rank 0 of the workers its metrics and exports."""
    dataset = build_data(cfg.data, config_yaml=config_to_yaml(cfg), progress=progress).dataset
    run_dir = run_dir_for(cfg)
    config_path, tracker = _open_run(cfg, run_dir)
    log(f"run folder {run_dir.resolve()}; MLflow run {tracker.run_id} at {tracker.uri}"
        + (" (resumed)" if tracker.resumed else ""))
    try:
        if cfg.trial.workers == 1:
            train_worker(cfg, dataset.folder, run_dir, device, progress, tracker)
        else:
            spawn(train_worker, cfg.trial.workers, cfg, dataset.folder, run_dir, device, progress, None)
        summary = _log_training(cfg, run_dir, config_path, tracker)
    except NonFiniteLoss as err:
        tracker.finish("FAILED", str(err))
        raise
    except KeyboardInterrupt:
        tracker.finish("KILLED", "interrupted")
        raise
    except ProcessRaisedException as err:  # a spawned worker failed: pass on what it raised
        message = str(err).strip().splitlines()[-1]
        tracker.finish("FAILED", message)
        if "NonFiniteLoss" in message:
            raise NonFiniteLoss(message.split(":", 1)[-1].strip()) from None
        raise
    except BaseException as err:
        tracker.finish("FAILED", f"{type(err).__name__}: {err}")
        raise
    tracker.finish("FINISHED")
    return TrialResult(run_dir=run_dir, export_dir=run_dir / "export", mlflow_uri=tracker.uri,
                       mlflow_run_id=tracker.run_id, resumed_from=summary["resumed_from"], final=summary["final"])


def _open_run(cfg: ExperimentConfig, run_dir: Path) -> tuple[Path, RunTracker]:
    """The run folder with its resolved config, and its MLflow run (continued if it exists)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = save_config(cfg, run_dir)
    return config_path, RunTracker(cfg.tracking, run_dir, run_name=run_dir.name, params=flat_params(cfg))


def _log_training(cfg: ExperimentConfig, run_dir: Path, config_path: Path, tracker: RunTracker) -> dict:
    """After training: the summary rank 0 wrote, its final metrics and files logged to the run."""
    summary = json.loads((run_dir / SUMMARY).read_text())
    tracker.log_metrics(summary["final"], cfg.train.steps)
    for artifact in (config_path, run_dir / SUMMARY):
        tracker.log_artifact(artifact)
    return summary


def run_launched_trial(cfg: ExperimentConfig, *, device: str = "cpu", prune: bool = True,
                       log: Callable[[str], None] = print) -> dict[str, float] | None:
    """The trial on one rank that a launcher started (Ray Train's TorchTrainer, torchrun; RANK and
    WORLD_SIZE set): every rank trains; rank 0 owns the MLflow run and its status, exports, and then
    prunes the tasks. Returns rank 0's final metrics (training, tasks, circuits, seconds), None elsewhere.
    A rerun resumes from the run folder's checkpoints and continues the same MLflow run."""
    run_dir = run_dir_for(cfg)
    lead = int(os.environ.get("RANK", "0")) == 0
    if (run_dir / TRIAL_FILE).is_file():  # finished before (its record is written last): not rerun
        return finished_metrics(run_dir) if lead else None
    dataset = build_data(cfg.data, progress=False).dataset  # built by the study before any trial
    if not lead:
        train_worker(cfg, dataset.folder, run_dir, device, False, NullTracker())
        return None
    config_path, tracker = _open_run(cfg, run_dir)
    try:
        tick = time.perf_counter()
        train_worker(cfg, dataset.folder, run_dir, device, False, tracker)
        final = dict(_log_training(cfg, run_dir, config_path, tracker)["final"])
        final["train_seconds"] = time.perf_counter() - tick
        tracker.log_metrics({"train_seconds": final["train_seconds"]}, cfg.train.steps)
        records, overlaps, tick = {}, {}, time.perf_counter()
        if prune:
            result = prune_run(run_dir, cfg, device=device, progress=False, log=log, tracker=tracker,
                               dataset=dataset)
            records, overlaps = result.records, result.overlap
        final["prune_seconds"] = time.perf_counter() - tick
        trial = trial_record(cfg, run_dir, final, records, overlaps,
                             vocab_size=dataset.manifest["tokenizer"]["vocab_size"])
        staging = run_dir / "staging"  # the record lands in run_dir only after the run is FINISHED
        staging.mkdir(exist_ok=True)
        trial.save(staging / TRIAL_FILE)
        tracker.log_artifact(staging / TRIAL_FILE)
        tracker.log_metrics(_trial_metrics(trial), cfg.train.steps)
    except BaseException as err:
        tracker.finish("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED", f"{type(err).__name__}: {err}")
        raise
    tracker.finish("FINISHED")
    (staging / TRIAL_FILE).replace(run_dir / TRIAL_FILE)
    staging.rmdir()
    return finished_metrics(run_dir)


def _trial_metrics(trial: TrialRecord) -> dict[str, float]:
    out = {"train_seconds": trial.train_seconds, "prune_seconds": trial.prune_seconds,
           "circuits_found": float(trial.circuits_found)}
    if trial.circuit_edges_geomean is not None:
        out["circuit_edges_geomean"] = trial.circuit_edges_geomean
    return out


def finished_metrics(run_dir: Path) -> dict[str, float]:
    """A finished trial's final metrics: training's summary and the trial record's figures."""
    summary = json.loads((run_dir / SUMMARY).read_text())
    return dict(summary["final"]) | _trial_metrics(TrialRecord.load(run_dir / TRIAL_FILE))


def trial_record(cfg: ExperimentConfig, run_dir: Path, final: dict, records: dict[str, CircuitRecord], overlaps: dict,
                 *, vocab_size: int) -> TrialRecord:
    """The trial's record for analysis (pipeline/records.py)."""
    pairs = [v for a, row in overlaps.get("nodes", {}).items() for b, v in row.items() if a < b]
    found = [r for r in records.values() if r.status == "found"]
    keys = ("status", "edges", "unpruned_loss", "target_loss", "sufficiency_loss", "necessity_loss", "target_curve")
    return TrialRecord(
        trial=run_dir.name, study=cfg.tracking.experiment, d_model=cfg.model.d_model, num_layers=cfg.model.num_layers,
        density=cfg.sparsity.density, params_total=param_counts(cfg.model, vocab_size)["total"],
        l0_total=float(final.get("l0_total", math.nan)), val_loss=float(final["val_loss"]),
        residual_kurtosis=float(final.get("residual_kurtosis", math.nan)),
        task_accuracy_mean=float(final.get("task_accuracy_mean", math.nan)),
        circuit_edges_geomean=geometric_mean_edges(records), circuits_found=len(found), circuits_tried=len(records),
        overlap_nodes_mean=sum(pairs) / len(pairs) if pairs else None,
        train_seconds=float(final.get("train_seconds", 0.0)), prune_seconds=float(final.get("prune_seconds", 0.0)),
        circuits={name: {k: getattr(r, k) for k in keys} | {"nodes": len(r.nodes)} for name, r in records.items()},
    )


def train_worker(
    cfg: ExperimentConfig, dataset_folder: Path, run_dir: Path, device: str, progress: bool,
    tracker: RunTracker | None,
) -> None:
    """One training process (a rank of the trial). Rank 0 logs metrics, exports, writes the summary."""
    lead = int(os.environ.get("RANK", "0")) == 0
    if tracker is None:  # a spawned worker: rank 0 continues the run its parent opened
        tracker = RunTracker(cfg.tracking, run_dir, run_name=run_dir.name, params={}) if lead else NullTracker()
    dataset = Dataset.open(dataset_folder)
    result = train(cfg, dataset, run_dir, tracker, device=device, progress=progress,
                   log=print if lead else (lambda _: None))
    if result.rank != 0:
        return
    model = GPT(cfg.model, result.model.vocab_size)  # a plain copy for export, whatever the sharding
    model.load_state_dict({k[len("model/"):]: v for k, v in result.state.items() if k.startswith("model/")})
    export_model(model, config_to_yaml(cfg), dataset, run_dir / "export")
    final = result.final | task_metrics(model, dataset.tokenizer(), list(cfg.prune.tasks))
    summary = {"final": final, "resumed_from": result.resumed_from}
    (run_dir / SUMMARY).write_text(json.dumps(summary, indent=1, sort_keys=True))


@dataclass(frozen=True)
class PruneResult:
    folder: Path
    records: dict[str, CircuitRecord]
    failures: dict[str, str]  # tasks the tokenizer cannot express
    overlap: dict
    edges_geomean: float | None


def prune_run(run_dir: Path, cfg: ExperimentConfig, *, device: str = "cpu", progress: bool = True,
              log: Callable[[str], None] = print,
              search: Callable[[str], CircuitRecord | None] | None = None,
              tracker: RunTracker | None = None, dataset: Dataset | None = None) -> PruneResult:
    """Prune every task (or prune.tasks) in the trained model of `run_dir`; records, viewer pages and
    the overlap matrix go to run_dir/circuits/ and to the run's MLflow run. `search(task)`, when given,
    returns the best circuit of a settings search (None if no setting reached the target). With
    `tracker` (the caller's open run), the caller owns the run's final status; `dataset`, when the
    caller already has it, saves building (hashing, generating) the corpus again."""
    dataset = dataset or build_data(cfg.data, progress=False).dataset
    model, tokenizer, means = load_for_pruning(run_dir, cfg, device, dataset)
    data_batches = viewer_batches(cfg, dataset)
    train_tasks, failures = encode_suite(tokenizer, list(cfg.prune.tasks), split="train", pairs=cfg.prune.pairs)
    test_tasks, _ = encode_suite(tokenizer, list(train_tasks), split="test", pairs=cfg.prune.pairs)
    for message in failures.values():
        log(message)
    folder = run_dir / "circuits"
    folder.mkdir(exist_ok=True)
    owned = tracker is None
    if tracker is None:
        tracker = RunTracker(cfg.tracking, run_dir, run_name=run_dir.name, params={})
    records: dict[str, CircuitRecord] = {}
    pad = tokenizer.get_vocab_size() - 1
    try:
        for name in tqdm(train_tasks, desc="pruning tasks", disable=not progress):
            record = search(name) if search is not None else None
            if record is None:
                record = prune_task(model, train_tasks[name], test_tasks[name], means, cfg.prune, pad_id=pad,
                                    device=device, seed=cfg.train.seed, progress=progress)
            record.save(folder / f"{name}.json")
            write_viewer(folder / f"{name}.html", record, model, tokenizer, test_tasks[name], data_batches,
                         model_name=f"{run_dir.name} (d_model {cfg.model.d_model}, density {cfg.sparsity.density:g})",
                         device=device)
            records[name] = record
            tracker.log_metrics(_circuit_metrics(record), cfg.train.steps)
        overlaps = overlap(model, records)
        geomean = geometric_mean_edges(records)
        (folder / "overlap.json").write_text(json.dumps(overlaps, indent=1))
        if geomean is not None:
            tracker.log_metrics({"circuit_edges_geomean": geomean}, cfg.train.steps)
        tracker.log_artifacts(folder, "circuits")
    except BaseException as err:
        if owned:
            tracker.finish("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED", f"pruning: {err}")
        raise
    if owned:
        tracker.finish("FINISHED")
    return PruneResult(folder, records, failures, overlaps, geomean)


def viewer_batches(cfg: ExperimentConfig, dataset: Dataset) -> list[torch.Tensor]:
    """The held-out pretraining batches the viewer searches for each node's top-activating contexts."""
    loader = TokenLoader(dataset, split="val", batch_size=cfg.train.batch_size,
                         context_length=cfg.model.context_length, seed=cfg.train.seed)
    return [loader.batch(i)[:, :-1] for i in range(cfg.prune.viewer_batches)]


def write_viewer(path: Path, record: CircuitRecord, model, tokenizer, task: EncodedTask,
                 data_batches: list[torch.Tensor], *, model_name: str, device: str = "cpu") -> None:
    """The circuit's HTML page (pipeline/viewer.py), with examples from the task and from pretraining data."""
    nodes = [(int(n[0]), str(n[1]), int(n[2])) for n in record.nodes]
    prompts = padded(task.prompts, model.cfg.context_length)
    task_examples = node_examples(model, tokenizer, nodes, prompts, device=device)
    data_examples = node_examples(model, tokenizer, nodes, data_batches, device=device)
    candidates = {int(t): tokenizer.decode([int(t)]) for t in task.candidates.flatten().unique().tolist()}
    page = render(record, model_name=model_name, candidate_tokens=candidates,
                  task_examples=task_examples, data_examples=data_examples)
    path.write_text(page, encoding="utf-8")


def load_for_pruning(run_dir: Path, cfg: ExperimentConfig, device: str = "cpu", dataset: Dataset | None = None):
    """The run's trained model (eval mode, frozen), its tokenizer, and the node means pruning ablates to."""
    weights = run_dir / "export" / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"{run_dir} holds no trained model ({weights} is missing); run `circuitscale train` first")
    dataset = dataset or build_data(cfg.data, progress=False).dataset
    tokenizer = dataset.tokenizer()
    model = GPT(cfg.model, tokenizer.get_vocab_size(), device=device)
    model.load_state_dict(load_file(str(weights)))
    model.eval()
    loader = TokenLoader(dataset, split="train", batch_size=cfg.train.batch_size,
                         context_length=cfg.model.context_length, seed=cfg.train.seed)
    means = node_means(model, loader, cfg.prune.mean_batches, cfg.prune.mean_pooling, device)
    return model, tokenizer, means


def _circuit_metrics(record: CircuitRecord) -> dict[str, float]:
    prefix = f"circuit/{record.task}"
    metrics = {f"{prefix}/unpruned_loss": record.unpruned_loss, f"{prefix}/seconds": record.seconds}
    if record.status == "found":
        metrics |= {f"{prefix}/nodes": float(len(record.nodes)), f"{prefix}/edges": float(record.edges),
                    f"{prefix}/sufficiency_loss": record.sufficiency_loss,
                    f"{prefix}/necessity_loss": record.necessity_loss, f"{prefix}/random_loss": record.random_loss}
        if record.attribution_edges is not None:
            metrics[f"{prefix}/attribution_edges"] = float(record.attribution_edges)
    return metrics
