import math

import pytest
import torch

from kernels.topk import keep_count
from model.config import ModelConfig, SparsityConfig
from model.gpt import GPT
from model.sparsity import density_at, lr_at, project_, sparse_tensors


def test_sparse_tensors_and_projection():
    torch.manual_seed(0)
    model = GPT(ModelConfig(d_model=64, num_layers=2, context_length=16), 100)
    tensors = sparse_tensors(model, SparsityConfig(sparse_biases=False))
    names = {t.name for t in tensors}
    assert "transformer.wte.weight" in names and "lm_head.weight" in names
    assert "bigram_table" not in names and not any(n.endswith((".bias", "ln_1.weight")) for n in names)
    assert {t.floor_dim for t in tensors if "c_fc" in t.name} == {1}
    assert {t.floor_dim for t in tensors if "mlp.c_proj" in t.name} == {0}
    with_bias = sparse_tensors(model, SparsityConfig(sparse_biases=True))
    assert any(t.name.endswith(".bias") for t in with_bias)
    project_(tensors, 1 / 16, 1 / 8, floor=4)
    assert all(t.module.mask is not None for t in tensors if t.name.endswith("c_fc.weight"))
    for t in tensors:
        density = 1 / 16 if t.group == "matrix" else 1 / 8
        assert int((t.param != 0).sum()) == keep_count(t.param.numel(), density), t.name
        if t.floor_dim is not None:
            assert ((t.param != 0).sum(dim=t.floor_dim) >= 4).all(), t.name


def test_linear_anneal_formula():
    cfg = SparsityConfig(density=1 / 16, anneal_start=0.1, anneal_end=0.5)
    assert density_at(0, 1000, 1 / 16, cfg) == 1.0
    assert density_at(100, 1000, 1 / 16, cfg) == 1.0
    assert density_at(300, 1000, 1 / 16, cfg) == pytest.approx(1 + (1 / 16 - 1) * 0.5)
    assert density_at(500, 1000, 1 / 16, cfg) == pytest.approx(1 / 16)
    assert density_at(999, 1000, 1 / 16, cfg) == pytest.approx(1 / 16)


def test_power_anneal_front_loads_the_drop():
    cfg = SparsityConfig(anneal_shape="power", anneal_power=2.0, anneal_start=0.0, anneal_end=1.0)
    assert density_at(0, 100, 0.1, cfg) == pytest.approx(1.0)
    assert density_at(50, 100, 0.1, cfg) == pytest.approx(0.1 + 0.9 * 0.25)
    assert density_at(100, 100, 0.1, cfg) == pytest.approx(0.1)


def test_sharkfin_lr():
    # warmup 10 steps, then linear decay; x sqrt(target / density now)
    assert lr_at(0, 1000, 1.0, 0.01, 1.0, 1.0) == pytest.approx(0.1)
    assert lr_at(9, 1000, 1.0, 0.01, 1.0, 1.0) == pytest.approx(1.0)
    assert lr_at(505, 1000, 1.0, 0.01, 1.0, 1.0) == pytest.approx(0.5)
    assert lr_at(505, 1000, 2.0, 0.01, 0.25, 1 / 16) == pytest.approx(2.0 * 0.5 * math.sqrt(0.25))
    assert lr_at(1000, 1000, 1.0, 0.01, 1.0, 1.0) == 0.0
