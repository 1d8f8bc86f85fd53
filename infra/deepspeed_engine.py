"""DeepSpeed engine: ZeRO stage 0..3 around the fused sparse Adam (a client optimizer, so no C++ op
is compiled on CPU).

The trap (verified here): under ZeRO 1-3 the optimizer keeps its own fp32 master copy, so zeroing
`engine.module` weights in place is undone at the next step. After each optimizer step this engine
therefore projects through the master weights: `safe_get_full_fp32_param` on every rank, the same
top-k mask everywhere (a deterministic function of identical data), decay, `safe_set_full_fp32_param`,
and the same values into the module's copy. Under stage 0 there is no master copy and the optimizer
projects the real parameters itself.
"""

import math
import time

import torch
from torch import nn

from infra.distributed import accelerator_env, all_reduce_mean, init_process_group
from infra.engine import DeepSpeedConfig, LossFn, _load_masks, _mask_tensors

_MOMENTS = ("exp_avg", "exp_avg_sq")


class DeepSpeedEngine:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: DeepSpeedConfig, *,
                 micro_batch: int, grad_accum: int, attach_masks) -> None:
        accelerator_env()
        import deepspeed

        self.rank, self.world_size = init_process_group(cfg.backend)
        self.stage, self.sparse, self.attach_masks = cfg.zero_stage, optimizer, attach_masks
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
            optimizer.global_rms = lambda: float(zero._global_grad_norm) / math.sqrt(optimizer.numel)
            optimizer.init_state()  # ZeRO links its state views after the first group's step ...
            link = getattr(self.engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
            if link is not None:  # ... so link them now, or a resume could not set them (ZeRO 1/2)
                link()
        self._deepspeed = deepspeed

    def forward_backward(self, micro_batches: list[torch.Tensor], loss_fn: LossFn) -> float:
        total = 0.0
        for i, batch in enumerate(micro_batches):
            loss = loss_fn(self.engine, batch)
            self.engine.backward(loss)  # DeepSpeed divides by the accumulation steps
            if i < len(micro_batches) - 1:
                self.engine.step()  # not a boundary: DeepSpeed only advances its counters
            total += loss.item()
        return all_reduce_mean(total / len(micro_batches))

    def step(self, lr: float, densities: dict[str, float]) -> dict[str, float]:
        for group in self.sparse.param_groups:
            group["lr"] = lr
        self.sparse.densities = densities
        self.engine.step()
        timings = dict(self.sparse.timings)
        if self.stage >= 1:
            start = time.perf_counter()
            self._project(lr)
            timings["topk_s"] = time.perf_counter() - start
        self.attach_masks(self.sparse.masks)
        return {"grad_rms": self.sparse.grad_rms, **timings}

    @torch.no_grad()
    def _project(self, lr: float) -> None:
        """Project and decay through the fp32 master weights, identically on every rank."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        for _, p in self.names:
            if p not in self.sparse.specs:
                continue
            full = safe_get_full_fp32_param(p)  # a collective under ZeRO: every rank, same order
            self.sparse.project_(p, full, lr)
            self._set_weight(p, full, safe_set_full_fp32_param)

    def full_state(self) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        tensors: dict[str, torch.Tensor] = {}
        step = self._step_count()
        for name, p in self.names:
            if self.stage == 0:
                tensors[f"model/{name}"] = p.detach().clone()
                state = self.sparse.state.get(p, {})
                moments = {k: state[k] for k in _MOMENTS if k in state}
            else:
                tensors[f"model/{name}"] = safe_get_full_fp32_param(p)
                moments = {k: safe_get_full_optimizer_state(p, k) for k in _MOMENTS} if step else {}
            for key, value in moments.items():
                tensors[f"optim/{name}/{key}"] = value
            if step:
                tensors[f"optim/{name}/step"] = torch.tensor(float(step), dtype=torch.float64)
        params = {n for n, _ in self.names}
        for key, value in self.module.state_dict().items():
            if key not in params:  # persistent buffers (a fixed bigram table)
                tensors[f"model/{key}"] = value
        tensors.update(_mask_tensors(self.module))
        tensors["rng/torch"] = torch.get_rng_state()
        return tensors

    def load_full_state(self, tensors: dict[str, torch.Tensor]) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        self.sparse.init_state()  # in place: ZeRO holds views of these tensors
        for name, p in self.names:
            value = tensors[f"model/{name}"]
            self._set_weight(p, value, safe_set_full_fp32_param)
            for key in _MOMENTS:
                if f"optim/{name}/{key}" not in tensors:
                    continue
                moment = tensors[f"optim/{name}/{key}"]
                if self.stage == 0:
                    self.sparse.state[p][key] = moment.clone()
                else:
                    safe_set_full_optimizer_state(p, moment, key)
        steps = [v for k, v in tensors.items() if k.startswith("optim/") and k.endswith("/step")]
        if steps:
            for state in self.sparse.state.values():
                state["step"].copy_(steps[0])
        params = {n for n, _ in self.names}
        buffers = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/") and k[6:] not in params}
        if buffers:
            self.module.load_state_dict(buffers, strict=False)
        _load_masks(self.module, tensors, next(self.module.parameters()).device)
        torch.set_rng_state(tensors["rng/torch"])


    def _step_count(self) -> int:
        for state in self.sparse.state.values():
            if "step" in state:
                return int(state["step"])
        return 0

    def _set_weight(self, p: nn.Parameter, value: torch.Tensor, set_master) -> None:
        value = value.to(device=p.device, dtype=torch.float32)
        if self.stage >= 1:
            set_master(p, value)
        if self.stage == 3:
            with self._deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if self.rank == 0:
                    p.data.copy_(value.to(p.dtype))
        else:
            p.data.copy_(value.to(p.dtype))
