"""The model and the training step give the same numbers with the dispatched kernels as with the
plain-torch reference kernels (on the GPU when there is one: the Triton kernels)."""

import dataclasses

import pytest
import torch

from model.config import ModelConfig, SparsityConfig
from model.gpt import GPT
from model.sparsity import sparse_tensors
from pipeline.config import TrainConfig
from pipeline.train import make_engine, train_step
from tests.kernels.conftest import DEVICE

CFG = ModelConfig(d_model=64, num_layers=2, d_head=16, context_length=32)


def run(backend: str, steps: int = 5) -> tuple[GPT, list[float]]:
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(CFG, kernels=backend), 96, device=DEVICE)
    sparsity = SparsityConfig(density=1 / 16, anneal_start=0.0, anneal_end=0.4)
    train = TrainConfig(steps=steps, lr=1e-2)
    engine = make_engine(model, sparse_tensors(model, sparsity), train, sparsity)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for step in range(steps):
        batch = torch.randint(0, 96, (4, 33), generator=gen).to(DEVICE)
        losses.append(train_step(engine, [batch], step, train, sparsity)["loss"])
    return model, losses


@pytest.mark.parametrize("backend", ["auto"] + (["triton"] if DEVICE == "cuda" else []))
def test_dispatched_training_matches_reference(backend):
    fast, fast_losses = run(backend)
    ref, ref_losses = run("reference")
    assert fast.kernels.name != "reference"
    torch.testing.assert_close(torch.tensor(fast_losses), torch.tensor(ref_losses), atol=1e-4, rtol=1e-4)
    for (name, p), (_, q) in zip(fast.named_parameters(), ref.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-3, msg=name)
    masked = [m for m in fast.sparse_linears() if m.mask is not None]
    assert len(masked) == len(fast.sparse_linears())  # every linear runs with its projection mask
