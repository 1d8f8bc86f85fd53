"""The CPU projection as one native pass per tensor (kernels/csrc/projection.cpp): the top-k mask with
the per-neuron floor, the zeroing and the decay in three sweeps over memory instead of the dozen tensor
ops of the threshold path (kernels/topk.py), parallel over torch's intra-op threads.

It is compiled on first use by torch's C++ extension mechanism (a C++ compiler and ninja, both there
wherever the project installs) and cached under TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions),
as DeepSpeed builds its ops; `make setup` builds it once. Where it cannot be built, the cpu kernels fall
back to the threshold path (the same set) and say so once on stderr.
"""

import sys
import threading
from pathlib import Path

import torch

from kernels.optimizer import composed_projection, mask_decay_reference
from kernels.topk import threshold_topk_mask

SOURCE = Path(__file__).resolve().parent / "csrc" / "projection.cpp"
MAX_FLOOR = 16  # the native pass keeps each neuron's floor in a fixed-size buffer
_fallback = composed_projection(threshold_topk_mask, mask_decay_reference)  # the same set, op by op
_lock = threading.Lock()
_module = None
_error: str | None = None


def native_module():
    """The compiled extension (built on the first call, then loaded from the cache), or None if it
    cannot be built here."""
    global _module, _error
    with _lock:
        if _module is None and _error is None:
            try:
                from torch.utils.cpp_extension import load

                _module = load(name="circuitscale_projection", sources=[str(SOURCE)],
                               extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
            except Exception as err:  # noqa: BLE001 (a missing compiler, a failed build: fall back, say why)
                _error = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
                print(f"circuitscale: warning: the native CPU projection could not be built ({_error}); "
                      "using the threshold top-k path", file=sys.stderr)
    return _module


def fits(param: torch.Tensor, floor: int, floor_dim: int | None) -> bool:
    """Whether the native pass takes this tensor: contiguous float32 on the CPU, 1-dim or 2-dim (a floor
    needs 2), a floor of at most MAX_FLOOR."""
    floored = bool(floor) and floor_dim is not None
    return (param.device.type == "cpu" and param.dtype == torch.float32 and param.is_contiguous()
            and param.dim() in ((2,) if floored else (1, 2)) and floor <= MAX_FLOOR)


def project_native(param: torch.Tensor, k: int | None, *, floor: int, floor_dim: int | None,
                   factor: float) -> torch.Tensor | None:
    """In place: keep the top-k entries of `param` (each neuron's `floor` largest along `floor_dim` first),
    zero the rest, scale what is kept by `factor`; returns the mask (None when k is None: decay only)."""
    module = native_module() if k is not None and fits(param, floor, floor_dim) else None
    if module is None:
        return _fallback(param, k, floor=floor, floor_dim=floor_dim, factor=factor)
    return module.project_(param.detach(), k, floor, -1 if floor_dim is None or not floor else floor_dim, factor)
