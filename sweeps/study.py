"""Run a study: a Ray Tune grid of trials, each a Ray Train `TorchTrainer` (DeepSpeed inside when a
trial has several workers), then the analysis report.

Layout of a study folder (`<storage_path>/<name>/`; when `storage_path` is a URI such as s3://bucket/studies,
the study runs in `<local_dir>/<name>/` and every file is mirrored to the URI, infra/storage.py):
  study.yaml           the sweep file as given, and `overrides.txt` the command-line overrides
  mlflow.db            the MLflow store when the study names no tracking URI
  mlflow_run.json      the study's parent MLflow run (trials are nested child runs)
  trials/<trial>/      each trial's run folder (checkpoints, export, circuits, metrics, and trial.log: what its
                       rank 0 said, such as a resume or a corrupt checkpoint it skipped)
  lr_search.json       with `lr_search`: each point's chosen LR and every rung's losses (sweeps/lr_search.py)
  lr_search/<run>/     the LR candidates' run folders (no pruning; not trials of the frontier)
  ray/<name>/          Ray Tune's experiment state (one per LR-search rung; written by Ray, never read back)
  report/              report.md, report.html, figures (written by the `report` callable the caller
                       passes: the CLI passes analysis/'s; sweeps/ never imports analysis/)

Ray 2.60 runs Ray Train V2: the Tune trainable builds and fits the trial's `TorchTrainer` itself, and
the workers' final report reaches Tune through `TuneReportCallback`. The Train run is named after the
trial, its failure config restarts failed workers, and our checkpoints make the restart resume. Running
the same command again runs a fresh Tune grid over the trials that have no record yet: each resumes from
its own checkpoints and keeps its one MLflow child run, and a finished trial is read from its folder. Tune's
own experiment state is not restored: it is cloudpickle (DESIGN.md: nothing a peer can write is unpickled
here) and a crash or a full disk can leave it truncated, which no rerun would get past.

A full disk under the study folder stops the study with one line naming the folder and the free space; the
files it left are whole (checkpoints and records are written to a staging name and renamed), so once there
is space the same command resumes.
"""

import dataclasses
import errno
import functools
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
from filelock import FileLock
from ray import tune
from ray.train import FailureConfig, ScalingConfig
from ray.train import RunConfig as TrainRunConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from infra.storage import Mirror, is_uri
from infra.tracking import tracked_run, tracking_uri
from pipeline.config import ExperimentConfig
from pipeline.data import MANIFEST, build_data
from pipeline.errors import UserError
from pipeline.records import LR_SEARCH_FILE, TRIAL_FILE
from pipeline.trial import finished, finished_metrics, trial_rank
from sweeps import data_engine  # noqa: F401  (registers data.engine=ray)
from sweeps.lr_search import search_lrs
from sweeps.ray_session import init_ray
from sweeps.spec import StudyConfig, TrialSpec, load_study

PLACEMENT = "placement.json"  # in each trial folder: the Ray node its rank 0 ran on
TRIAL_LOG = "trial.log"  # in each trial folder: what its rank 0 said (resumes, checkpoints it skipped)
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
    """The study's local folder: `<storage_path>/<name>`, or `<local_dir>/<name>` when storage is a URI."""
    root = study.local_dir if is_uri(study.storage_path) else study.storage_path
    return Path(root).expanduser().resolve() / study.name


def study_mirror(study: StudyConfig) -> Mirror | None:
    """Where a study with a URI `storage_path` keeps its files (None: the local folder is the storage)."""
    return Mirror.open(study.storage_path).child(study.name) if is_uri(study.storage_path) else None


# what the driver leaves to others when it pushes the study folder: the trials' and LR candidates' own
# folders (their rank 0 pushes them) and Ray's experiment state (Ray writes it to the URI itself)
_DRIVER_SKIPS = ("trials", "lr_search", "ray", "train")
# what the driver pulls back: everything but checkpoints (the trials' ranks pull their own) and Ray's state
_PULL_SKIPS = ("checkpoints", "ray", "train")


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
    folder = Path(cfg.train.run_dir)
    lead = ray.train.get_context().get_world_rank() == 0
    mirror = Mirror.open(config["mirror"][0]).child(*config["mirror"][1]) if config["mirror"] else None
    if mirror is not None:  # resume from what any node pushed; the ranks on one node pull once
        folder.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{folder}.pull.lock"):
            mirror.pull(folder)
    if lead:  # where the trial ran (the cluster rehearsal checks it)
        context = ray.get_runtime_context()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / PLACEMENT).write_text(json.dumps({"node_id": context.get_node_id(),
                                                    "node_ip": ray.util.get_node_ip_address()}))
    push = functools.partial(mirror.push, folder) if mirror is not None and lead else None
    data = config["data"]  # built once by the driver: this rank only opens its manifest (a URI: fetches it)
    if not is_uri(data) and not (Path(data) / MANIFEST).is_file():
        raise UserError(f"the study's dataset {data} is not on node {ray.util.get_node_ip_address()}: "
                        "data.cache_dir must be on storage every node mounts (docs/cluster.md, shared storage)")
    try:
        final = trial_rank(cfg, device=device, prune=config["prune"], data=data,
                           log=functools.partial(_log_line, folder / TRIAL_LOG), on_checkpoint=push)
    finally:  # finished or failed, the run folder (MLflow run id, checkpoints, record) reaches the storage
        if push is not None:
            push()
    ray.train.report(final or {})  # (never a `done` key: Tune would stop the trial before Train cleans up)


