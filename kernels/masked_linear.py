"""Masked linear: y = x @ (W * M)^T + b with the dense gradient for W (straight-through), so pruned
weights keep receiving gradient and can regrow (METHOD.md 3: gradients and Adam moments stay dense).

`W * M` is never a graph tensor: the torch path forms it inside the autograd function and runs the
vendor GEMM (MKL/oneDNN on CPU, cuBLAS on GPU); the Triton path (kernels/triton_linear.py) applies the
mask while loading tiles.
"""

import torch
import torch.nn.functional as F


def masked_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    """Plain-torch twin: the straight-through form W + (W*M - W).detach() has value W*M, gradient I."""
    if mask is None:
        return F.linear(x, weight, bias)
    return F.linear(x, weight + (weight * mask - weight).detach(), bias)


class _MaskedLinearTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, mask, bias):
        with torch.no_grad():
            masked = weight * mask
        ctx.save_for_backward(x, masked)
        ctx.has_bias = bias is not None
        return F.linear(x, masked, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, masked = ctx.saved_tensors
        grad_x = grad_out @ masked  # (..., in)
        flat_out = grad_out.reshape(-1, grad_out.shape[-1])
        grad_w = flat_out.t() @ x.reshape(-1, x.shape[-1])  # dense: no mask (straight-through)
        grad_b = flat_out.sum(0) if ctx.has_bias else None
        return grad_x, grad_w, None, grad_b


def masked_linear_torch(
    x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    if mask is None:
        return F.linear(x, weight, bias)
    return _MaskedLinearTorch.apply(x, weight, mask, bias)
