"""Forward-only linear on compressed (CSR) weights (`GPT.compress_()`).

Nothing in the pipeline uses this path: it is checked against the masked linear, its twin
(tests/kernels/test_sparse_inference.py), and benchmarked (benchmarks/kernels.py). Measured on the
2-core CPU (d_model 1024, 4096 tokens): CSR x dense through torch.sparse.addmm beats the dense product
at density 1/64 and below, and about ties at 1/16. Gradients still flow to the input (as learning
pruning masks would need); the weight itself is frozen in this form.
"""

import warnings

import torch


def compress(weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """CSR copy of W * M (or of W's nonzeros when no mask is given)."""
    dense = weight.detach() * mask if mask is not None else weight.detach()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return dense.to_sparse_csr()


def sparse_linear(
    x: torch.Tensor, csr: torch.Tensor, bias: torch.Tensor | None, contiguous: bool = True
) -> torch.Tensor:
    """x (..., in) @ W^T + b with W in CSR (out, in); differentiable in x.

    The product is computed as W @ x^T, so the result is naturally feature-major. With
    `contiguous=False` it is returned as a transposed view (no copy): elementwise ops and a following
    sparse_linear take it as it is. Pass True where a consumer needs a unit last stride (attention).
    """
    flat = x.reshape(-1, x.shape[-1])
    if bias is not None:
        y = torch.sparse.addmm(bias.detach()[:, None], csr, flat.t())  # (out, tokens), bias broadcast
    else:
        y = csr @ flat.t()
    y = y.t()  # (tokens, out) view
    return (y.contiguous() if contiguous else y).unflatten(0, x.shape[:-1])
