"""Run a study: a Ray Tune grid of trials, each a Ray Train `TorchTrainer` (DeepSpeed inside when a
trial has several workers), then the analysis report.

Layout of a study folder (`<storage_path>/<name>/`):
  study.yaml           the sweep file as given, and `overrides.txt` the command-line overrides
  mlflow.db            the MLflow store when the study names no tracking URI
  mlflow_run.json      the study's parent MLflow run (trials are nested child runs)
  trials/<trial>/      each trial's run folder (checkpoints, export, circuits, metrics)
  lr_search.json       with `lr_search`: each point's chosen LR and every rung's losses (sweeps/lr_search.py)
  lr_search/<run>/     the LR candidates' run folders (no pruning; not trials of the frontier)
  ray/<name>/          Ray Tune's experiment state (what a rerun resumes from; one per LR-search rung)
  report/              report.md, report.html, figures (written by the `report` callable the caller
                       passes: the CLI passes analysis/'s; sweeps/ never imports analysis/)

Ray 2.60 runs Ray Train V2: the Tune trainable builds and fits the trial's `TorchTrainer` itself, and
the workers' final report reaches Tune through `TuneReportCallback`. The Train run is named after the
trial, its failure config restarts failed workers, and our checkpoints make the restart resume. Running
the same command again restores the Tune experiment: finished trials are kept, unfinished and errored
ones resume from their checkpoints, and each keeps its one MLflow child run.
"""

import dataclasses
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
from ray import tune
from ray.train import FailureConfig, ScalingConfig
from ray.train import RunConfig as TrainRunConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from infra.tracking import tracked_run, tracking_uri
from pipeline.config import ExperimentConfig
from pipeline.data import build_data
from pipeline.errors import UserError
from pipeline.records import LR_SEARCH_FILE, TRIAL_FILE
from pipeline.trial import trial_rank
from sweeps.lr_search import search_lrs
from sweeps.spec import StudyConfig, TrialSpec, load_study

PLACEMENT = "placement.json"  # in each trial folder: the Ray node its rank 0 ran on
# (study folder, wall seconds) -> (report folder, headline figures): writes the study's report
ReportFn = Callable[[Path, float], tuple[Path, dict]]


@dataclass(frozen=True)
class StudyResult:
    folder: Path
    tracking_uri: str
    parent_run_id: str
    trials: dict[str, dict]  # trial name -> its final metrics ({} if it failed)
    failed: dict[str, str]  # trial name -> error
    wall_s: float


def study_folder(study: StudyConfig) -> Path:
    return Path(study.storage_path).expanduser().resolve() / study.name


def trial_configs(study: StudyConfig, trials: list[TrialSpec], folder: Path, uri: str, parent: str
                  ) -> dict[str, ExperimentConfig]:
    """Each trial's config, pointed at its run folder, the study's MLflow store and parent run."""
    out = {}
    for spec in trials:
        cfg = spec.config
        tags = {"study": study.name, "trial": spec.name, "point": spec.point_name, "d_model": str(cfg.model.d_model),
                "density": f"{cfg.sparsity.density:g}", "num_layers": str(cfg.model.num_layers),
                "seed": str(cfg.train.seed), "kind": "trial"}
        tracking = dataclasses.replace(cfg.tracking, uri=uri, experiment=study.name, parent_run_id=parent,
                                       tags=tags)
        train = dataclasses.replace(cfg.train, run_dir=str(folder / "trials" / spec.name))
        trial = dataclasses.replace(cfg.trial, workers=study.workers)
        out[spec.name] = dataclasses.replace(cfg, tracking=tracking, train=train, trial=trial)
    return out


def _worker_loop(config: dict) -> None:
    """One Ray Train worker of a trial: the trial's rank (pipeline/trial.py); everyone reports once."""
    device = "cuda" if config["gpus"] > 0 else "cpu"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # the GPU Ray gave this worker
    cfg = config["cfg"]
    if ray.train.get_context().get_world_rank() == 0:  # where the trial ran (the cluster rehearsal checks it)
        context = ray.get_runtime_context()
        folder = Path(cfg.train.run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / PLACEMENT).write_text(json.dumps({"node_id": context.get_node_id(),
                                                    "node_ip": ray.util.get_node_ip_address()}))
    final = trial_rank(cfg, device=device, prune=config["prune"], log=lambda _: None)
    ray.train.report(final or {})  # (never a `done` key: Tune would stop the trial before Train cleans up)


def _trial(config: dict, configs: dict, study: StudyConfig, folder: str, prune: bool) -> None:
    """The Tune trainable: fit the trial's TorchTrainer (its metrics come back via TuneReportCallback)."""
    name = config["trial"]
    cfg = configs[name]
    gpus = study.gpus_per_worker
    resources = {"CPU": study.cpus_per_worker} | ({"GPU": gpus} if gpus else {}) | dict(study.worker_resources)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"cfg": cfg, "gpus": gpus, "prune": prune},
        scaling_config=ScalingConfig(num_workers=study.workers, use_gpu=gpus > 0, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if gpus > 0 else "gloo"),
        run_config=TrainRunConfig(name=name, storage_path=str(Path(folder) / "train"),
                                  failure_config=FailureConfig(max_failures=study.max_failures),
                                  callbacks=[TuneReportCallback()]),
    )
    trainer.fit()


