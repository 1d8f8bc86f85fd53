"""One trial: data (built or reused) -> training (resumed if a checkpoint exists) -> export, with a
tracked run that always ends FINISHED, FAILED (reason tagged) or KILLED."""

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from infra.tracking import RunTracker
from pipeline.config import ExperimentConfig, config_to_yaml, save_config
from pipeline.data import build_data
from pipeline.export import export_model
from pipeline.train import NonFiniteLoss, train


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
    dataset = build_data(cfg.data, config_yaml=config_to_yaml(cfg), progress=progress).dataset
    run_dir = run_dir_for(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = save_config(cfg, run_dir)
    tracker = RunTracker(cfg.tracking, run_dir, run_name=run_dir.name, params=flat_params(cfg))
    log(f"run folder {run_dir.resolve()}; MLflow run {tracker.run_id} at {tracker.uri}"
        + (" (resumed)" if tracker.resumed else ""))
    try:
        result = train(cfg, dataset, run_dir, tracker, device=device, progress=progress, log=log)
        tracker.log_metrics(result.final, result.steps)
        export_dir = export_model(result.model, config_to_yaml(cfg), dataset, run_dir / "export")
        (run_dir / "final_metrics.json").write_text(json.dumps(result.final, indent=1, sort_keys=True))
        for artifact in (config_path, run_dir / "final_metrics.json"):
            tracker.log_artifact(artifact)
    except NonFiniteLoss as err:
        tracker.finish("FAILED", str(err))
        raise
    except KeyboardInterrupt:
        tracker.finish("KILLED", "interrupted")
        raise
    except BaseException as err:
        tracker.finish("FAILED", f"{type(err).__name__}: {err}")
        raise
    tracker.finish("FINISHED")
    return TrialResult(run_dir=run_dir, export_dir=export_dir, mlflow_uri=tracker.uri, mlflow_run_id=tracker.run_id,
                       resumed_from=result.resumed_from, final=result.final)
