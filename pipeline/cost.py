"""What one trial's model and training cost, counted from its config without building or training
anything real: the model's sizes at the densities training ends with (a meta-device build of the real
model, classified by the trainer's own `sparse_tensors`), the engine and precision the trial would train
in, the tokens per optimizer step, and the bytes one rank holds (an estimate: model states as ZeRO
shards them, unsharded masks and buffers, activations of one micro-batch).

The study's planner (sweeps/plan.py, `circuitscale plan`) prices these on a GPU; this module knows
nothing of GPUs, prices or studies, only of the model, the trainer and the engine (the layer that may
import `model` and `kernels`).
"""

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch

from kernels.sparse_compute import CROSSOVER, pays
from kernels.topk import keep_count
from model.config import ModelConfig, abstopk_k, location_width
from model.gpt import GPT
from model.sparsity import density_for, sparse_tensors
from pipeline.config import ExperimentConfig, engine_kind
from pipeline.train import schedule_at, tokens_per_step

EngineKind = Literal["torch", "deepspeed"]  # pipeline.config.engine_kind's answer
Precision = Literal["fp32", "bf16"]


@dataclass(frozen=True)
class ParamCount:
    """A model's sizes at its target densities, counted on a meta-device build of the real model."""

    total: int  # every trainable parameter: what the optimizer holds (the bigram table included)
    dense: int  # N dense-equivalent: every parameter but the bigram table (the paper's sizes)
    l0: int  # nonzero entries of the sparse tensors: what training reports as l0_total
    nonzero: int  # N nonzero: l0 + the parameters that stay dense (biases, norms, sinks), bigram table excluded
    masked: int  # entries of the tensors that carry a top-k mask (one byte each, whole on every rank)
    masked_linear: int  # entries of masked linear weights (their masked copy is kept for the backward)
    largest: int  # the largest tensor the projection steps through (gathered whole in fp32 under ZeRO)
    buffers: int  # entries of persistent buffers (a fixed bigram table)


@dataclass(frozen=True)
class Memory:
    """Bytes per rank, an estimate (see `memory_per_rank`)."""

    params: float
    grads: float
    optimizer: float  # Adam's two moments and ZeRO's fp32 master copy
    masks: float  # top-k masks and persistent buffers: never sharded
    forward: float  # during forward/backward: activations and the masked weight copies
    step: float  # during the optimizer step: the projection's gathered tensor and its top-k scratch

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.masks + max(self.forward, self.step)


def sparse_step_crossover(device_type: str) -> float | None:
    """The matrix density at or below which the L0-following step (sparsity.compute=sparse) pays on a device
    type, as measured (kernels/sparse_compute.py's dispatch rule); None where none was measured."""
    return CROSSOVER.get(device_type)


def sparse_step_pays(density: float, device_type: str) -> bool:
    """The dispatch rule itself (kernels/sparse_compute.py `pays`), for a density on a device type."""
    return pays(density, torch.device(device_type))


def count_params(cfg: ExperimentConfig) -> ParamCount:
    """Exact sizes of the trial's model, built on the meta device (no memory) and classified by the
    trainer's own `sparse_tensors`, at the densities training ends with (`schedule_at` its last step)."""
    model_cfg = dataclasses.replace(cfg.model, kernels="reference")  # any kernel set builds on meta
    with torch.device("meta"):
        model = GPT(model_cfg, cfg.data.vocab_size, device="meta")  # the tokenizer is trained to data.vocab_size
    final = schedule_at(cfg.train.steps, cfg.train, cfg.sparsity)
    tensors = sparse_tensors(model, cfg.sparsity)
    sparse = {t.name for t in tensors}
    l0 = masked = masked_linear = largest = 0
    for t in tensors:
        numel, density = t.param.numel(), density_for(t, final.density, final.embedding_density)
        l0 += keep_count(numel, density) if density < 1.0 else numel  # project_ leaves a density-1 tensor whole
        largest = max(largest, numel)  # dense ones too: the projection still decays them
        if density < 1.0:
            masked += numel
            masked_linear += numel if t.module is not None and t.name.endswith(".weight") else 0
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    table = params["bigram_table"].numel() if "bigram_table" in params else 0
    rest = sum(p.numel() for name, p in params.items() if name not in sparse and name != "bigram_table")
    return ParamCount(total=total, dense=total - table, l0=l0, nonzero=l0 + rest, masked=masked,
                      masked_linear=masked_linear, largest=largest,
                      buffers=sum(b.numel() for b in model.buffers()))


