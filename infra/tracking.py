"""Where run records go: MLflow (SQLite file locally, a server on clusters; DESIGN.md).

This module holds the tracking settings; the MLflow sink lands with the trial issue.
"""

from dataclasses import dataclass


@dataclass(kw_only=True, frozen=True)
class TrackingConfig:
    # MLflow 3 refuses the old ./mlruns file store; SQLite locally, a server on clusters.
    uri: str = "sqlite:///runs/mlflow.db"
    experiment: str = "circuitscale"


def check_tracking_config(cfg: TrackingConfig) -> None:
    if "://" not in cfg.uri:
        raise ValueError(
            f"tracking.uri: must be a URI such as sqlite:///runs/mlflow.db or http://host:5000, "
            f"got {cfg.uri!r}"
        )
    if not cfg.experiment.strip():
        raise ValueError("tracking.experiment: must not be empty")
