"""One trial: data -> training (resumed from the newest good checkpoint) -> export -> task scores ->
(optionally) the pruning stage -> the trial record, with an MLflow run that always ends FINISHED,
FAILED (reason tagged) or KILLED.

There is one path. `trial_rank` is what every rank of a trial runs, however the rank was started:
in-process (`circuitscale train`, one worker), spawned by `run_trial` (`circuitscale train` with
`trial.workers` > 1), or by a launcher (Ray Train's worker loop in sweeps/study.py, torchrun). Every
rank trains; rank 0 owns the run (its status, metrics, exports, pruning and record).

  run_trial(cfg)                        # circuitscale train
    build_data(cfg.data)                # once, before any rank starts
    trial_rank(cfg, ...)  | spawn(trial_rank, workers)
  _worker_loop(config)                  # sweeps/study.py, one per Ray Train worker
    trial_rank(cfg, ...)

  trial_rank: finished? -> build_training -> [rank 0: tracked_run(...)] -> train -> export -> task_metrics
              -> prune_run (pipeline/circuits.py) -> trial record (written last, after the run is FINISHED)
"""

import dataclasses
import functools
import hashlib
import json
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from infra.checkpoint import write_atomic
from infra.distributed import init_process_group, spawn
from infra.tracking import RUN_FILE, NullTracker, tracked_run
from model.config import param_counts
from model.gpt import GPT
from model.sparsity import sparse_tensors
from pipeline.circuits import prune_run
from pipeline.config import CONFIG_FILENAME, ExperimentConfig, config_to_yaml, engine_kind, save_config, token_loader
from pipeline.data import Dataset, build_data
from pipeline.evaluate import task_metrics
from pipeline.export import export_model
from pipeline.records import TRIAL_FILE, CircuitRecord, TrialRecord, geometric_mean_edges
from pipeline.shards import map_shard
from pipeline.train import TrainingSetup, bigram_log_probs, make_engine, train

SUMMARY = "final_metrics.json"


@dataclass(frozen=True)
class TrialResult:
    run_dir: Path
    export_dir: Path
    mlflow_uri: str
    mlflow_run_id: str
    resumed_from: int
    final: dict[str, float]
    reused: bool = False  # the trial was finished before: nothing ran

    @classmethod
    def read(cls, run_dir: Path, *, reused: bool = False) -> "TrialResult":
        """A finished trial's result, from the files rank 0 wrote in its run folder."""
        run = json.loads((run_dir / RUN_FILE).read_text())
        summary = json.loads((run_dir / SUMMARY).read_text())
        return cls(run_dir=run_dir, export_dir=run_dir / "export", mlflow_uri=run["uri"], mlflow_run_id=run["run_id"],
                   resumed_from=summary["resumed_from"], final=summary["final"], reused=reused)


def run_dir_for(cfg: ExperimentConfig) -> Path:
    """`train.run_dir`, or runs/train/<hash of the resolved config> so a rerun finds its checkpoints."""
    if cfg.train.run_dir:
        return Path(cfg.train.run_dir).expanduser()
    return Path("runs/train") / config_digest(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train,
                                                                                                  run_dir=None)))


def config_digest(cfg: ExperimentConfig) -> str:
    """12 hex digits of the resolved config's hash: the default folder name of a run (trial or bridge)."""
    return hashlib.sha256(config_to_yaml(cfg).encode()).hexdigest()[:12]


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


def run_trial(cfg: ExperimentConfig, *, device: str = "cpu", progress: bool = True, prune: bool = False,
              log: Callable[[str], None] = print) -> TrialResult:
    """The trial from this process (`circuitscale train`): nothing when it is finished already (`reused`),
    else the data built once, then `trial_rank` here (one worker) or in `trial.workers` spawned processes.
    Spawned ranks print when `log` is print and stay silent otherwise (a logger does not cross processes).
    A failed rank's own exception is raised here."""
    run_dir = run_dir_for(cfg)
    if finished(run_dir, cfg):
        return TrialResult.read(run_dir, reused=True)
    dataset = build_data(cfg.data, config_yaml=config_to_yaml(cfg), progress=progress).dataset
    rank = functools.partial(trial_rank, cfg, device=device, progress=progress, prune=prune, data=dataset.location)
    if cfg.trial.workers == 1:
        rank(log=log)
    else:
        # this process holds the run as well, and has the last word on its status: a rank that dies without
        # a word, or one stopped because another failed, still leaves the run FAILED with the real cause
        with tracked_run(cfg.tracking, run_dir, params=flat_params(cfg)):
            spawn(functools.partial(rank, log=print if log is print else silent), cfg.trial.workers)
    return TrialResult.read(run_dir)


