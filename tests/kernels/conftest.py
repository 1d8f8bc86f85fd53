"""Kernel tests run on the GPU when there is one; else the Triton kernels run under the interpreter
(TRITON_INTERPRET=1 is set by tests/conftest.py before anything imports triton)."""

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def adversarial_weight() -> torch.Tensor:
    """A 300 x 200 weight built to break a top-k: mostly exact zeros (ties at zero), a block of equal
    magnitudes, an infinity, a negative outlier, a negative zero."""
    torch.manual_seed(0)
    w = torch.randn(300, 200)
    w[w.abs() < 1.0] = 0.0
    w[:10] = 0.5
    w[-1, -1] = float("inf")
    w[5, 5] = -3.0
    w[7, 7] = -0.0
    return w
