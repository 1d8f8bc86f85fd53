"""The fused sparse optimizer step (METHOD.md 3): Adam update, top-k projection and decoupled decay
in one call per step, with the per-tensor work done by the dispatched kernels.

Per tensor: (1) Adam moments and parameter update (foreach ops on CPU, one Triton pass on GPU),
(2) the top-k mask of the updated weights (threshold top-k), (3) mask and decay applied together
(p <- mask * p * (1 - lr * wd); one Triton pass on GPU). Zeroed weights keep their dense moments and
gradient, so they can come back. Decay applies to weight matrices (embeddings included) only.
"""

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from kernels import sparse_compute as sc
from kernels.topk import keep_count


@dataclass(frozen=True)
class SparseSpec:
    group: str  # "matrix" | "embedding" | "bias": which density applies
    floor_dim: int | None  # the per-neuron floor's dim, None for no floor
    decay: bool  # decoupled weight decay applies (weight matrices)
    module: torch.nn.Module | None = None  # the masked linear whose forward applies it (sparse compute's seam)


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


def composed_projection(topk_mask: Callable, mask_decay: Callable) -> Callable:
    """A projection (`Kernels.project`) made of a top-k mask search, then the mask-and-decay pass."""
    def project(param, k, *, floor, floor_dim, factor):
        mask = None if k is None else topk_mask(param, k, floor=floor, floor_dim=floor_dim)
        mask_decay(param, mask, factor)
        return mask

    return project


@torch.no_grad()
def normalize_grad_rms_(
    grads: list[torch.Tensor], mode: str, *, numel: int | None = None, rms: float | None = None
) -> float:
    """Scale the global gradient so its RMS is 1 (rescale: always, as the released code) or at most 1
    (clip: the paper's wording); returns the RMS before. METHOD.md 3: essential for stability.

    A sharding engine that steps the optimizer one parameter group at a time passes the global `rms`
    it computed over all groups and ranks; otherwise it is computed from `grads` (over `numel`).
    """
    if rms is None:
        sumsq = sum(((g.double() ** 2).sum().cpu() for g in grads), torch.zeros((), dtype=torch.float64))
        total = numel if numel is not None else sum(g.numel() for g in grads)
        rms = float(torch.sqrt(sumsq / max(total, 1)))
    if mode == "rescale":
        scale = 1.0 / (rms + 1e-5)
    elif mode == "clip":
        scale = 1.0 / rms if rms > 1.0 else 1.0
    else:
        scale = 1.0
    if scale != 1.0 and grads:
        torch._foreach_mul_(grads, scale)
    return rms


def _takes_sparse_step(p: torch.Tensor, spec: SparseSpec, density: float) -> bool:
    """Whether a tensor at `density` trains through the sparse step: a masked linear's matrix, below dense,
    where the dispatch rule (`sparse_compute.pays`) says it pays on its device."""
    return (spec.module is not None and hasattr(spec.module, "active") and p.dim() == 2 and density < 1.0
            and sc.pays(density, p.device))


