"""What the two engines (infra/engine.py, infra/deepspeed_engine.py) share: the DeepSpeed section of
the config, the loss-function type, and the mask entries of the engine-agnostic full-state layout:
  model/<name>  optim/<param name>/<exp_avg|exp_avg_sq|step>  mask/<module name>  rng/torch
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass(kw_only=True, frozen=True)
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 2  # checked by its type; no range rule needed
    precision: Literal["fp32", "bf16"] = "fp32"
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl on GPUs, gloo on CPU


def check_deepspeed_config(cfg: DeepSpeedConfig) -> None:
    if cfg.precision == "bf16" and cfg.zero_stage == 0:
        # DeepSpeed then wraps the optimizer in its FP16_UnfusedOptimizer, whose fp32 master copies neither
        # our optimizer's projection nor safe_get_full_fp32_param reaches: the model would train dense
        raise ValueError("deepspeed.precision: bf16 needs deepspeed.zero_stage >= 1 (at stage 0 DeepSpeed keeps "
                         "an fp32 master copy the top-k projection cannot reach, so the model would stay dense)")


LossFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def mask_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The `mask/<module name>` entries: each masked linear's current top-k mask."""
    return {f"mask/{name}": m.mask for name, m in module.named_modules() if getattr(m, "mask", None) is not None}


def load_masks(module: nn.Module, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    """Put the `mask/...` entries of a full state back on their modules."""
    for key, value in tensors.items():
        if key.startswith("mask/"):
            module.get_submodule(key[len("mask/"):]).mask = value.to(device=device, dtype=torch.bool)
