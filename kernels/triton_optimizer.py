"""Triton kernels for the sparse optimizer step (GPU; checked on CPU under TRITON_INTERPRET=1):
one elementwise pass for the Adam update, one for mask-and-decay."""

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _adam_kernel(p_ptr, g_ptr, m_ptr, v_ptr, n, lr_bc1, beta1, beta2, inv_bc2, eps, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    p = tl.load(p_ptr + offs, mask=ok).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=ok).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=ok).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=ok).to(tl.float32)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    p = p - lr_bc1 * m / (tl.sqrt(v * inv_bc2) + eps)
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=ok)
    tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=ok)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _mask_decay_kernel(p_ptr, keep_ptr, n, factor, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    p = tl.load(p_ptr + offs, mask=ok).to(tl.float32) * factor
    if HAS_MASK:
        keep = tl.load(keep_ptr + offs, mask=ok, other=0)
        p = tl.where(keep != 0, p, 0.0)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=ok)


def adam_update_triton(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps) -> None:
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs, strict=True):
        assert p.is_contiguous() and g.is_contiguous() and m.is_contiguous() and v.is_contiguous()
        n = p.numel()
        _adam_kernel[(triton.cdiv(n, BLOCK),)](p, g, m, v, n, lr / bc1, beta1, beta2, 1.0 / bc2, eps, BLOCK=BLOCK)


def mask_decay_triton(param: torch.Tensor, mask: torch.Tensor | None, factor: float) -> None:
    if mask is None and factor == 1.0:
        return
    n = param.numel()
    keep = mask.view(torch.uint8) if mask is not None else param
    _mask_decay_kernel[(triton.cdiv(n, BLOCK),)](param, keep, n, factor, HAS_MASK=mask is not None, BLOCK=BLOCK)