def run_study(path: str | Path, overrides: list[str] | None = None, *, report: ReportFn, log=print,
              verbose: int = 1) -> StudyResult:
    """Run (or resume) the study in `path`, then `report(folder, wall_s)`; raises UserError if trials failed.
    The study's parent MLflow run ends FINISHED, FAILED (trials failed) or KILLED (interrupted)."""
    start = time.perf_counter()
    study, trials = load_study(path, overrides)
    folder = study_folder(study)
    (folder / "trials").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, folder / "study.yaml")
    (folder / "overrides.txt").write_text("\n".join(overrides or []) + "\n", encoding="utf-8")
    uri = study.tracking_uri or tracking_uri(dataclasses.replace(trials[0].config.tracking, uri=None), folder)
    tracking = dataclasses.replace(trials[0].config.tracking, uri=uri, experiment=study.name,
                                   tags={"study": study.name, "kind": "study"})
    with tracked_run(tracking, folder, run_name=study.name,
                     params={"trials": len(trials), "grid": json.dumps(study.grid)}) as parent:
        log(f"study {study.name}: {len(trials)} trials in {folder}; MLflow {uri} (run {parent.run_id})"
            + (" (resumed)" if parent.resumed else ""))
        parent.log_artifact(folder / "study.yaml")
        configs = trial_configs(study, trials, folder, uri, parent.run_id)
        for data_cfg in {json.dumps(dataclasses.asdict(c.data), sort_keys=True): c.data for c in configs.values()
                         }.values():
            build_data(data_cfg, progress=verbose > 0)  # once, before the trials share its cache
        if study.lr_search.lrs:
            configs = _with_searched_lrs(study, trials, configs, folder, verbose, parent, log)
        results, failed = _fit(study, configs, folder, verbose, name=study.name, prune=study.prune)
        unfinished = [n for n in configs if n not in failed and not (folder / "trials" / n / TRIAL_FILE).is_file()]
        if unfinished:  # Tune returns after Ctrl-C with the experiment saved: the study is interrupted
            log(f"study {study.name} interrupted with {len(unfinished)} trial(s) unfinished; "
                "run the same command to resume it")
            raise KeyboardInterrupt
        wall = time.perf_counter() - start
        report_folder, headline = report(folder, wall)
        parent.log_metrics({k: v for k, v in headline.items() if isinstance(v, int | float)}, 0)
        parent.log_artifacts(report_folder, "report")
        if failed:
            raise UserError(f"study {study.name}: {len(failed)} of {len(trials)} trials failed "
                            f"({'; '.join(f'{k}: {v}' for k, v in failed.items())}); rerun the command to resume them")
    log(f"report: {report_folder / 'report.html'}")
    log(f"MLflow: {uri} (`circuitscale ui {folder}` serves it on 127.0.0.1)")
    return StudyResult(folder, uri, parent.run_id, results, failed, wall)


def _with_searched_lrs(study: StudyConfig, trials: list[TrialSpec], configs: dict[str, ExperimentConfig],
                       folder: Path, verbose: int, parent, log) -> dict[str, ExperimentConfig]:
    """The trials' configs at the LR the search chose for their point (sweeps/lr_search.py); the choice is
    logged on the study's MLflow run (a metric per point, and lr_search.json)."""

    def fit(candidates: dict[str, ExperimentConfig], name: str) -> tuple[set[str], dict[str, str]]:
        _, failed = _fit(study, candidates, folder, verbose, name=name, prune=False)
        finished = {n for n, c in candidates.items() if (Path(c.train.run_dir) / TRIAL_FILE).is_file()}
        if set(candidates) - finished - set(failed):  # Tune returned after Ctrl-C: not a verdict on any rate
            log(f"study {study.name} interrupted during the LR search; run the same command to resume it")
            raise KeyboardInterrupt
        return finished - set(failed), failed

    chosen = search_lrs(study, {spec.name: (spec, configs[spec.name]) for spec in trials}, folder, fit, log=log)
    parent.log_metrics({"lr/" + re.sub(r"[^\w.\- /]", "_", point): c["lr"] for point, c in chosen.items()}, 0)
    parent.log_artifact(folder / LR_SEARCH_FILE)
    log("learning rates: " + ", ".join(f"{point} {c['lr']:g}" for point, c in chosen.items()))
    return {spec.name: dataclasses.replace(configs[spec.name], train=dataclasses.replace(
        configs[spec.name].train, lr=chosen[spec.point_name]["lr"])) for spec in trials}


def init_ray(verbose: int = 1) -> None:
    """Join RAY_ADDRESS's cluster (set by `ray job submit`; `RAY_ADDRESS=auto` joins a `ray start` cluster on
    this machine), else start a fresh local Ray (no dashboard); never a stale cluster a `ray start` left."""
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False,
                 log_to_driver=verbose > 1, configure_logging=verbose > 1)


def _fit(study: StudyConfig, configs: dict, folder: Path, verbose: int, *, name: str, prune: bool
         ) -> tuple[dict, dict]:
    """One Ray Tune grid over `configs` (experiment `name` under <study>/ray/, restored when it exists)."""
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    init_ray(verbose)
    trainable = tune.with_resources(
        tune.with_parameters(_trial, configs=configs, study=study, folder=str(folder), prune=prune),
        # The trial driver only waits on its TorchTrainer and holds no CPU (a fraction would leave the
        # last worker's CPU short); Tune needs a non-empty bundle, so it asks for one byte of memory.
        {"cpu": 0, "memory": 1},
    )
    storage = folder / "ray"
    experiment = storage / name
    if tune.Tuner.can_restore(str(experiment)):
        tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search(list(configs))},
            tune_config=tune.TuneConfig(max_concurrent_trials=study.max_concurrent_trials),
            run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=verbose),
        )
    grid = tuner.fit()
    results, failed = {}, {}
    for result in grid:
        trial = result.config["trial"]
        if result.error is not None:
            failed[trial] = str(result.error).strip().splitlines()[-1][:300]
        else:
            results[trial] = dict(result.metrics or {})
    return results, failed
