"""Triton kernels for the masked linear (GPU; checked on CPU under TRITON_INTERPRET=1).

One tiled matmul kernel C = A @ B (+ bias), where B's entries may be masked while they are loaded,
serves all three products: forward x @ (W*M)^T, grad-input dy @ (W*M), and the dense grad-weight
dy^T @ x. Operands are passed as strided views, so no transpose is ever copied.
"""

import os

import torch
import triton
import triton.language as tl

# Tile shapes tried on the GPU (autotuned per problem shape); the interpreter runs one small tile.
_CONFIGS = [
    triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [(128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 32, 4, 4),
                             (128, 128, 64, 8, 3), (64, 64, 64, 4, 3)]
]
if os.environ.get("TRITON_INTERPRET") == "1":
    _CONFIGS = [triton.Config({"BM": 32, "BN": 32, "BK": 32})]


@triton.autotune(configs=_CONFIGS, key=["M", "N", "K", "HAS_MASK", "IEEE"])
@triton.jit
def _matmul_kernel(
    a_ptr, b_ptr, m_ptr, bias_ptr, c_ptr,
    M, N, K,
    s_am, s_ak, s_bk, s_bn, s_mk, s_mn, s_cm, s_cn,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        a_ok = (rm[:, None] < M) & (kk[None, :] < K)
        b_ok = (kk[:, None] < K) & (rn[None, :] < N)
        a = tl.load(a_ptr + rm[:, None] * s_am + kk[None, :] * s_ak, mask=a_ok, other=0.0)
        b = tl.load(b_ptr + kk[:, None] * s_bk + rn[None, :] * s_bn, mask=b_ok, other=0.0)
        if HAS_MASK:
            keep = tl.load(m_ptr + kk[:, None] * s_mk + rn[None, :] * s_mn, mask=b_ok, other=0)
            b = tl.where(keep != 0, b, 0.0)
        if IEEE:
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    c_ok = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(c_ptr + rm[:, None] * s_cm + rn[None, :] * s_cn, acc.to(c_ptr.dtype.element_ty), mask=c_ok)


def matmul(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """a (M, K) @ (b * mask) (K, N) + bias (N,), any strides; fp32 accumulation."""
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty(M, N, device=a.device, dtype=a.dtype)
    keep = mask.view(torch.uint8) if mask is not None else b
    grid = lambda meta: (triton.cdiv(M, meta["BM"]), triton.cdiv(N, meta["BN"]))  # noqa: E731
    _matmul_kernel[grid](
        a, b, keep, bias if bias is not None else b, c, M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), keep.stride(0), keep.stride(1), c.stride(0), c.stride(1),
        HAS_MASK=mask is not None, HAS_BIAS=bias is not None, IEEE=a.dtype == torch.float32,
    )
    return c


class _MaskedLinearTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, mask, bias):
        flat = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(flat, weight, mask)
        ctx.has_bias, ctx.shape = bias is not None, x.shape
        y = matmul(flat, weight.t(), None if mask is None else mask.t(), bias)  # (tokens, out)
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        flat, weight, mask = ctx.saved_tensors
        dy = grad_out.reshape(-1, grad_out.shape[-1]).contiguous()
        grad_x = matmul(dy, weight, mask).view(ctx.shape)  # dy @ (W*M)
        grad_w = matmul(dy.t(), flat)  # dense grad-weight: dy^T @ x
        grad_b = dy.sum(0) if ctx.has_bias else None
        return grad_x, grad_w, None, grad_b


def masked_linear_triton(
    x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    return _MaskedLinearTriton.apply(x, weight, mask, bias)
