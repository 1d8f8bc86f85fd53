import pytest
import torch

from kernels.dispatch import select_kernels
from kernels.optimizer import SparseAdam, SparseSpec, adam_update_foreach, adam_update_reference
from kernels.topk import keep_count, topk_mask_reference
from tests.kernels.conftest import DEVICE

BETAS, EPS, LR, WD = (0.9, 0.95), 0.1, 0.01, 0.1


def tensors(device):
    torch.manual_seed(0)
    shapes = {"fc": (64, 32), "proj": (32, 64), "emb": (50, 32), "bias": (64,)}
    return {n: torch.randn(*s, device=device, requires_grad=True) for n, s in shapes.items()}


def specs(params):
    return {
        params["fc"]: SparseSpec("matrix", 1, decay=True),
        params["proj"]: SparseSpec("matrix", 0, decay=True),
        params["emb"]: SparseSpec("embedding", None, decay=True),
    }


def reference_sequence(params, grads_per_step, densities):
    """torch.optim.Adam, then the reference projection, then decoupled decay on matrices."""
    adam = torch.optim.Adam(list(params.values()), lr=LR, betas=BETAS, eps=EPS)
    for grads in grads_per_step:
        for p, g in zip(params.values(), grads, strict=True):
            p.grad = g.clone()
        adam.step()
        with torch.no_grad():
            for p, spec in specs(params).items():
                density = densities[spec.group]
                p.mul_(topk_mask_reference(p, keep_count(p.numel(), density), floor=4, floor_dim=spec.floor_dim))
                p.mul_(1 - LR * WD)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_fused_step_equals_the_reference_sequence(backend):
    device = "cpu" if backend != "triton" else DEVICE
    if backend == "triton" and device == "cpu":
        kernels = select_kernels("cpu", "cpu")
        from kernels.triton_optimizer import adam_update_triton, mask_decay_triton  # interpreter on CPU

        kernels = type(kernels)("triton", kernels.linear, kernels.topk_mask, adam_update_triton, mask_decay_triton,
                                kernels.sparse_linear)
    else:
        kernels = select_kernels(device, backend)
    densities = {"matrix": 0.25, "embedding": 0.5, "bias": 1.0}
    gen = torch.Generator().manual_seed(5)
    ref, fused = tensors(device), tensors(device)
    grads = [[torch.randn(p.shape, generator=gen).to(device) for p in ref.values()] for _ in range(4)]
    reference_sequence(ref, grads, densities)
    opt = SparseAdam([{"params": list(fused.values()), "lr": LR, "eps": EPS}], specs(fused), betas=BETAS,
                     weight_decay=WD, floor=4, kernels=kernels, grad_rms="none")
    opt.schedule(LR, densities)
    for step_grads in grads:
        for p, g in zip(fused.values(), step_grads, strict=True):
            p.grad = g.clone()
        opt.step()
    for name in ref:
        torch.testing.assert_close(fused[name], ref[name], atol=1e-6, rtol=1e-5, msg=name)
    assert int((fused["fc"] != 0).sum()) == keep_count(64 * 32, 0.25)
    assert (fused["bias"] != 0).all()  # dense, not decayed


def test_foreach_update_equals_reference():
    torch.manual_seed(0)
    make = lambda: [torch.randn(17, 5), torch.randn(9)]  # noqa: E731
    a = make()
    b = [t.clone() for t in a]
    grads, m1, v1 = make(), [torch.zeros(17, 5), torch.zeros(9)], [torch.zeros(17, 5), torch.zeros(9)]
    m2, v2 = [t.clone() for t in m1], [t.clone() for t in v1]
    for step in (1, 2, 3):
        adam_update_reference(a, grads, m1, v1, step=step, lr=LR, beta1=0.9, beta2=0.95, eps=EPS)
        adam_update_foreach(b, grads, m2, v2, step=step, lr=LR, beta1=0.9, beta2=0.95, eps=EPS)
    for x, y in zip(a + m1 + v1, b + m2 + v2, strict=True):
        torch.testing.assert_close(x, y)