def trial_rank(cfg: ExperimentConfig, *, device: str = "cpu", progress: bool = False, prune: bool = True,
               data: str | Path | None = None, log: Callable[[str], None] = print,
               on_checkpoint: Callable[[], object] | None = None) -> dict[str, float] | None:
    """One rank of the trial (RANK / WORLD_SIZE from the launcher, or a world of one). Every rank trains;
    rank 0 owns the MLflow run and its status, exports, scores the tasks, prunes (with `prune`) and writes
    the trial record last. Returns the final metrics on rank 0 (and on every rank of a finished trial),
    None on other ranks. A trial whose record exists for this very config is finished and is not rerun;
    otherwise it resumes from its checkpoints and continues its MLflow run."""
    run_dir = run_dir_for(cfg)
    if finished(run_dir, cfg):
        return finished_metrics(run_dir)
    tick = time.perf_counter()
    # the rank of this process in the trial's group (joined here under DeepSpeed), so that rank 0 holds the
    # run from the start: a failure while building the model or the engine is recorded too
    rank = init_process_group(cfg.deepspeed.backend)[0] if engine_kind(cfg) == "deepspeed" else 0
    lead = rank == 0
    say = log if lead else silent
    run = tracked_run(cfg.tracking, run_dir, params=flat_params(cfg)) if lead else nullcontext(NullTracker())
    with run as tracker:
        if lead:
            say(f"run folder {run_dir.resolve()}; MLflow run {tracker.run_id} at {tracker.uri}")
            (run_dir / TRIAL_FILE).unlink(missing_ok=True)  # a record of another config's run
            config_path = save_config(cfg, run_dir)
        dataset = Dataset.open(data) if data is not None else build_data(cfg.data, progress=False).dataset
        setup = build_training(cfg, dataset, device)
        result = train(setup, cfg.train, cfg.sparsity, run_dir, tracker,
                       checkpoint_meta={"config": config_to_yaml(cfg)}, device=device, progress=progress and lead,
                       log=say, on_checkpoint=on_checkpoint)
        if not lead:
            return None
        model = GPT(cfg.model, setup.model.vocab_size)  # a plain copy for export, whatever the sharding
        model.load_state_dict({k[len("model/"):]: v for k, v in result.state.items() if k.startswith("model/")})
        export_model(model, config_to_yaml(cfg), dataset, run_dir / "export")
        final = result.final | task_metrics(model, dataset.tokenizer(), list(cfg.prune.tasks), log=say)
        write_atomic(run_dir / SUMMARY, json.dumps({"final": final, "resumed_from": result.resumed_from}, indent=1,
                                                   sort_keys=True))
        final["train_seconds"] = time.perf_counter() - tick
        tracker.log_metrics(final, cfg.train.steps)
        for artifact in (config_path, run_dir / SUMMARY):
            tracker.log_artifact(artifact)
        records, overlaps, tick = {}, {}, time.perf_counter()
        if prune:
            pruned = prune_run(run_dir, cfg, dataset, tracker, device=device, progress=False, log=say)
            records, overlaps = pruned.records, pruned.overlap
        final["prune_seconds"] = time.perf_counter() - tick
        trial = trial_record(cfg, run_dir, final, records, overlaps,
                             vocab_size=dataset.manifest["tokenizer"]["vocab_size"])
        staging = run_dir / "staging"  # the record lands in run_dir only after the run is FINISHED
        staging.mkdir(exist_ok=True)
        trial.save(staging / TRIAL_FILE)
        tracker.log_artifact(staging / TRIAL_FILE)
        if prune:
            tracker.log_metrics(_trial_metrics(trial), cfg.train.steps)
    (staging / TRIAL_FILE).replace(run_dir / TRIAL_FILE)
    staging.rmdir()
    return finished_metrics(run_dir)