def trial_engine(cfg: ExperimentConfig, workers: int) -> tuple[EngineKind, Precision]:
    """(engine, precision) of a trial on `workers` workers: the trainer's choice (`engine_kind`); the plain
    torch engine trains in fp32, DeepSpeed in deepspeed.precision."""
    engine = engine_kind(dataclasses.replace(cfg, trial=dataclasses.replace(cfg.trial, workers=workers)))
    return engine, cfg.deepspeed.precision if engine == "deepspeed" else "fp32"


def trial_tokens_per_step(cfg: ExperimentConfig, workers: int) -> int:
    """The trial's tokens per optimizer step on `workers` workers (pipeline/train.py's own count)."""
    return tokens_per_step(cfg.train, cfg.model.context_length, workers)


def memory_per_rank(cfg: ExperimentConfig, counts: ParamCount, workers: int, engine: EngineKind) -> Memory:
    """Bytes one rank holds, an estimate. Model states as the ZeRO paper counts them (Rajbhandari et al.
    2020, arXiv 1910.02054, sec. 3.1): weights and gradients in the training precision, Adam's two fp32
    moments, and under ZeRO 1-2 (3 in bf16) DeepSpeed's fp32 master copy of the weights (its
    stage_1_and_2.py always clones one). ZeRO shards across the ranks: stage 1 the optimizer states,
    2 also the gradients, 3 also the weights. Never sharded here: the top-k masks (one byte per masked
    entry, each rank projects whole tensors), persistent buffers, and the transients: during forward and
    backward the activations (`activation_bytes`) and the masked weight copy each masked linear keeps for
    its backward (the torch masked kernel; Triton masks tiles in place); during the step the projection's
    fp32 gather of one whole tensor with its |w| scratch and mask (4 + 4 + 1 bytes per entry)."""
    stage = cfg.deepspeed.zero_stage if engine == "deepspeed" else 0
    width = 2 if engine == "deepspeed" and cfg.deepspeed.precision == "bf16" else 4
    psi = counts.total

    def shard(from_stage: int) -> float:
        return psi / workers if stage >= from_stage else float(psi)

    master = 4 if stage in (1, 2) or (stage == 3 and width == 2) else 0
    copies = width * counts.masked_linear if cfg.model.kernels != "triton" else 0
    gather = (4 if stage >= 1 else 0) + 4 + 1
    return Memory(params=width * shard(3), grads=width * shard(2), optimizer=(8 + master) * shard(1),
                  masks=counts.masked + width * counts.buffers,
                  forward=copies + activation_bytes(cfg.model, cfg.data.vocab_size, cfg.train.batch_size, width),
                  step=gather * counts.largest)


def activation_bytes(model: ModelConfig, vocab_size: int, micro_batch: int, width: int) -> float:
    """Activations one micro-batch (b sequences of s tokens) keeps for the backward, an estimate:
      layers x (18 + 8 r) s b d bytes at 16 bits (x width / 2)  Korthikanti et al. 2022 (arXiv 2205.05198),
          eq. 1, whose 34 s b h is this at MLP ratio r = 4 (its dropout masks kept as slack; its 5 a s^2 b
          attention-score term left out: SDPA's fused kernels keep no s x s scores)
      + layers x 8 s b (sum of AbsTopK's k over its locations)  the int64 indices AbsTopK saves
      + s b V (2 width + 4)  the logits, their sum with the bigram table, the loss's fp32 copy."""
    s, b, d = model.context_length, micro_batch, model.d_model
    layer = (18 + 8 * model.mlp_ratio) * s * b * d * width / 2
    if model.afrac < 1.0:
        kept = sum(abstopk_k(model.afrac, location_width(model, loc)) for loc in model.afrac_locations)
        layer += 8 * s * b * kept
    return model.num_layers * layer + s * b * vocab_size * (2 * width + 4)
