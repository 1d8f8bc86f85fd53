"""Weight sparsity mechanics (METHOD.md section 3): which tensors are sparse, the top-k magnitude
projection with the per-neuron floor, and the L0-anneal and sharkfin-LR schedules.

When the projection runs (after every optimizer step) is the training loop's business
(pipeline/train.py); this module only knows how. The masks themselves come from kernels/topk.py.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from kernels.topk import keep_count, topk_mask_reference
from model.config import SparsityConfig

# The four floored projections (METHOD.md 3) and the dim along which each neuron's floor is taken:
# qkv and MLP-in keep j inputs per output row (topk over dim 1); attention-out and MLP-out keep
# j outputs per input column (topk over dim 0).
FLOOR_DIMS = {"attn.c_attn.weight": 1, "attn.c_proj.weight": 0, "mlp.c_fc.weight": 1, "mlp.c_proj.weight": 0}
EMBEDDINGS = ("transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight")


@dataclass(frozen=True)
class SparseTensor:
    name: str
    param: nn.Parameter
    group: str  # "matrix" | "embedding" | "bias": which density applies
    floor_dim: int | None  # dim along which each neuron keeps its floor, None = no floor
    module: nn.Module | None = None  # the linear whose forward applies this weight's mask


def sparse_tensors(model: nn.Module, cfg: SparsityConfig) -> list[SparseTensor]:
    """Every tensor the projection acts on: block matrices, embeddings, unembedding, and biases if
    `cfg.sparse_biases`. Norm gains, attention sinks and the bigram table stay dense."""
    found = []
    for name, param in model.named_parameters():
        module = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else None
        masked = module if hasattr(module, "mask") else None
        suffix = next((s for s in FLOOR_DIMS if name.endswith(s)), None)
        if suffix is not None:
            found.append(SparseTensor(name, param, "matrix", FLOOR_DIMS[suffix], masked))
        elif name in EMBEDDINGS:
            found.append(SparseTensor(name, param, "embedding", None, masked))
        elif name.endswith(".bias") and cfg.sparse_biases:
            found.append(SparseTensor(name, param, "bias", None))
    return found


def density_for(tensor: SparseTensor, matrix_density: float, embedding_density: float) -> float:
    return matrix_density if tensor.group == "matrix" else embedding_density


@torch.no_grad()
def project_(
    tensors: list[SparseTensor], matrix_density: float, embedding_density: float, floor: int,
    topk_mask: Callable = topk_mask_reference,
) -> None:
    """Zero all but the top-k entries of every sparse tensor, in place (dense tensors untouched), and
    hand each mask to the module that uses it in its forward. The training path does the same inside
    the fused optimizer step (kernels/optimizer.py); this is its reference sequence."""
    for t in tensors:
        density = density_for(t, matrix_density, embedding_density)
        if density >= 1.0:
            continue
        mask = topk_mask(t.param, keep_count(t.param.numel(), density), floor=floor, floor_dim=t.floor_dim)
        t.param.mul_(mask)
        attach_mask(t, mask)


def attach_mask(tensor: SparseTensor, mask: torch.Tensor) -> None:
    if tensor.module is not None and tensor.name.endswith(".weight"):
        tensor.module.mask = mask


def attach_masks(tensors: list[SparseTensor], masks: dict[torch.Tensor, torch.Tensor]) -> None:
    """Hand the optimizer's latest masks (keyed by parameter) to the modules that apply them."""
    for t in tensors:
        if t.param in masks:
            attach_mask(t, masks[t.param])


def anneal_progress(step: int, total_steps: int, cfg: SparsityConfig) -> float:
    """0 before the anneal window, 1 after it, linear in between."""
    start, end = cfg.anneal_start * total_steps, cfg.anneal_end * total_steps
    if step <= start:
        return 0.0
    if step >= end:
        return 1.0
    return (step - start) / (end - start)


def density_at(step: int, total_steps: int, target: float, cfg: SparsityConfig) -> float:
    """The L0 anneal (METHOD.md 3): dense until anneal_start, the target from anneal_end.

    linear: density falls linearly (so does L0); power: target + (1 - target)(1 - progress)^power,
    which front-loads the drop for power > 1.
    """
    progress = anneal_progress(step, total_steps, cfg)
    if cfg.anneal_shape == "linear":
        return 1.0 + (target - 1.0) * progress
    return target + (1.0 - target) * (1.0 - progress) ** cfg.anneal_power


def lr_at(step: int, total_steps: int, base_lr: float, warmup_frac: float, density_now: float, target: float) -> float:
    """Sharkfin LR (METHOD.md 3): linear warmup, linear decay to 0, x sqrt(L0_final / L0_now)."""
    warmup = max(1, math.ceil(warmup_frac * total_steps))
    if step < warmup:
        shape = (step + 1) / warmup
    else:
        shape = max(0.0, (total_steps - step) / max(1, total_steps - warmup))
    return base_lr * shape * math.sqrt(target / density_now)
