"""The one seam that wraps a model for distributed training (DeepSpeed; DESIGN.md).

This module holds the DeepSpeed settings; the wrapping function lands with the trial issue.
"""

from dataclasses import dataclass
from typing import Literal


@dataclass(kw_only=True, frozen=True)
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 2  # checked by its type; no range rule needed
    precision: Literal["fp32", "bf16"] = "fp32"
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl on GPUs, gloo on CPU