def _log_line(path: Path, message: str) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")


def _trial(config: dict, configs: dict, datasets: dict[str, str], study: StudyConfig, folder: str, prune: bool
           ) -> None:
    """The Tune trainable: fit the trial's TorchTrainer (its metrics come back via TuneReportCallback)."""
    name = config["trial"]
    cfg = configs[name]
    _check_space(Path(cfg.train.run_dir).parent)  # on a full disk, one clear error, not a worker group started
    gpus = study.gpus_per_worker
    # with URI storage, the run folder's copy there: (the URI, the path under it)
    mirror = (study.storage_path, [study.name, *Path(cfg.train.run_dir).relative_to(folder).parts]) \
        if is_uri(study.storage_path) else None
    resources = {"CPU": study.cpus_per_worker} | ({"GPU": gpus} if gpus else {}) | dict(study.worker_resources)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"cfg": cfg, "gpus": gpus, "prune": prune, "data": datasets[_data_key(cfg.data)],
                           "mirror": mirror},
        scaling_config=ScalingConfig(num_workers=study.workers, use_gpu=gpus > 0, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if gpus > 0 else "gloo"),
        run_config=TrainRunConfig(name=name, storage_path=_ray_storage(study, Path(folder), "train"),
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
    folder, mirror = study_folder(study), study_mirror(study)
    if mirror is not None:  # a rerun elsewhere: the MLflow store, parent run and records come back first
        mirror.pull(folder, exclude=_PULL_SKIPS)
    (folder / "trials").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, folder / "study.yaml")
    (folder / "overrides.txt").write_text("\n".join(overrides or []) + "\n", encoding="utf-8")
    try:
        return _run(study, trials, folder, report=report, log=log, verbose=verbose, start=start)
    except Exception as err:
        if (full := _no_space(folder, err)) is not None:
            raise full from None
        raise
    finally:  # the driver's part of the folder reaches the storage however the study ended
        if mirror is not None:
            mirror.push(folder, exclude=_DRIVER_SKIPS)
            log(f"study folder mirrored to {mirror.uri}")


def _run(study: StudyConfig, trials: list[TrialSpec], folder: Path, *, report: ReportFn, log, verbose: int,
         start: float) -> StudyResult:
    uri = study.tracking_uri or tracking_uri(dataclasses.replace(trials[0].config.tracking, uri=None), folder)
    tracking = dataclasses.replace(trials[0].config.tracking, uri=uri, experiment=study.name,
                                   tags={"study": study.name, "kind": "study"})
    with tracked_run(tracking, folder, run_name=study.name,
                     params={"trials": len(trials), "grid": json.dumps(study.grid)}) as parent:
        log(f"study {study.name}: {len(trials)} trials in {folder}; MLflow {uri} (run {parent.run_id})"
            + (" (resumed)" if parent.resumed else ""))
        parent.log_artifact(folder / "study.yaml")
        configs = trial_configs(study, trials, folder, uri, parent.run_id)
        configs, datasets = _with_built_data(configs, verbose)
        if study.lr_search.lrs:
            configs = _with_searched_lrs(study, trials, configs, datasets, folder, verbose, parent, log)
        results, failed = _fit(study, configs, datasets, folder, verbose, name=study.name, prune=study.prune)
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


_FULL_BYTES = 16 << 20  # a study that fails with less free space than this beside its folder failed for it


