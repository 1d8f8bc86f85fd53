"""The pruning stage: learned node masks to minimal task circuits (METHOD.md section 4).

This module holds the pruning settings, with the paper's search centres as defaults; the pruning
itself lands with the pruning issue.
"""

from dataclasses import dataclass, field
from typing import Literal

from pipeline.tasks import TASKS


@dataclass(kw_only=True, frozen=True)
class PruneConfig:
    tasks: list[str] = field(default_factory=list)  # empty: every task of the suite
    target_loss: float = 0.15  # METHOD.md 4: bisect k to the smallest circuit reaching this loss
    k_coef: float = 1e-4
    lr: float = 3e-3
    weight_decay: float = 1e-3
    beta2: float = 0.95
    warmup_frac: float = 0.05
    temperature: float = 1.0
    steps: int = 1000
    batch_pairs: int = 64
    mean_pooling: Literal["pooled", "per_position"] = "pooled"  # METHOD.md 4 leaves it open


def check_prune_config(cfg: PruneConfig) -> None:
    for key in ("target_loss", "lr", "temperature"):
        value = getattr(cfg, key)
        if value <= 0:
            raise ValueError(f"prune.{key}: must be > 0, got {value}")
    for key in ("k_coef", "weight_decay"):
        value = getattr(cfg, key)
        if value < 0:
            raise ValueError(f"prune.{key}: must be >= 0, got {value}")
    for key in ("steps", "batch_pairs"):
        value = getattr(cfg, key)
        if value < 1:
            raise ValueError(f"prune.{key}: must be a positive integer, got {value}")
    if not 0.0 <= cfg.beta2 < 1.0:
        raise ValueError(f"prune.beta2: must lie in [0, 1), got {cfg.beta2}")
    if not 0.0 <= cfg.warmup_frac <= 1.0:
        raise ValueError(f"prune.warmup_frac: must lie in [0, 1], got {cfg.warmup_frac}")
    if len(set(cfg.tasks)) != len(cfg.tasks):
        raise ValueError(f"prune.tasks: lists a task twice: {cfg.tasks}")
    unknown = [t for t in cfg.tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"prune.tasks: unknown task(s) {unknown}; known: {', '.join(TASKS)}")
