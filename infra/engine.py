"""The one seam that wraps a model for training: `wrap()` returns an engine with one protocol, a
plain-torch engine for one process or a DeepSpeed engine (ZeRO stage 0..3) for one or many.

Engines take the model and its optimizer ready-made (inject, don't construct). The optimizer is the
fused sparse Adam: it normalizes the gradient RMS, updates, and (on real parameters) projects and
decays. Full state for checkpoints is exchanged as named tensors in one engine-agnostic layout
(infra/engine_base.py), so a run can resume on another worker count.
"""

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from infra.engine_base import DeepSpeedConfig, LossFn, load_masks, mask_tensors

__all__ = ["DeepSpeedConfig", "Engine", "LossFn", "TorchEngine", "wrap"]


class Engine(Protocol):
    module: nn.Module
    rank: int
    world_size: int

    def forward_backward(self, micro_batches: list[torch.Tensor], loss_fn: LossFn) -> float:
        """Accumulate gradients over the micro-batches; returns the mean loss (over ranks too)."""
        ...

    def step(self, lr: float, densities: dict[str, float]) -> dict[str, float]:
        """Normalize, update, project and decay; returns grad_rms and phase timings."""
        ...

    def full_state(self, *, every_rank: bool = False) -> dict[str, torch.Tensor]:
        """Every tensor a bit-exact resume needs, on rank 0 ({} on the others unless `every_rank`); a
        collective under DeepSpeed: call it on all ranks."""
        ...

    def load_full_state(self, tensors: dict[str, torch.Tensor]) -> None:
        ...


class TorchEngine:
    """Single-process training: plain autograd and the fused sparse Adam on the real parameters."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, attach_masks: Callable[[dict], None]):
        self.module, self.optimizer, self.attach_masks = model, optimizer, attach_masks
        self.rank, self.world_size = 0, 1

    def forward_backward(self, micro_batches: list[torch.Tensor], loss_fn: LossFn) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for batch in micro_batches:
            loss = loss_fn(self.module, batch) / len(micro_batches)
            loss.backward()
            total += loss.item()
        return total

    def step(self, lr: float, densities: dict[str, float]) -> dict[str, float]:
        self.optimizer.schedule(lr, densities)
        self.optimizer.step()
        self.attach_masks(self.optimizer.masks)
        return {"grad_rms": self.optimizer.grad_rms, **self.optimizer.timings}

    def full_state(self, *, every_rank: bool = False) -> dict[str, torch.Tensor]:
        tensors = {f"model/{k}": v for k, v in self.module.state_dict().items()}
        names = {p: n for n, p in self.module.named_parameters()}
        for p, state in self.optimizer.state.items():
            for key, value in state.items():
                tensors[f"optim/{names[p]}/{key}"] = value
        tensors.update(mask_tensors(self.module))
        tensors["rng/torch"] = torch.get_rng_state()
        return tensors

    def load_full_state(self, tensors: dict[str, torch.Tensor]) -> None:
        device = next(self.module.parameters()).device
        self.module.load_state_dict({k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")})
        params = dict(self.module.named_parameters())
        for key, value in tensors.items():
            if key.startswith("optim/"):
                name, field = key[len("optim/"):].rsplit("/", 1)
                self.optimizer.state[params[name]][field] = value if field == "step" else value.to(device)
        load_masks(self.module, tensors, device)
        if hasattr(self.optimizer, "sync_modules"):  # sparse compute's active sets follow the loaded state
            self.optimizer.sync_modules()
        torch.set_rng_state(tensors["rng/torch"])


def wrap(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    engine: str,
    cfg: DeepSpeedConfig,
    micro_batch: int,
    grad_accum: int,
    attach_masks: Callable[[dict], None],
) -> Engine:
    """The one wrapping function: `engine` is "torch" or "deepspeed"."""
    if engine == "torch":
        return TorchEngine(model, optimizer, attach_masks)
    # deepspeed (seconds to import, and it picks its accelerator then) only when a DeepSpeed engine is asked for
    from infra.deepspeed_engine import DeepSpeedEngine

    return DeepSpeedEngine(model, optimizer, cfg, micro_batch=micro_batch, grad_accum=grad_accum,
                           attach_masks=attach_masks)
