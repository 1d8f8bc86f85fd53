"""Top-k magnitude masks: the sort-based reference twin and the threshold (radix-select) fast path.

Both keep exactly k entries: first each neuron's `floor` largest along `floor_dim`, then the k - |floor|
largest of the rest. Tie rule of the fast path: every entry strictly above the k-th largest magnitude
is kept, and entries equal to it are kept in ascending flat-index order until the count is k.

The fast path never sorts the tensor. It reads the IEEE-754 bits of |w| as int32 (order-preserving
for non-negative floats), histograms the top 16 bits (one bincount), finds the bucket that holds the
k-th largest, and resolves the exact threshold by a top-k over that bucket's few candidates only
(METHOD.md section 3 / the paper's appendix B: thresholding beats sorting).
"""

import torch

_HIGH_SHIFT = 16  # 32768 buckets for non-negative float32 bit patterns


def keep_count(numel: int, density: float) -> int:
    """Entries kept at `density`: round(density x numel), at least 1."""
    return min(numel, max(1, round(density * numel)))


def topk_mask_reference(weight: torch.Tensor, k: int, *, floor: int = 0, floor_dim: int | None = None) -> torch.Tensor:
    """Plain-torch twin: floor by torch.topk per neuron, then torch.topk over the rest."""
    magnitude = weight.detach().abs()
    mask = _floor_mask(magnitude, floor, floor_dim)
    remaining = k - int(mask.sum())
    assert remaining >= 0, "the floor does not fit in k; config validation should have caught this"
    if remaining:
        scores = magnitude.masked_fill(mask, -1.0).flatten()
        mask.view(-1)[scores.topk(remaining).indices] = True
    return mask


def threshold_topk_mask(weight: torch.Tensor, k: int, *, floor: int = 0, floor_dim: int | None = None) -> torch.Tensor:
    """Fast path: the same set as the reference up to the order among exactly tied magnitudes."""
    scores = weight.detach().abs().float()
    mask = torch.zeros_like(scores, dtype=torch.bool)
    kept = 0
    if floor and floor_dim is not None:
        floor = min(floor, scores.shape[floor_dim])
        index = _floor_index(scores, floor, floor_dim)
        mask.scatter_(floor_dim, index, True)
        scores.scatter_(floor_dim, index, -1.0)  # floor entries are never chosen a second time
        kept = index.numel()  # topk indices are distinct per neuron
    remaining = k - kept
    assert remaining >= 0, "the floor does not fit in k; config validation should have caught this"
    if remaining == 0:
        return mask
    threshold = kth_largest(scores.view(-1), remaining)
    chosen = scores > threshold
    missing = remaining - int(chosen.count_nonzero())
    if missing > 0:  # ties at the threshold: lowest flat indices first
        ties = (scores.view(-1) == threshold).nonzero().squeeze(1)[:missing]
        chosen.view(-1)[ties] = True
    return mask.logical_or_(chosen)


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest of a flat float32 tensor (values >= 0, or -1 for excluded) without a sort."""
    n = values.numel()
    assert 0 < k <= n
    bits = values.view(torch.int32)
    high = (bits >> _HIGH_SHIFT).clamp_min_(0)  # excluded (-1.0) entries fall into bucket 0
    counts = torch.bincount(high, minlength=1 << (31 - _HIGH_SHIFT))
    from_top = counts.flip(0).cumsum(0)
    bucket_from_top = int(torch.searchsorted(from_top, torch.tensor(k, dtype=from_top.dtype, device=values.device)))
    bucket = counts.numel() - 1 - bucket_from_top
    above = int(from_top[bucket_from_top - 1]) if bucket_from_top > 0 else 0
    candidates = values[high == bucket]
    return candidates.topk(k - above).values[-1]


def _floor_mask(magnitude: torch.Tensor, floor: int, floor_dim: int | None) -> torch.Tensor:
    mask = torch.zeros_like(magnitude, dtype=torch.bool)
    if floor and floor_dim is not None:
        floor = min(floor, magnitude.shape[floor_dim])
        mask.scatter_(floor_dim, _floor_index(magnitude, floor, floor_dim), True)
    return mask


def _floor_index(magnitude: torch.Tensor, floor: int, floor_dim: int) -> torch.Tensor:
    """Indices of each neuron's `floor` largest entries along `floor_dim`."""
    if floor_dim == 0 and magnitude.dim() == 2:  # per column: a top-k over contiguous rows is faster
        return magnitude.t().contiguous().topk(floor, dim=1).indices.t()
    return magnitude.topk(floor, dim=floor_dim).indices
