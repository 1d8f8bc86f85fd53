"""Joining the Ray cluster: one way for every Ray user in the project (the study, the pruning search, the
data build's Ray engine)."""

import os

import ray


def init_ray(verbose: int = 1) -> None:
    """Join RAY_ADDRESS's cluster (set by `ray job submit`; `RAY_ADDRESS=auto` joins a `ray start` cluster on
    this machine), else start a fresh local Ray (no dashboard); never a stale cluster a `ray start` left."""
    # Ray Train V2 (the Tune trainable fits a TorchTrainer, DESIGN.md): the workers inherit this from the
    # Ray started here, whichever user starts it first
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False,
                 log_to_driver=verbose > 1, configure_logging=verbose > 1)
