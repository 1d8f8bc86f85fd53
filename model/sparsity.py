"""Weight sparsity mechanics (METHOD.md section 3): which tensors are sparse, the top-k magnitude
projection with the per-neuron floor, and the L0-anneal and sharkfin-LR schedules.

When the projection runs (after every optimizer step) is the training loop's business
(pipeline/recipe.py); this module only knows how.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

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


def sparse_tensors(model: nn.Module, cfg: SparsityConfig) -> list[SparseTensor]:
    """Every tensor the projection acts on: block matrices, embeddings, unembedding, and biases if
    `cfg.sparse_biases`. Norm gains, attention sinks and the bigram table stay dense."""
    found = []
    for name, param in model.named_parameters():
        suffix = next((s for s in FLOOR_DIMS if name.endswith(s)), None)
        if suffix is not None:
            found.append(SparseTensor(name, param, "matrix", FLOOR_DIMS[suffix]))
        elif name in EMBEDDINGS:
            found.append(SparseTensor(name, param, "embedding", None))
        elif name.endswith(".bias") and cfg.sparse_biases:
            found.append(SparseTensor(name, param, "bias", None))
    return found


def keep_count(numel: int, density: float) -> int:
    """Entries kept at `density`: round(density x numel), at least 1."""
    return min(numel, max(1, round(density * numel)))


def topk_mask(weight: torch.Tensor, k: int, *, floor: int = 0, floor_dim: int | None = None) -> torch.Tensor:
    """Boolean mask of the k largest |weight| entries, after each neuron first keeps its `floor`
    largest along `floor_dim`. Ties are broken by torch.topk, so exactly k entries are kept."""
    magnitude = weight.detach().abs()
    mask = torch.zeros_like(magnitude, dtype=torch.bool)
    if floor and floor_dim is not None:
        floor = min(floor, magnitude.shape[floor_dim])
        mask.scatter_(floor_dim, magnitude.topk(floor, dim=floor_dim).indices, True)
    remaining = k - int(mask.sum())
    assert remaining >= 0, "the floor does not fit in k; config validation should have caught this"
    if remaining:
        scores = magnitude.masked_fill(mask, -1.0).flatten()
        mask.view(-1)[scores.topk(remaining).indices] = True
    return mask


def density_for(tensor: SparseTensor, matrix_density: float, embedding_density: float) -> float:
    return matrix_density if tensor.group == "matrix" else embedding_density


@torch.no_grad()
def project_(tensors: list[SparseTensor], matrix_density: float, embedding_density: float, floor: int) -> None:
    """Zero all but the top-k entries of every sparse tensor, in place (dense tensors untouched)."""
    for t in tensors:
        density = density_for(t, matrix_density, embedding_density)
        if density >= 1.0:
            continue
        mask = topk_mask(t.param, keep_count(t.param.numel(), density), floor=floor, floor_dim=t.floor_dim)
        t.param.mul_(mask)


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
