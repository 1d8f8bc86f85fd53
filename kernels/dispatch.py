"""One dispatch: the kernel set is chosen once, from the device and a config value, and handed to the
model and optimizer; `forward` never branches on it.

- cuda (what auto picks on a GPU): the masked-linear autograd function on cuBLAS, Triton Adam and
  mask-and-decay passes, torch.topk masks (on CUDA already a radix select). Measured on an H100: the
  Triton masked-linear GEMM (fp32, autotuned) ran 3.4x slower than cuBLAS fp32, and our threshold
  top-k 1.4 ms against torch.topk's 0.4 ms on a 4096 x 1024 weight, so neither is the GPU default.
- triton: every op that has a Triton kernel uses it (masked linear included); CUDA only.
- cpu (what auto picks on a CPU): the masked-linear autograd function, foreach Adam, and the projection
  (top-k mask, zeroing, decay) as one native pass per tensor (kernels/cpu_projection.py), the threshold
  top-k where that cannot be built.
- reference: the plain-torch twins every fast path is tested against.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from kernels.cpu_projection import project_native
from kernels.masked_linear import masked_linear_reference, masked_linear_torch
from kernels.optimizer import adam_update_foreach, adam_update_reference, composed_projection, mask_decay_reference
from kernels.sparse_inference import sparse_linear
from kernels.topk import threshold_topk_mask, topk_mask_reference

Backend = Literal["auto", "cuda", "triton", "cpu", "reference"]


@dataclass(frozen=True)
class Kernels:
    name: str
    linear: Callable  # (x, weight, mask | None, bias | None) -> y, dense weight gradient
    topk_mask: Callable  # (weight, k, *, floor, floor_dim) -> bool mask with exactly k entries
    adam_update: Callable  # (params, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps)
    mask_decay: Callable  # (param, mask | None, factor) -> None, in place
    sparse_linear: Callable  # (x, csr weight, bias | None) -> y, forward-only weights
    # (param, k | None, *, floor, floor_dim, factor) -> mask | None, in place: the top-k mask of param, then
    # param <- mask * param * factor (decay only when k is None); what the optimizer step calls
    project: Callable | None = None

    def __post_init__(self) -> None:
        if self.project is None:  # the mask search and the mask-and-decay pass, one after the other
            object.__setattr__(self, "project", composed_projection(self.topk_mask, self.mask_decay))


def select_kernels(device: torch.device | str, backend: Backend = "auto") -> Kernels:
    device = torch.device(device)
    if backend == "auto":
        backend = "cuda" if device.type == "cuda" else "cpu"
    if backend in ("cuda", "triton"):
        if device.type != "cuda":
            raise ValueError(f"model.kernels: {backend} needs a CUDA device, got {device}; use cpu or auto")
        # triton only where its kernels run: it is a Linux-only dependency, and importing it costs seconds
        from kernels.triton_linear import masked_linear_triton
        from kernels.triton_optimizer import adam_update_triton, mask_decay_triton

        linear = masked_linear_triton if backend == "triton" else masked_linear_torch
        return Kernels(backend, linear, topk_mask_reference, adam_update_triton, mask_decay_triton, sparse_linear)
    if backend == "cpu":
        return Kernels("cpu", masked_linear_torch, threshold_topk_mask, adam_update_foreach, mask_decay_reference,
                       sparse_linear, project_native)
    if backend == "reference":
        return Kernels("reference", masked_linear_reference, topk_mask_reference, adam_update_reference,
                       mask_decay_reference, sparse_linear)
    raise ValueError(f"model.kernels: unknown backend {backend!r}")
