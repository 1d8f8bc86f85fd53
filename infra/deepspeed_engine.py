"""DeepSpeed engine: ZeRO stage 0..3 around the fused sparse Adam (a client optimizer, so no C++ op
is compiled on CPU).

The trap (verified here): under ZeRO 1-3 the optimizer keeps its own fp32 master copy, so zeroing
`engine.module` weights in place is undone at the next step. After each optimizer step this engine
therefore projects through the master weights: `safe_get_full_fp32_param` on every rank, the same
top-k mask everywhere (a deterministic function of identical data), decay, `safe_set_full_fp32_param`,
and the same values into the module's copy. Under stage 0 there is no master copy and the optimizer
projects the real parameters itself.

DeepSpeed internals this engine relies on (not public API; `DEEPSPEED_INTERNALS` names them, the
version range in pyproject.toml pins them, tests/infra/test_deepspeed_internals.py checks them):
- the ZeRO optimizer's `_global_grad_norm` (stages 1-3), set before it steps our optimizer one
  parameter group at a time: the gradient RMS over all groups and ranks comes from it;
- `DeepSpeedZeroOptimizer._lazy_init_hp_params_optimizer_state()` (stages 1-2), which links the fp32
  optimizer-state views that `safe_set_full_optimizer_state` writes; called at once, or a resume
  before the first step could not restore the Adam moments;
- `DeepSpeedZeroOptimizer_Stage3.fp32_partitioned_groups_flat` (stage 3): the flat fp32 partitions it
  swaps into our optimizer's groups only while stepping; their Adam state is created up front for the
  same reason.
Everything else is public: `deepspeed.initialize`, `engine.backward/step`, `deepspeed.utils.safe_*`,
`deepspeed.zero.GatheredParameters`.

`sparsity.compute=sparse` (ZeRO 1 and 2, fp32): the matrices the sparse step will take are split off the
optimizer before DeepSpeed sees it (`SparseAdam.split_sparse_compute`), so ZeRO never flattens them into
dense partitions with dense Adam state. They stay ordinary module parameters, replicated like every
parameter under ZeRO 1-2; this engine averages their gradients over the ranks itself (the dense gradient
on exact and regrow steps, the active entries' otherwise: one collective per step), and the split-off
optimizer updates and projects them in place with Adam state on their active entries, normalized by the
one gradient RMS over both parts. Their state is saved and loaded as the plain-torch engine does it.
"""

import math
import time

import torch
from torch import nn

from infra.distributed import accelerator_env, all_reduce_mean, all_reduce_mean_, init_process_group
from infra.engine_base import DeepSpeedConfig, LossFn, load_masks, mask_tensors

_MOMENTS = ("exp_avg", "exp_avg_sq")
# class -> the private members of it this engine uses (see the module docstring)
DEEPSPEED_INTERNALS = {
    "deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer": ("_global_grad_norm",
                                                                    "_lazy_init_hp_params_optimizer_state"),
    "deepspeed.runtime.zero.stage3.DeepSpeedZeroOptimizer_Stage3": ("_global_grad_norm",
                                                                    "fp32_partitioned_groups_flat"),
}


def _global_grad_norm(zero) -> float:
    """The ZeRO optimizer's global gradient norm of the step in progress (a DeepSpeed internal)."""
    return float(zero._global_grad_norm)


def _fp32_partitions(zero) -> list[torch.Tensor]:
    """ZeRO 3's flat fp32 partitions, the tensors its optimizer state is keyed by (a DeepSpeed internal)."""
    return list(zero.fp32_partitioned_groups_flat)


