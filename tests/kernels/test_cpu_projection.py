"""The native CPU projection (kernels/csrc/projection.cpp) against its plain-torch twin: the reference
top-k mask, then mask and decay."""

import pytest
import torch

from kernels.cpu_projection import fits, native_module, project_native
from kernels.dispatch import select_kernels
from kernels.topk import keep_count, threshold_topk_mask, topk_mask_reference
from tests.kernels.conftest import adversarial_weight


def reference(w, k, floor, floor_dim, factor):
    w = w.clone()
    mask = topk_mask_reference(w, k, floor=floor, floor_dim=floor_dim)
    return w * mask * factor, mask


def test_it_builds_here():
    # the machine this runs on has a C++ compiler (CI installs g++): a silent fallback would hide a broken build
    assert native_module() is not None
    assert select_kernels("cpu").project is project_native


SHAPES = [(64, 48), (48, 64), (3, 1000), (1000, 3), (257, 129)]


@pytest.mark.parametrize(("shape", "floor_dim"), [((4096,), None)] + [(s, d) for s in SHAPES for d in (None, 0, 1)])
@pytest.mark.parametrize("density", [0.9, 0.25, 1 / 16, 1 / 64, 1 / 256])
def test_equals_the_reference_on_random_inputs(shape, floor_dim, density):
    torch.manual_seed(hash((shape, density, floor_dim)) % 1000)
    w = torch.randn(*shape)
    k = keep_count(w.numel(), density)
    floor = 4 if floor_dim is not None and 4 * shape[1 - floor_dim] <= k and shape[floor_dim] >= 4 else 0
    expected, expected_mask = reference(w, k, floor, floor_dim, 0.99)
    got = w.clone()
    mask = project_native(got, k, floor=floor, floor_dim=floor_dim, factor=0.99)
    assert mask.dtype == torch.bool and mask.shape == w.shape and int(mask.sum()) == k
    assert torch.equal(mask, expected_mask)
    assert torch.equal(got, expected)


def test_ties_follow_the_threshold_paths_rule():
    # entries equal to the threshold: lowest flat index first, exactly k kept, values kept whole
    w = torch.zeros(10, 10)
    w[0, :3] = 1.0
    w.view(-1)[50:] = 0.5
    for k in (1, 3, 17, 53, 100):
        got = w.clone()
        mask = project_native(got, k, floor=0, floor_dim=None, factor=1.0)
        assert torch.equal(mask, threshold_topk_mask(w, k))
        assert torch.equal(got, w * mask)
    ones = torch.ones(8, 8)
    for k in (20, 21, 64):
        for floor_dim in (0, 1):
            mask = project_native(ones.clone(), k, floor=2, floor_dim=floor_dim, factor=1.0)
            assert int(mask.sum()) == k and (mask.sum(dim=floor_dim) >= 2).all()


def test_adversarial_values():
    w = adversarial_weight()
    for k in (1, 500, 5000, 59_999, 60_000):
        for floor, floor_dim in ((0, None), (1, 0), (1, 1)):
            if floor and k < w.shape[1 - floor_dim]:
                continue  # the floor does not fit in k (config validation refuses it)
            got = w.clone()
            mask = project_native(got, k, floor=floor, floor_dim=floor_dim, factor=0.5)
            assert int(mask.sum()) == k and torch.equal(got, w * mask * 0.5)
            if floor_dim is None:
                assert torch.equal(mask, threshold_topk_mask(w, k))
            else:  # which of a neuron's tied entries is its floor is free
                assert (mask.sum(dim=floor_dim) >= floor).all()


def test_decay_only_and_tensors_the_native_pass_does_not_take():
    torch.manual_seed(0)
    w = torch.randn(32, 16)
    got = w.clone()
    assert project_native(got, None, floor=4, floor_dim=1, factor=0.9) is None
    assert torch.equal(got, w * 0.9)
    for odd in (torch.randn(16, 32).t(), torch.randn(16, 32, dtype=torch.float64), torch.randn(4, 8, 8)):
        assert not fits(odd, 4, 1 if odd.dim() == 2 else None)
        k = keep_count(odd.numel(), 0.25)
        floor_dim = 1 if odd.dim() == 2 else None
        expected, expected_mask = reference(odd, k, 4 if floor_dim else 0, floor_dim, 0.5)
        got = odd.clone()
        mask = project_native(got, k, floor=4 if floor_dim else 0, floor_dim=floor_dim, factor=0.5)
        assert torch.equal(mask, expected_mask) and torch.equal(got, expected)


def test_it_uses_torchs_threads():
    # the same result with one thread and with several (the parts split the tensor differently)
    torch.manual_seed(3)
    w = torch.randn(512, 384)
    k = keep_count(w.numel(), 1 / 16)
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            got = w.clone()
            results.append((project_native(got, k, floor=4, floor_dim=0, factor=0.9), got))
    finally:
        torch.set_num_threads(before)
    for mask, got in results[1:]:
        assert torch.equal(mask, results[0][0]) and torch.equal(got, results[0][1])