def build_training(cfg: ExperimentConfig, dataset: Dataset, device: str) -> TrainingSetup:
    """The model (seeded), its sparse tensors, the engine (`infra.wrap` through `make_engine`; this joins
    the process group under DeepSpeed) and the loaders of this rank."""
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model, dataset.manifest["tokenizer"]["vocab_size"], device=device)
    if cfg.model.bigram_table == "fixed":
        model.bigram_table.copy_(bigram_log_probs(train_sample(dataset), model.vocab_size))
    tensors = sparse_tensors(model, cfg.sparsity)
    engine = make_engine(model, tensors, cfg.train, cfg.sparsity, kind=engine_kind(cfg), deepspeed=cfg.deepspeed)
    t = cfg.train
    loader = token_loader(cfg, dataset, "train", batch_size=t.batch_size * t.grad_accum, rank=engine.rank,
                          world_size=engine.world_size)
    val = token_loader(cfg, dataset, "val", shuffle=False)
    return TrainingSetup(model=model, tensors=tensors, engine=engine, loader=loader, val=val)


def finished(run_dir: Path, cfg: ExperimentConfig, record: str = TRIAL_FILE) -> bool:
    """The run's `record` exists (it is written last: the trial record, or a bridge's summary) and the run
    folder holds this very config."""
    config = run_dir / CONFIG_FILENAME
    return (run_dir / record).is_file() and config.is_file() and config.read_text() == config_to_yaml(cfg)


def finished_metrics(run_dir: Path) -> dict[str, float]:
    """A finished trial's final metrics: training's summary and the trial record's figures."""
    summary = json.loads((run_dir / SUMMARY).read_text())
    return dict(summary["final"]) | _trial_metrics(TrialRecord.load(run_dir / TRIAL_FILE))


def trial_record(cfg: ExperimentConfig, run_dir: Path, final: dict, records: dict[str, CircuitRecord], overlaps: dict,
                 *, vocab_size: int) -> TrialRecord:
    """The trial's record for analysis (pipeline/records.py)."""
    pairs = [v for a, row in overlaps.get("nodes", {}).items() for b, v in row.items() if a < b]
    accuracy = {k.split("/")[1]: float(v) for k, v in final.items()
                if k.startswith("task/") and k.endswith("/accuracy")}
    return TrialRecord(
        trial=run_dir.name, study=cfg.tracking.experiment, d_model=cfg.model.d_model, num_layers=cfg.model.num_layers,
        density=cfg.sparsity.density, params_total=param_counts(cfg.model, vocab_size)["total"],
        l0_total=float(final.get("l0_total", math.nan)), val_loss=float(final["val_loss"]),
        residual_kurtosis=float(final.get("residual_kurtosis", math.nan)),
        task_accuracy_mean=float(final.get("task_accuracy_mean", math.nan)),
        circuit_edges_geomean=geometric_mean_edges(records.values()),
        circuits_found=sum(r.status == "found" for r in records.values()), circuits_tried=len(records),
        overlap_nodes_mean=sum(pairs) / len(pairs) if pairs else None,
        train_seconds=float(final.get("train_seconds", 0.0)), prune_seconds=float(final.get("prune_seconds", 0.0)),
        circuits={name: r.summary(accuracy.get(name)) for name, r in records.items()},
        seed=cfg.train.seed, lr=cfg.train.lr, task_accuracy=accuracy,
    )


def _trial_metrics(trial: TrialRecord) -> dict[str, float]:
    out = {"train_seconds": trial.train_seconds, "prune_seconds": trial.prune_seconds,
           "circuits_found": float(trial.circuits_found)}
    if trial.circuit_edges_geomean is not None:
        out["circuit_edges_geomean"] = trial.circuit_edges_geomean
    return out


def silent(message: str) -> None:
    """The log of ranks other than 0 (a module-level function, so it crosses into spawned processes)."""


def train_sample(dataset: Dataset, max_tokens: int = 1 << 22) -> torch.Tensor:
    """Training tokens for the counts of a fixed bigram table."""
    first = dataset.shards("train")[0]
    return torch.from_numpy(map_shard(dataset.shard_path(first))[:max_tokens].astype("int64"))