def _link_optimizer_state(zero) -> None:
    """Link ZeRO 1/2's fp32 optimizer-state views now rather than after the first step (a DeepSpeed
    internal; stage 3 links them when it builds the state)."""
    link = getattr(zero, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()


class DeepSpeedEngine:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: DeepSpeedConfig, *,
                 micro_batch: int, grad_accum: int, attach_masks) -> None:
        accelerator_env()
        import deepspeed  # after accelerator_env(): DeepSpeed picks its accelerator when imported

        self.rank, self.world_size = init_process_group(cfg.backend)
        self.stage, self.sparse, self.attach_masks = cfg.zero_stage, optimizer, attach_masks
        # sparsity.compute=sparse: the matrices the sparse step takes, kept out of ZeRO (module docstring)
        self.side = optimizer.split_sparse_compute() if hasattr(optimizer, "split_sparse_compute") else None
        if self.side is not None and (cfg.zero_stage not in (1, 2) or cfg.precision != "fp32"):
            raise ValueError(
                f"sparsity.compute: sparse runs under DeepSpeed ZeRO 1 or 2 in fp32 (got zero_stage "
                f"{cfg.zero_stage}, {cfg.precision}): stage 0 would average the active matrices' gradients "
                "a second time, stage 3 shards their weights, and bf16 leaves them without an fp32 master copy")
        self._side_grads: tuple[float, int] = (0.0, 0)  # the split-off part's gradient (sum of squares, count)
        config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": grad_accum,
            "zero_optimization": {"stage": cfg.zero_stage},
            "zero_allow_untested_optimizer": True,  # our fused sparse Adam
            "gradient_clipping": 0.0,  # the optimizer normalizes the gradient RMS itself
            "bf16": {"enabled": cfg.precision == "bf16"},
            "steps_per_print": 1 << 30,
        }
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        self.module = self.engine.module
        self.names = list(model.named_parameters())
        if self.stage >= 1:
            # ZeRO steps the optimizer one parameter group at a time, after computing the global
            # gradient norm over all groups and ranks: normalize every group by that one RMS.
            zero = self.engine.optimizer

            def global_rms() -> float:  # over ZeRO's groups on every rank and the split-off part
                sumsq, count = self._side_grads
                return math.sqrt((_global_grad_norm(zero) ** 2 + sumsq) / (optimizer.numel + count))

            optimizer.use_global_rms(global_rms)
            if self.side is not None:
                self.side.use_global_rms(global_rms)
            # ZeRO links its state views after the first group's step, so create and link them now, or a
            # resume before the first step could not restore the Adam moments
            optimizer.init_state(_fp32_partitions(zero) if self.stage == 3 else None)
            _link_optimizer_state(zero)
        self._deepspeed = deepspeed
        self._utils = deepspeed.utils

    def forward_backward(self, micro_batches: list[torch.Tensor], loss_fn: LossFn) -> float:
        if self.side is not None:
            self.side.zero_grad(set_to_none=True)  # ZeRO clears only its own groups' gradients
        total = 0.0
        for i, batch in enumerate(micro_batches):
            loss = loss_fn(self.engine, batch)
            self.engine.backward(loss)  # DeepSpeed divides by the accumulation steps
            if i < len(micro_batches) - 1:
                self.engine.step()  # not a boundary: DeepSpeed only advances its counters
            total += loss.item()
        return all_reduce_mean(total / len(micro_batches))

    def step(self, lr: float, densities: dict[str, float]) -> dict[str, float]:
        self.sparse.schedule(lr, densities)
        if self.side is not None:
            self.side.schedule(lr, densities)
            self._reduce_side_gradients()
        self.engine.step()
        timings = dict(self.sparse.timings)
        if self.stage >= 1:
            start = time.perf_counter()
            self._project(lr)
            timings["project_s"] = time.perf_counter() - start  # with its gathers
        masks = self.sparse.masks
        if self.side is not None:
            self.side.step()
            for key, seconds in self.side.timings.items():
                timings[key] = timings.get(key, 0.0) + seconds
            masks = {**masks, **self.side.masks}
        self.attach_masks(masks)
        return {"grad_rms": self.sparse.grad_rms, **timings}

    @torch.no_grad()
    def _reduce_side_gradients(self) -> None:
        """Average the split-off matrices' gradients over the ranks before their optimizer reads them: the
        dense gradients (exact and regrow steps; a regrow picks its candidates from them, identically on
        every rank) and the active entries' gradients, in one collective; then record their size for the
        global RMS. Every rank holds the same active sets, so the tensors line up."""
        side = self.side
        dense = [p.grad for g in side.param_groups for p in g["params"] if p.grad is not None]
        active = [spec.module.active.grad for spec in side.specs.values()
                  if spec.module.active is not None and spec.module.active.grad is not None]
        all_reduce_mean_(dense + active)
        grads = side.gradients()
        sumsq = sum(float((g.double() ** 2).sum()) for g in grads)
        self._side_grads = (sumsq, sum(g.numel() for g in grads))

    @torch.no_grad()
    def _project(self, lr: float) -> None:
        """Project and decay through the fp32 master weights, identically on every rank."""
        for _, p in self.names:
            if p not in self.sparse.specs:
                continue
            full = self._utils.safe_get_full_fp32_param(p)  # a collective under ZeRO: every rank, same order
            self.sparse.project_(p, full, lr)
            self._set_weight(p, full)

    def full_state(self, *, every_rank: bool = False) -> dict[str, torch.Tensor]:
        """The full state on rank 0 and {} on the others (unless `every_rank`). Under ZeRO each tensor is
        gathered by a collective in which every rank takes part; a rank other than 0 drops each gathered
        tensor at once, so at the paper's widths it holds one parameter's full copy at a time, not the
        whole model and both Adam moments (about 19.5 GB per rank at ef 16)."""
        keep = every_rank or self.rank == 0
        if not keep and self.stage == 0:
            return {}  # no collective at stage 0: each rank holds the whole model already
        tensors: dict[str, torch.Tensor] = {}
        step = self._step_count()
        for name, p in self.names:
            if self.side is not None and p in self.side.specs:  # split off: replicated, not sharded
                if keep:
                    tensors[f"model/{name}"] = p.detach().clone()
                    tensors.update({f"optim/{name}/{k}": v.clone() for k, v in self.side.state.get(p, {}).items()})
                continue
            if self.stage == 0:
                tensors[f"model/{name}"] = p.detach().clone()
                state = self.sparse.state.get(p, {})
                moments = {k: state[k] for k in _MOMENTS if k in state}
            else:
                weight = self._utils.safe_get_full_fp32_param(p)
                moments = {k: self._utils.safe_get_full_optimizer_state(p, k) for k in _MOMENTS} if step else {}
                if not keep:
                    del weight, moments
                    continue
                tensors[f"model/{name}"] = weight
            for key, value in moments.items():
                tensors[f"optim/{name}/{key}"] = value
            if step:
                tensors[f"optim/{name}/step"] = torch.tensor(float(step), dtype=torch.float64)
        if not keep:
            return {}
        params = {n for n, _ in self.names}
        for key, value in self.module.state_dict().items():
            if key not in params:  # persistent buffers (a fixed bigram table)
                tensors[f"model/{key}"] = value
        tensors.update(mask_tensors(self.module))
        tensors["rng/torch"] = torch.get_rng_state()
        return tensors

    def load_full_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.sparse.init_state()  # in place: ZeRO holds views of these tensors
        for name, p in self.names:
            value = tensors[f"model/{name}"]
            if self.side is not None and p in self.side.specs:  # split off: as the plain-torch engine loads it
                p.data.copy_(value.to(device=p.device, dtype=p.dtype))
                prefix = f"optim/{name}/"
                self.side.state[p] = {k[len(prefix):]: v if k.endswith("/step") else v.to(p.device)
                                      for k, v in tensors.items() if k.startswith(prefix)}
                continue
            self._set_weight(p, value)
            for key in _MOMENTS:
                if f"optim/{name}/{key}" not in tensors:
                    continue
                moment = tensors[f"optim/{name}/{key}"]
                if self.stage == 0:
                    self.sparse.state[p][key] = moment.clone()
                else:
                    self._utils.safe_set_full_optimizer_state(p, moment, key)
        steps = [v for k, v in tensors.items() if k.startswith("optim/") and k.endswith("/step")]
        if steps:
            for state in self.sparse.state.values():
                state["step"].copy_(steps[0])
        params = {n for n, _ in self.names}
        buffers = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/") and k[6:] not in params}
        if buffers:
            self.module.load_state_dict(buffers, strict=False)
        load_masks(self.module, tensors, next(self.module.parameters()).device)
        if self.side is not None:
            self.side.sync_modules()  # the active sets follow the loaded state
        torch.set_rng_state(tensors["rng/torch"])

    def _step_count(self) -> int:
        for state in self.sparse.state.values():
            if "step" in state:
                return int(state["step"])
        return 0

    def _set_weight(self, p: nn.Parameter, value: torch.Tensor) -> None:
        value = value.to(device=p.device, dtype=torch.float32)
        if self.stage >= 1:
            self._utils.safe_set_full_fp32_param(p, value)
        if self.stage == 3:
            with self._deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if self.rank == 0:
                    p.data.copy_(value.to(p.dtype))
        else:
            p.data.copy_(value.to(p.dtype))
