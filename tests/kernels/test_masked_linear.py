import pytest
import torch

from kernels.masked_linear import masked_linear_reference, masked_linear_torch
from tests.kernels.conftest import DEVICE


def check(fn, device, dtype=torch.float32, shape=(3, 37, 48), out=40, density=0.2, bias=True, tol=None):
    torch.manual_seed(0)
    x = torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(out, shape[-1], device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(out, device=device, dtype=dtype, requires_grad=True) if bias else None
    mask = torch.rand(out, shape[-1], device=device) < density
    grad = torch.randn(*shape[:-1], out, device=device, dtype=dtype)
    results = []
    for f in (masked_linear_reference, fn):
        y = f(x, w, mask, b)
        y.backward(grad)
        results.append((y.detach(), x.grad.clone(), w.grad.clone(), None if b is None else b.grad.clone()))
        x.grad = w.grad = None
        if b is not None:
            b.grad = None
    (ry, rx, rw, rb), (y, gx, gw, gb) = results
    kw = tol or {}
    torch.testing.assert_close(y, ry, **kw)
    torch.testing.assert_close(gx, rx, **kw)
    torch.testing.assert_close(gw, rw, **kw)
    if b is not None:
        torch.testing.assert_close(gb, rb, **kw)
    # the weight gradient is dense: pruned entries get gradient too
    assert (gw[~mask] != 0).float().mean() > 0.9


@pytest.mark.parametrize("bias", [True, False])
def test_torch_path_matches_reference(bias):
    check(masked_linear_torch, DEVICE, bias=bias, tol={"atol": 1e-4, "rtol": 1e-4})


def test_reference_is_plain_linear_on_masked_weights():
    x, w = torch.randn(5, 8), torch.randn(6, 8)
    mask = torch.rand(6, 8) < 0.5
    torch.testing.assert_close(masked_linear_reference(x, w, mask, None), x @ (w * mask).t())


def test_no_mask_is_dense():
    x, w, b = torch.randn(5, 8), torch.randn(6, 8), torch.randn(6)
    torch.testing.assert_close(masked_linear_torch(x, w, None, b), torch.nn.functional.linear(x, w, b))


@pytest.mark.parametrize("bias", [True, False])
def test_triton_kernels_match_reference(bias):
    from kernels.triton_linear import masked_linear_triton

    check(masked_linear_triton, DEVICE, bias=bias, tol={"atol": 1e-4, "rtol": 1e-4})


def test_triton_matmul_strided_operands():
    from kernels.triton_linear import matmul

    torch.manual_seed(1)
    a = torch.randn(70, 33, device=DEVICE)
    b = torch.randn(50, 33, device=DEVICE).t()  # a strided (K, N) view
    mask = (torch.rand(50, 33, device=DEVICE) < 0.3).t()
    torch.testing.assert_close(matmul(a, b, mask), a @ (b * mask), atol=1e-4, rtol=1e-4)
