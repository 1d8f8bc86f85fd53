"""Kernel tests run on the GPU when there is one; else the Triton kernels run under the interpreter
(TRITON_INTERPRET=1 is set by tests/conftest.py before anything imports triton)."""

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
