import pytest
import torch

from kernels.cpu_projection import project_native
from kernels.topk import keep_count, kth_largest, threshold_topk_mask, topk_mask_reference
from tests.kernels.conftest import DEVICE, adversarial_weight


def test_reference_matches_torch_topk_without_floor():
    w = torch.randn(40, 30)
    mask = topk_mask_reference(w, 100)
    expected = torch.zeros(1200, dtype=torch.bool)
    expected[w.abs().flatten().topk(100).indices] = True
    assert torch.equal(mask.flatten(), expected)


@pytest.mark.parametrize("floor_dim", [0, 1])
def test_floor_keeps_each_neurons_largest(floor_dim):
    torch.manual_seed(0)
    w = torch.randn(16, 24)
    w[3] *= 1e-3  # weak neurons that the global top-k alone would drop
    w[:, 5] *= 1e-3
    def native(w, k, *, floor, floor_dim):  # the CPU projection's mask (kernels/cpu_projection.py)
        return project_native(w.clone(), k, floor=floor, floor_dim=floor_dim, factor=1.0)

    for fn in (topk_mask_reference, threshold_topk_mask, native):
        mask = fn(w, 120, floor=4, floor_dim=floor_dim)
        assert int(mask.sum()) == 120
        assert (mask.sum(dim=floor_dim) >= 4).all()
        assert mask.gather(floor_dim, w.abs().topk(4, dim=floor_dim).indices).all()


@pytest.mark.parametrize("shape", [(64, 48), (3, 1000), (4096,), (8, 8, 8)])
@pytest.mark.parametrize("density", [0.9, 0.25, 1 / 16, 1 / 256])
def test_threshold_equals_reference_on_random_inputs(shape, density):
    torch.manual_seed(hash((shape, density)) % 1000)
    w = torch.randn(*shape, device=DEVICE)
    k = keep_count(w.numel(), density)
    floor_dim = 1 if len(shape) == 2 and 4 * shape[0] <= k else None
    fast = threshold_topk_mask(w, k, floor=4 if floor_dim else 0, floor_dim=floor_dim)
    ref = topk_mask_reference(w, k, floor=4 if floor_dim else 0, floor_dim=floor_dim)
    assert torch.equal(fast, ref)
    assert int(fast.sum()) == k


def test_ties_are_exact_and_lowest_index_first():
    w = torch.zeros(10, 10)
    w[0, :3] = 1.0
    for k in (1, 3, 17, 100):
        mask = threshold_topk_mask(w, k)
        assert int(mask.sum()) == k
    mask = threshold_topk_mask(w, 17)
    assert mask[0, :3].all() and mask.view(-1)[3:17].all() and not mask.view(-1)[17:].any()
    ones = torch.ones(8, 8)
    for k in (20, 21, 64):
        assert int(threshold_topk_mask(ones, k, floor=2, floor_dim=0).sum()) == k
        assert int(topk_mask_reference(ones, k, floor=2, floor_dim=0).sum()) == k


def test_adversarial_values():
    w = adversarial_weight()
    for k in (1, 500, 5000, 59_999, 60_000):
        fast, ref = threshold_topk_mask(w, k), topk_mask_reference(w, k)
        assert int(fast.sum()) == k
        assert torch.equal(fast & (w.abs() != w.abs().flatten().kthvalue(60_000 - k + 1).values), ref & (
            w.abs() != w.abs().flatten().kthvalue(60_000 - k + 1).values))  # same set away from the tied value


def test_kth_largest():
    torch.manual_seed(1)
    v = torch.rand(10_000)
    for k in (1, 7, 5000, 10_000):
        assert kth_largest(v, k) == v.topk(k).values[-1]
