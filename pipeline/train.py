"""The training stage: the paper's recipe (METHOD.md section 3) over a sharded engine.

This module holds the settings of the training loop; the loop itself lands with the trial issue.
"""

from dataclasses import dataclass


@dataclass(kw_only=True, frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32  # sequences per optimizer step per worker
    grad_accum: int = 1
    lr: float = 1e-2  # peak LR at the final L0; scaled by the sharkfin factor (METHOD.md 3)
    warmup_frac: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 0.1  # METHOD.md 3: Adam eps 0.1 for the sparse weights
    weight_decay: float = 0.1
    seed: int = 0
    eval_every: int = 100


@dataclass(kw_only=True, frozen=True)
class TrialConfig:
    workers: int = 1  # data-parallel training processes per trial


def check_train_config(cfg: TrainConfig) -> None:
    for key in ("steps", "batch_size", "grad_accum", "eval_every"):
        value = getattr(cfg, key)
        if value < 1:
            raise ValueError(f"train.{key}: must be a positive integer, got {value}")
    for key in ("lr", "eps"):
        value = getattr(cfg, key)
        if value <= 0:
            raise ValueError(f"train.{key}: must be > 0, got {value}")
    for key in ("beta1", "beta2"):
        value = getattr(cfg, key)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"train.{key}: must lie in [0, 1), got {value}")
    if not 0.0 <= cfg.warmup_frac <= 1.0:
        raise ValueError(f"train.warmup_frac: must lie in [0, 1], got {cfg.warmup_frac}")
    if cfg.weight_decay < 0:
        raise ValueError(f"train.weight_decay: must be >= 0, got {cfg.weight_decay}")


def check_trial_config(cfg: TrialConfig) -> None:
    if cfg.workers < 1:
        raise ValueError(f"trial.workers: must be a positive integer, got {cfg.workers}")
