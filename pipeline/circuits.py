"""The pruning stage of a trial: every task of a trained run pruned to a circuit (pipeline/prune.py), its
records and viewer pages under `run_dir/circuits/`, the task x task overlap, and metrics to the run.

`prune_run` is called by the trial (rank 0, after training) and by `circuitscale prune` on a finished
run; either way the caller owns the run's MLflow status and passes its open tracker.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from infra.tracking import RunTracker
from model.gpt import GPT
from pipeline.config import ExperimentConfig, token_loader
from pipeline.data import Dataset
from pipeline.errors import UserError
from pipeline.prune import node_means, overlap, prune_task
from pipeline.records import CircuitRecord, geometric_mean_edges
from pipeline.tasks import EncodedTask, encode_suite
from pipeline.tokenizer import eot_id
from pipeline.viewer import node_examples, padded, render

CIRCUITS_DIR = "circuits"


@dataclass(frozen=True)
class PruneResult:
    folder: Path
    records: dict[str, CircuitRecord]
    failures: dict[str, str]  # tasks the tokenizer cannot express
    overlap: dict
    edges_geomean: float | None


def prune_run(run_dir: Path, cfg: ExperimentConfig, dataset: Dataset, tracker: RunTracker, *, device: str = "cpu",
              progress: bool = True, log: Callable[[str], None] = print,
              search: Callable[[str], CircuitRecord | None] | None = None) -> PruneResult:
    """Prune every task (or prune.tasks) in the trained model of `run_dir`; records, viewer pages and
    the overlap matrix go to run_dir/circuits/ and to `tracker`. `search(task)`, when given, returns the
    best circuit of a settings search (None if no setting reached the target)."""
    model, tokenizer, means = load_for_pruning(run_dir, cfg, dataset, device)
    data_batches = viewer_batches(cfg, dataset)
    train_tasks, failures = encode_suite(tokenizer, list(cfg.prune.tasks), split="train", pairs=cfg.prune.pairs)
    test_tasks, _ = encode_suite(tokenizer, list(train_tasks), split="test", pairs=cfg.prune.pairs)
    for message in failures.values():
        log(message)
    folder = run_dir / CIRCUITS_DIR
    folder.mkdir(exist_ok=True)
    records: dict[str, CircuitRecord] = {}
    for name in tqdm(train_tasks, desc="pruning tasks", disable=not progress):
        record = search(name) if search is not None else None
        if record is None:
            record = prune_task(model, train_tasks[name], test_tasks[name], means, cfg.prune,
                                pad_id=eot_id(tokenizer), device=device, seed=cfg.train.seed, progress=progress)
        record.save(folder / f"{name}.json")
        write_viewer(folder / f"{name}.html", record, model, tokenizer, test_tasks[name], data_batches,
                     model_name=f"{run_dir.name} (d_model {cfg.model.d_model}, density {cfg.sparsity.density:g})",
                     device=device)
        records[name] = record
        tracker.log_metrics(circuit_metrics(record), cfg.train.steps)
    overlaps = overlap(model, records)
    geomean = geometric_mean_edges(records.values())
    (folder / "overlap.json").write_text(json.dumps(overlaps, indent=1))
    if geomean is not None:
        tracker.log_metrics({"circuit_edges_geomean": geomean}, cfg.train.steps)
    tracker.log_artifacts(folder, CIRCUITS_DIR)
    return PruneResult(folder, records, failures, overlaps, geomean)


def load_for_pruning(run_dir: Path, cfg: ExperimentConfig, dataset: Dataset, device: str = "cpu"):
    """The run's trained model (eval mode, frozen), its tokenizer, and the node means pruning ablates to."""
    tokenizer = dataset.tokenizer()
    model = load_model(run_dir, cfg, tokenizer.get_vocab_size(), device)
    loader = token_loader(cfg, dataset, "train")
    means = node_means(model, loader, cfg.prune.mean_batches, cfg.prune.mean_pooling, device)
    return model, tokenizer, means


def load_model(run_dir: Path, cfg: ExperimentConfig, vocab_size: int, device: str = "cpu") -> GPT:
    """The run's exported model (eval mode); a UserError if the run holds none."""
    model = GPT(cfg.model, vocab_size, device=device)
    model.load_state_dict(load_file(str(require_trained(run_dir)), device=str(device)))
    return model.eval()


def require_trained(run_dir: Path) -> Path:
    """The run's exported weights; a UserError if the run holds no trained model."""
    weights = run_dir / "export" / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"{run_dir} holds no trained model ({weights} is missing); run `circuitscale train` first")
    return weights


def viewer_batches(cfg: ExperimentConfig, dataset: Dataset) -> list[torch.Tensor]:
    """The held-out pretraining batches the viewer searches for each node's top-activating contexts."""
    loader = token_loader(cfg, dataset, "val")
    return [loader.batch(i)[:, :-1] for i in range(cfg.prune.viewer_batches)]


def write_viewer(path: Path, record: CircuitRecord, model, tokenizer, task: EncodedTask,
                 data_batches: list[torch.Tensor], *, model_name: str, device: str = "cpu",
                 bridge: dict | None = None) -> None:
    """The circuit's HTML page (pipeline/viewer.py), with examples from the task and from pretraining data."""
    nodes = [n.key for n in record.nodes]
    prompts = padded(task.prompts, model.cfg.context_length)
    task_examples = node_examples(model, tokenizer, nodes, prompts, device=device)
    data_examples = node_examples(model, tokenizer, nodes, data_batches, device=device)
    candidates = {int(t): tokenizer.decode([int(t)]) for t in task.candidates.flatten().unique().tolist()}
    page = render(record, model_name=model_name, candidate_tokens=candidates,
                  task_examples=task_examples, data_examples=data_examples, bridge=bridge)
    path.write_text(page, encoding="utf-8")


def circuit_metrics(record: CircuitRecord) -> dict[str, float]:
    """A circuit's figures as MLflow metrics, `circuit/<task>/<figure>`."""
    prefix = f"circuit/{record.task}"
    metrics = {f"{prefix}/unpruned_loss": record.unpruned_loss, f"{prefix}/seconds": record.seconds}
    if record.empty_loss is not None:
        metrics[f"{prefix}/empty_loss"] = record.empty_loss
    if record.status == "found":
        metrics |= {f"{prefix}/nodes": float(len(record.nodes)), f"{prefix}/edges": float(record.edges),
                    f"{prefix}/sufficiency_loss": record.sufficiency_loss,
                    f"{prefix}/necessity_loss": record.necessity_loss, f"{prefix}/random_loss": record.random_loss}
        if record.attribution_edges is not None:
            metrics[f"{prefix}/attribution_edges"] = float(record.attribution_edges)
    return metrics