def _check_space(folder: Path) -> None:
    """A trial does not start where the study folder's disk is full (a folder this node cannot see is not
    checked here)."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < _FULL_BYTES:
        raise UserError(f"no space left on the filesystem of {folder} ({free / 1e6:.1f} MB free)")


def _no_space(folder: Path, err: BaseException) -> UserError | None:
    """The error to show when `err` came from the study folder's filesystem being full (ENOSPC anywhere in
    the chain, or in a trial's error, or hardly any space left); None otherwise."""
    chain, seen = [], err
    while seen is not None and len(chain) < 20:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    enospc = any(isinstance(e, OSError) and e.errno == errno.ENOSPC for e in chain) or any(
        "No space left on device" in str(e) for e in chain)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    if not enospc and free >= _FULL_BYTES:
        return None
    return UserError(f"no space left on the filesystem of {folder} ({free / 1e6:.1f} MB free); what was written "
                     "is whole: free some space and run the same command to resume")


def _data_key(data) -> str:
    return json.dumps(dataclasses.asdict(data), sort_keys=True)


def _with_built_data(configs: dict[str, ExperimentConfig], verbose: int
                     ) -> tuple[dict[str, ExperimentConfig], dict[str, str]]:
    """Build each distinct dataset once, here on the driver, into `data.cache_dir` made absolute (so every
    rank on every node names the same folder: on a cluster, storage every node mounts; or a URI, which each
    node fetches from into its own cache). Returns the configs with that cache_dir, and the built dataset's
    location per data config (`_data_key`): the trials' ranks only open its manifest, never the corpus."""
    out, datasets = {}, {}
    for name, cfg in configs.items():
        cache = cfg.data.cache_dir
        cache = cache if is_uri(cache) else str(Path(cache).expanduser().resolve())
        data = dataclasses.replace(cfg.data, cache_dir=cache)
        if _data_key(data) not in datasets:
            datasets[_data_key(data)] = build_data(data, progress=verbose > 0).dataset.location
        out[name] = dataclasses.replace(cfg, data=data)
    return out, datasets


def _with_searched_lrs(study: StudyConfig, trials: list[TrialSpec], configs: dict[str, ExperimentConfig],
                       datasets: dict[str, str], folder: Path, verbose: int, parent, log
                       ) -> dict[str, ExperimentConfig]:
    """The trials' configs at the LR the search chose for their point (sweeps/lr_search.py); the choice is
    logged on the study's MLflow run (a metric per point, and lr_search.json)."""

    def fit(candidates: dict[str, ExperimentConfig], name: str) -> tuple[set[str], dict[str, str]]:
        _, failed = _fit(study, candidates, datasets, folder, verbose, name=name, prune=False)
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


def _ray_storage(study: StudyConfig, folder: Path, part: str) -> str:
    """Ray Tune's and Ray Train's storage_path: in the study folder, or straight at the URI (Ray opens
    pyarrow filesystems itself, so the URI is only named here, never opened)."""
    if is_uri(study.storage_path):
        return "/".join([study.storage_path.rstrip("/"), study.name, part])
    return str(folder / part)


def _fit(study: StudyConfig, configs: dict, datasets: dict[str, str], folder: Path, verbose: int, *, name: str,
         prune: bool) -> tuple[dict, dict]:
    """One Ray Tune grid (experiment `name` under <study>/ray/) over the trials of `configs` that have no
    record yet; a finished trial's metrics are read from its folder (a rerun fits only what is left)."""
    results = {n: finished_metrics(Path(c.train.run_dir)) for n, c in configs.items()
               if finished(Path(c.train.run_dir), c)}
    pending = [n for n in configs if n not in results]
    if not pending:
        return results, {}
    init_ray(verbose)
    trainable = tune.with_resources(
        tune.with_parameters(_trial, configs=configs, datasets=datasets, study=study, folder=str(folder),
                             prune=prune),
        # The trial driver only waits on its TorchTrainer and holds no CPU (a fraction would leave the
        # last worker's CPU short); Tune needs a non-empty bundle, so it asks for one byte of memory.
        {"cpu": 0, "memory": 1},
    )
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(pending)},
        tune_config=tune.TuneConfig(max_concurrent_trials=study.max_concurrent_trials),
        run_config=tune.RunConfig(name=name, storage_path=_ray_storage(study, folder, "ray"), verbose=verbose),
    )
    grid = tuner.fit()
    mirror = study_mirror(study)
    if mirror is not None:  # the records the trials' ranks pushed, wherever they ran (not their checkpoints)
        mirror.pull(folder, exclude=_PULL_SKIPS)
    failed = {}
    for result in grid:
        trial = result.config["trial"]
        if result.error is not None:
            failed[trial] = str(result.error).strip().splitlines()[-1][:300]
        else:
            results[trial] = dict(result.metrics or {})
    return results, failed
