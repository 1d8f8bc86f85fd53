"""pipeline/cost.py: a trial's model sizes counted on the meta device (against a real model projected to
its densities) and the per-rank memory estimate (against ZeRO's sharding)."""

import dataclasses

import pytest
import torch
from torch import nn

from model.config import param_counts
from model.gpt import GPT
from model.sparsity import project_, sparse_tensors
from pipeline.config import resolve_config
from pipeline.cost import count_params, memory_per_rank
from pipeline.evaluate import sparsity_figures
from pipeline.train import schedule_at

TINY = ["model.d_model=64", "model.num_layers=2", "model.context_length=32", "data.vocab_size=300"]


@pytest.mark.parametrize("extra", [
    ["sparsity.density=0.25", "sparsity.embedding_density=0.5"],
    ["sparsity.density=0.0625", "sparsity.sparse_biases=true", "model.pos_embedding=learned",
     "model.attention_sink=true"],
    ["sparsity.density=1.0"],
    ["sparsity.density=0.125", "model.bigram_table=fixed", "model.bias=false"],
])
def test_counts_match_a_real_model_projected_to_its_densities(extra):
    cfg = resolve_config(None, TINY + extra)
    counts = count_params(cfg)
    torch.manual_seed(0)
    model = GPT(cfg.model, cfg.data.vocab_size)
    for name, p in model.named_parameters():  # zero-initialized tensors would hide kept entries
        if name.endswith(".bias") or name.endswith("sink_logit"):
            nn.init.normal_(p)
    tensors = sparse_tensors(model, cfg.sparsity)
    final = schedule_at(cfg.train.steps, cfg.train, cfg.sparsity)
    project_(tensors, final.density, final.embedding_density, cfg.sparsity.neuron_floor)
    assert counts.l0 == sparsity_figures(tensors)["l0_total"]  # what training reports as L0
    params = dict(model.named_parameters())
    assert counts.nonzero == sum(int(p.count_nonzero()) for n, p in params.items() if n != "bigram_table")
    assert counts.dense == param_counts(cfg.model, cfg.data.vocab_size)["total"]
    assert counts.total == sum(p.numel() for p in params.values())
    masks = [m.mask for m in model.sparse_linears() if m.mask is not None]
    assert counts.masked_linear == sum(m.numel() for m in masks)
    assert counts.buffers == (cfg.data.vocab_size ** 2 if cfg.model.bigram_table == "fixed" else 0)


def test_memory_per_rank_shrinks_with_zero_stage_and_workers():
    cfg = resolve_config(None, TINY + ["sparsity.density=0.25"])
    counts = count_params(cfg)

    def memory(stage: int, workers: int, precision: str = "fp32", engine: str = "deepspeed"):
        ds = dataclasses.replace(cfg.deepspeed, zero_stage=stage, precision=precision)
        return memory_per_rank(dataclasses.replace(cfg, deepspeed=ds), counts, workers, engine)

    by_stage = [memory(stage, 4).total for stage in (0, 1, 2, 3)]
    assert by_stage == sorted(by_stage, reverse=True) and len(set(by_stage)) == 4
    by_workers = [memory(2, workers).total for workers in (1, 2, 4, 8)]
    assert by_workers == sorted(by_workers, reverse=True) and len(set(by_workers)) == 4
    assert memory(0, 1).total == memory(0, 8).total  # stage 0 shards nothing
    states = [(m.params + m.grads + m.optimizer) for m in (memory(3, 4, "bf16"), memory(1, 1, "fp32", "torch"))]
    # ZeRO paper: bf16 weights + grads + fp32 master and moments = 16 bytes per parameter, all sharded at stage 3;
    # the plain torch engine holds fp32 weights, grads and moments, also 16 bytes, unsharded
    assert states == [pytest.approx(16 * counts.total / 4), 16 * counts.total]
    assert memory(2, 4).masks == counts.masked  # masks are whole on every rank