class SparseAdam(torch.optim.Optimizer):
    """Adam (betas, eps per group) whose step first normalizes the global gradient RMS, then updates,
    projects and decays, through `kernels`.

    Call `schedule(lr, densities)` ({"matrix": d, "embedding": d, "bias": d}) before each `step()`. A
    sharding engine that steps one parameter group at a time gives the gradient RMS over all groups and
    ranks through `use_global_rms(fn)`. `masks` holds the last mask of every projected tensor, `grad_rms` the last RMS.
    Under a sharding engine the params become flat partitions that `specs` does not name: the step
    then only normalizes and updates, and the engine projects through its master weights.
    State is created for every parameter by `init_state()` (DeepSpeed links its views of the state
    after the first group's step, so every group's state must exist by then) or lazily.
    """

    def __init__(self, groups: list[dict], specs: dict[torch.Tensor, SparseSpec], *, betas: tuple[float, float],
                 weight_decay: float, floor: int, kernels, grad_rms: str = "rescale", compute: str = "exact",
                 regrow_every: int = 100, candidates: float = 1.0, targets: dict[str, float] | None = None) -> None:
        super().__init__(groups, {"lr": 1e-3, "betas": betas, "eps": 1e-8})
        self.specs, self.weight_decay, self.floor, self.kernels = specs, weight_decay, floor, kernels
        self.compute, self.regrow_every, self.candidates = compute, regrow_every, candidates
        self.targets = dict(targets or {})  # the densities the anneal ends at, per group (None: unknown)
        self.grad_rms_mode = grad_rms
        self.numel = sum(p.numel() for g in self.param_groups for p in g["params"])
        self._global_rms: Callable[[], float] | None = None
        self.densities = {"matrix": 1.0, "embedding": 1.0, "bias": 1.0}
        self.masks: dict[torch.Tensor, torch.Tensor] = {}
        self.grad_rms = float("nan")
        self.timings: dict[str, float] = {}  # seconds of the last step: adam_s, project_s
        self._pending: tuple[list[torch.Tensor], dict[torch.Tensor, torch.Tensor]] | None = None

    def schedule(self, lr: float, densities: dict[str, float]) -> None:
        """This step's learning rate (every group) and target density per tensor group."""
        for group in self.param_groups:
            group["lr"] = lr
        self.densities = dict(densities)

    def use_global_rms(self, rms: Callable[[], float]) -> None:
        """Normalize by `rms()`, the global gradient RMS of the step in progress, instead of computing it
        from the gradients this optimizer sees (a sharding engine's partitions, one group at a time)."""
        self._global_rms = rms

    @torch.no_grad()
    def gradients(self) -> list[torch.Tensor]:
        """This step's gradients: the dense ones, then each sparse-compute matrix's over its active set
        (choosing a new active set where a dense gradient arrived: `_active_grads`). `step()` calls it; an
        engine that must reduce or measure the gradients first (DeepSpeed, for a part split off with
        `split_sparse_compute`) calls it before `step()`, which then uses what it returned."""
        active = self._active_grads() if self.compute == "sparse" else {}
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        self._pending = (grads, active)
        return grads + list(active.values())

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> None:
        assert closure is None, "SparseAdam takes no closure"
        start = time.perf_counter()
        if self._pending is None:
            self.gradients()
        grads, active = self._pending
        self._pending = None
        rms = self._global_rms() if self._global_rms is not None else None
        numel = self.numel
        if active:  # the RMS over the entries that have a gradient: sparse-compute matrices count their active set
            numel = sum(g.numel() for g in grads) + sum(g.numel() for g in active.values())
        self.grad_rms = normalize_grad_rms_(grads + list(active.values()), self.grad_rms_mode, numel=numel, rms=rms)
        for group in self.param_groups:
            self._adam(group)
        timings = {"adam_s": time.perf_counter() - start, "project_s": 0.0}
        for group in self.param_groups:
            for p in group["params"]:
                if p in active:
                    self._sparse_update(p, active[p], group, timings)
                elif p in self.specs and "active_index" not in self.state[p]:
                    self.project_(p, p, group["lr"], timings)
        self.timings = timings

    # --- the L0-following step (sparsity.compute=sparse; kernels/sparse_compute.py) -------------------------
    def split_sparse_compute(self) -> "SparseAdam | None":
        """Move the matrices the sparse step will take (their group's target density passes the dispatch
        rule on their device) into a new optimizer of the same settings, and return it (None if there are
        none). This one keeps the rest and the exact step. A sharding engine calls it before it shards: ZeRO
        would flatten those matrices into dense partitions with dense Adam state, while the sparse step
        keeps their state on the active entries and updates them in place. Call it before any step."""
        if self.compute != "sparse" or any(self.state.values()):
            return None

        moved = {p for p, spec in self.specs.items() if _takes_sparse_step(p, spec, self.targets.get(spec.group, 1.0))}
        if not moved:
            return None
        groups = []
        for group in self.param_groups:
            mine = [p for p in group["params"] if p in moved]
            if mine:
                groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": mine})
                group["params"] = [p for p in group["params"] if p not in moved]
        self.param_groups = [g for g in self.param_groups if g["params"]]
        specs = {p: self.specs.pop(p) for p in list(self.specs) if p in moved}
        self.numel = sum(p.numel() for g in self.param_groups for p in g["params"])
        self.compute = "exact"
        return SparseAdam(groups, specs, betas=self.defaults["betas"], weight_decay=self.weight_decay,
                          floor=self.floor, kernels=self.kernels, grad_rms=self.grad_rms_mode, compute="sparse",
                          regrow_every=self.regrow_every, candidates=self.candidates, targets=self.targets)

    def _active_grads(self) -> dict[torch.Tensor, torch.Tensor]:
        """Each sparse-compute matrix's gradient over its active set. A matrix enters the mode at the first
        step whose density the dispatch rule (`sparse_compute.pays`) takes, from a dense step; a dense
        gradient (that step, and every regrow step) first re-chooses the active set (`_regrow`)."""
        out = {}
        for p, spec in self.specs.items():
            module, density = spec.module, self.densities.get(spec.group, 1.0)
            if getattr(module, "active", None) is None:  # not in the mode yet: enter it from a dense step
                if p.grad is None or not _takes_sparse_step(p, spec, density) or module.mask is None:
                    continue
            if p.grad is not None:  # a dense step: the regrow pass
                out[p] = self._regrow(p, spec, density)
            else:
                grad = module.active.take_grad()
                if grad is not None:
                    out[p] = grad
        return out

    def _regrow(self, p: torch.Tensor, spec: SparseSpec, density: float) -> torch.Tensor:
        module, state = spec.module, self.state[p]
        k = keep_count(p.numel(), density)
        index = sc.grow(module.mask, p.grad, sc.candidate_count(k, self.candidates))
        if "active_index" in state:  # moments of entries that stay active carry over; new ones start at zero
            old = state["active_index"]
            state["active_exp_avg"] = sc.carry(old, state["active_exp_avg"], index)
            state["active_exp_avg_sq"] = sc.carry(old, state["active_exp_avg_sq"], index)
        else:  # from the exact recipe's dense moments, which are dropped
            self.init_state([p])
            state["active_exp_avg"] = state.pop("exp_avg").reshape(-1)[index].clone()
            state["active_exp_avg_sq"] = state.pop("exp_avg_sq").reshape(-1)[index].clone()
        state["active_index"] = index
        grad = p.grad.reshape(-1)[index]
        p.grad = None
        module.active = sc.ActiveSet(tuple(p.shape), index, module.mask.reshape(-1)[index])
        return grad

    def _sparse_update(self, p: torch.Tensor, grad: torch.Tensor, group: dict, timings: dict) -> None:
        """Adam over the active entries, the top-k projection over them, decay; scattered into the dense
        parameter and its mask (O(active) writes)."""
        spec, state = self.specs[p], self.state[p]
        module, index = spec.module, state["active_index"]
        tick = time.perf_counter()
        state["step"] += 1
        values = p.detach().reshape(-1)[index]
        beta1, beta2 = group["betas"]
        self.kernels.adam_update([values], [grad], [state["active_exp_avg"]], [state["active_exp_avg_sq"]],
                                 step=int(state["step"]), lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"])
        timings["adam_s"] += time.perf_counter() - tick
        tick = time.perf_counter()
        k = keep_count(p.numel(), self.densities.get(spec.group, 1.0))
        kept = sc.project_active(values, module.active, k, self.floor, spec.floor_dim)
        values.mul_(kept)
        if spec.decay:
            values.mul_(1.0 - group["lr"] * self.weight_decay)
        p.detach().view(-1).index_copy_(0, index, values)
        module.mask.view(-1).index_copy_(0, index, kept)
        module.active.set_kept(kept)
        module.active.regrow = int(state["step"]) % self.regrow_every == 0
        self.masks[p] = module.mask
        timings["project_s"] += time.perf_counter() - tick

    def sync_modules(self) -> None:
        """After a state load: give each sparse-compute matrix's module its active set back (from the
        optimizer state and the module's mask), or take it away where the state has none."""
        for p, spec in self.specs.items():
            if spec.module is None or not hasattr(spec.module, "active"):
                continue
            state = self.state.get(p, {})
            if "active_index" in state and spec.module.mask is not None:
                index = state["active_index"]
                spec.module.active = sc.ActiveSet(tuple(p.shape), index, spec.module.mask.reshape(-1)[index])
                spec.module.active.regrow = int(state["step"]) % self.regrow_every == 0
                self.masks[p] = spec.module.mask
            else:
                spec.module.active = None

    @torch.no_grad()
    def project_(self, param: torch.Tensor, full: torch.Tensor, lr: float, timings: dict | None = None) -> None:
        """Top-k projection and decoupled decay of `full`, the values of `param` (the parameter itself, or
        a sharding engine's gathered fp32 master copy of it), in place; records the mask."""
        spec = self.specs[param]
        density = self.densities.get(spec.group, 1.0)
        k = keep_count(full.numel(), density) if density < 1.0 else None
        tick = time.perf_counter()
        mask = self.kernels.project(full, k, floor=self.floor, floor_dim=spec.floor_dim,
                                    factor=1.0 - lr * self.weight_decay if spec.decay else 1.0)
        if mask is not None:
            self.masks[param] = mask
        if timings is not None:
            timings["project_s"] += time.perf_counter() - tick

    def init_state(self, params: Iterable[torch.Tensor] | None = None) -> None:
        """Zero Adam state for every parameter of the groups (or for `params`, tensors a sharding engine
        swaps into the groups only while it steps) that has none yet: the same as lazy creation."""
        if params is None:
            params = [p for group in self.param_groups for p in group["params"]]
        for p in params:
            if not self.state[p]:
                self.state[p]["step"] = torch.zeros((), dtype=torch.float64)
                self.state[p]["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                self.state[p]["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _adam(self, group: dict) -> None:
        params, grads, exp_avgs, exp_avg_sqs = [], [], [], []
        self.init_state()
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
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
