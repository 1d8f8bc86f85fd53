"""The fused sparse optimizer step (METHOD.md 3): Adam update, top-k projection and decoupled decay
in one call per step, with the per-tensor work done by the dispatched kernels.

Per tensor: (1) Adam moments and parameter update (foreach ops on CPU, one Triton pass on GPU),
(2) the top-k mask of the updated weights (threshold top-k), (3) mask and decay applied together
(p <- mask * p * (1 - lr * wd); one Triton pass on GPU). Zeroed weights keep their dense moments and
gradient, so they can come back. Decay applies to weight matrices (embeddings included) only.
"""

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels.topk import keep_count


@dataclass(frozen=True)
class SparseSpec:
    group: str  # "matrix" | "embedding" | "bias": which density applies
    floor_dim: int | None  # the per-neuron floor's dim, None for no floor
    decay: bool  # decoupled weight decay applies (weight matrices)


def adam_update_reference(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps) -> None:
    """Plain per-tensor Adam (no weight decay), the twin of the foreach and Triton updates."""
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs, strict=True):
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        p.addcdiv_(m, (v / bc2).sqrt().add_(eps), value=-lr / bc1)


def adam_update_foreach(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps) -> None:
    """CPU path: the same update with multi-tensor (foreach) ops, as torch's own foreach Adam."""
    if not params:
        return
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, math.sqrt(bc2))
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, -lr / bc1)


def mask_decay_reference(param: torch.Tensor, mask: torch.Tensor | None, factor: float) -> None:
    if mask is not None:
        param.mul_(mask)
    if factor != 1.0:
        param.mul_(factor)


class SparseAdam(torch.optim.Optimizer):
    """Adam (betas, eps per group) whose step also projects and decays, through `kernels`.

    Set each group's `lr` and the optimizer's `densities` ({"matrix": d, "embedding": d, "bias": d})
    before `step()`. `masks` holds the last mask of every projected tensor.
    """

    def __init__(self, groups: list[dict], specs: dict[torch.Tensor, SparseSpec], *, betas: tuple[float, float],
                 weight_decay: float, floor: int, kernels) -> None:
        super().__init__(groups, {"lr": 1e-3, "betas": betas, "eps": 1e-8})
        self.specs, self.weight_decay, self.floor, self.kernels = specs, weight_decay, floor, kernels
        self.densities = {"matrix": 1.0, "embedding": 1.0, "bias": 1.0}
        self.masks: dict[torch.Tensor, torch.Tensor] = {}
        self.timings: dict[str, float] = {}  # seconds of the last step: adam_s, topk_s, mask_decay_s

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> None:
        assert closure is None, "SparseAdam takes no closure"
        start = time.perf_counter()
        for group in self.param_groups:
            self._adam(group)
        timings = {"adam_s": time.perf_counter() - start, "topk_s": 0.0, "mask_decay_s": 0.0}
        for group in self.param_groups:
            factor = 1.0 - group["lr"] * self.weight_decay
            for p in group["params"]:
                spec = self.specs.get(p)
                if spec is None:
                    continue
                density = self.densities[spec.group]
                mask = None
                tick = time.perf_counter()
                if density < 1.0:
                    k = keep_count(p.numel(), density)
                    mask = self.kernels.topk_mask(p, k, floor=self.floor, floor_dim=spec.floor_dim)
                    self.masks[p] = mask
                tock = time.perf_counter()
                self.kernels.mask_decay(p, mask, factor if spec.decay else 1.0)
                timings["topk_s"] += tock - tick
                timings["mask_decay_s"] += time.perf_counter() - tock
        self.timings = timings

    def _adam(self, group: dict) -> None:
        params, grads, exp_avgs, exp_avg_sqs = [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float64)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
        if not params:
            return
        step = int(self.state[params[0]]["step"])
        beta1, beta2 = group["betas"]
        self.kernels.adam_update(params, grads, exp_avgs, exp_avg_sqs, step=step, lr=group["lr"],
                                 beta1=beta1, beta2=beta2, eps=group["eps"])
