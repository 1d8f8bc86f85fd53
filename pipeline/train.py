"""The training stage: the paper's recipe (METHOD.md section 3).

Per optimizer step: forward/backward, global gradient-RMS normalization, Adam (eps 0.1, betas 0.9 /
0.95), the top-k projection at the annealed density, then decoupled weight decay on the matrices.
LR follows the sharkfin schedule. Every schedule is a pure function of the step, so a resumed run
needs only the step number. `train()` is the loop: evaluation every `eval_every` steps, a
checkpoint every `checkpoint_every` steps and at the end, exact resume from the newest good
checkpoint, a progress bar with loss and tokens/s, and every metric to the injected tracker.
"""

import functools
import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from infra.checkpoint import load_latest_checkpoint, save_checkpoint
from infra.engine import DeepSpeedConfig, Engine, wrap
from kernels.optimizer import SparseAdam, SparseSpec
from model.config import SparsityConfig
from model.gpt import GPT
from model.sparsity import SparseTensor, attach_masks, density_at, lr_at
from pipeline.config import TrainConfig
from pipeline.evaluate import dead_neurons, lm_loss, residual_kurtosis, sparsity_figures, validation_loss
from pipeline.loader import TokenLoader


@dataclass(frozen=True)
class Schedule:
    density: float  # matrix density now
    embedding_density: float  # embedding (and sparse-bias) density now
    lr: float


def target_densities(sparsity: SparsityConfig) -> dict[str, float]:
    """The densities the anneal ends at, keyed as the optimizer's `schedule` takes them."""
    embedding = sparsity.embedding_density if sparsity.embedding_density is not None else sparsity.density
    return {"matrix": sparsity.density, "embedding": embedding, "bias": embedding}


def schedule_at(step: int, train: TrainConfig, sparsity: SparsityConfig) -> Schedule:
    targets = target_densities(sparsity)
    target, embedding_target = targets["matrix"], targets["embedding"]
    density = density_at(step, train.steps, target, sparsity)
    return Schedule(
        density=density,
        embedding_density=density_at(step, train.steps, embedding_target, sparsity),
        lr=lr_at(step, train.steps, train.lr, train.warmup_frac, density, target),
    )


def tokens_per_step(train: TrainConfig, context_length: int, workers: int) -> int:
    """Tokens one optimizer step trains on: train.batch_size is per worker, times accumulation and workers."""
    return train.batch_size * train.grad_accum * context_length * workers


def build_optimizer(
    model: nn.Module, tensors: list[SparseTensor], train: TrainConfig, sparsity: SparsityConfig
) -> SparseAdam:
    """The fused sparse Adam over every parameter, with the model's kernels. Decay is decoupled and
    applied after the projection to weight matrices (embeddings included), never the bigram table;
    the bigram table gets its own group with a small eps (METHOD.md 8)."""
    def is_bigram(name: str) -> bool:  # the table of the model, or of a model inside a module (a bridge)
        return name.rsplit(".", 1)[-1] == "bigram_table"

    def is_bridge(name: str) -> bool:  # a bridge's encoders and decoders (model/bridge.py)
        return name.startswith("bridge.")

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    bigram = [p for n, p in params if is_bigram(n)]
    bridge = [p for n, p in params if is_bridge(n)]
    rest = [p for n, p in params if not is_bigram(n) and not is_bridge(n)]
    groups = [{"params": rest, "eps": train.eps, "lr": train.lr}]
    if bigram:
        groups.append({"params": bigram, "eps": train.bigram_eps, "lr": train.lr})
    if bridge:  # dense maps in their own group, with the small eps of the other dense parameter (the table)
        groups.append({"params": bridge, "eps": train.bigram_eps, "lr": train.lr})
    specs = {t.param: SparseSpec(t.group, t.floor_dim, decay=t.param.dim() == 2, module=t.module) for t in tensors}
    for name, p in params:  # dense matrices (e.g. the dense baseline's) still decay
        if p.dim() == 2 and not is_bigram(name) and p not in specs:
            specs[p] = SparseSpec("dense", None, decay=True)
    return SparseAdam(groups, specs, betas=(train.beta1, train.beta2), weight_decay=train.weight_decay,
                      floor=sparsity.neuron_floor, kernels=model.kernels, grad_rms=train.grad_rms,
                      compute=sparsity.compute, regrow_every=sparsity.regrow_every, candidates=sparsity.candidates,
                      targets=target_densities(sparsity))


def make_engine(model: GPT, tensors: list[SparseTensor], train: TrainConfig, sparsity: SparsityConfig, *,
                kind: str = "torch", deepspeed: DeepSpeedConfig | None = None) -> Engine:
    """The model wrapped for training (`infra.engine.wrap`) over a fresh fused sparse Adam: "torch" for
    one process, "deepspeed" for one or many (joins the process group)."""
    optimizer = build_optimizer(model, tensors, train, sparsity)
    return wrap(model, optimizer, engine=kind, cfg=deepspeed or DeepSpeedConfig(), micro_batch=train.batch_size,
                grad_accum=train.grad_accum, attach_masks=functools.partial(attach_masks, tensors))


def train_step(
    engine: Engine, micro_batches: list[torch.Tensor], step: int, train: TrainConfig, sparsity: SparsityConfig,
    loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] = lm_loss,
) -> dict[str, float]:
    """One optimizer step of the recipe over `micro_batches` (gradient accumulation): forward and
    backward, then the engine's fused step (RMS normalization, Adam, projection, decay).

    Returns loss, lr, density, the gradient RMS before normalization, and seconds per phase.
    """
    schedule = schedule_at(step, train, sparsity)
    tick = time.perf_counter()
    loss = engine.forward_backward(micro_batches, loss_fn)
    tock = time.perf_counter()
    densities = {"matrix": schedule.density, "embedding": schedule.embedding_density,
                 "bias": schedule.embedding_density}  # the keys of target_densities
    stats = engine.step(schedule.lr, densities)
    phases = {"fwd_bwd_s": tock - tick, "optim_s": time.perf_counter() - tock}
    return {"loss": loss, "lr": schedule.lr, "density": schedule.density} | stats | phases


@torch.no_grad()
def bigram_log_probs(tokens: torch.Tensor, vocab_size: int, smoothing: float = 0.1) -> torch.Tensor:
    """Count-based next-token log-probabilities (vocab, vocab), add-`smoothing`: the content of a
    fixed bigram table (`model.bigram_table=fixed`), computed from training tokens."""
    flat = tokens.reshape(-1).long()
    pairs = flat[:-1] * vocab_size + flat[1:]
    counts = torch.bincount(pairs, minlength=vocab_size * vocab_size).view(vocab_size, vocab_size).double()
    counts += smoothing
    return (counts / counts.sum(dim=1, keepdim=True)).log().float()


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN or infinite loss; the run stops at once."""


class Tracker(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


@dataclass
class TrainingSetup:
    """What the loop trains: the model, its sparse tensors, the engine wrapping both (rank and world size
    included), and this rank's training and validation loaders."""

    model: nn.Module  # what the engine wraps: a GPT, or a bridged pair (model/bridge.py)
    tensors: list[SparseTensor]
    engine: Engine
    loader: TokenLoader
    val: TokenLoader
    loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] = lm_loss  # (model, window batch) -> loss
    lm: GPT | None = None  # the language model whose own loss and sparsity are evaluated (None: model)
    evaluate: Callable[[], dict[str, float]] | None = None  # further figures at every evaluation


@dataclass
class TrainResult:
    steps: int
    resumed_from: int  # step of the checkpoint it started from, 0 for a fresh run
    final: dict[str, float]
    state: dict[str, torch.Tensor]  # the final full state (engine-agnostic layout) on rank 0; {} on other ranks


def train(
    setup: TrainingSetup,
    t: TrainConfig,
    sparsity: SparsityConfig,
    run_dir: Path,
    tracker: Tracker,
    *,
    checkpoint_meta: dict[str, str],
    device: str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] = print,
    on_checkpoint: Callable[[], object] | None = None,
) -> TrainResult:
    """Train (or resume) under `run_dir` on this process's rank of the engine; raises NonFiniteLoss on a
    NaN/inf loss. Rank 0 writes checkpoints (with `checkpoint_meta`) and calls `on_checkpoint` after each
    (a study with URI storage pushes the run folder there); metrics go to `tracker`."""
    tensors, engine, loader, val = setup.tensors, setup.engine, setup.loader, setup.val
    model = setup.lm if setup.lm is not None else setup.model
    extra = setup.evaluate or dict
    lead = engine.rank == 0
    start = restore(run_dir / "checkpoints", engine, log)
    step_tokens = tokens_per_step(t, model.cfg.context_length, engine.world_size)
    state = None  # the full state of the final checkpoint (rank 0; {} elsewhere), reused as the final state
    bar = tqdm(range(start, t.steps), initial=start, total=t.steps, desc="training", disable=not progress)
    for step in bar:
        tick = time.perf_counter()
        micro_batches = list(loader.batch(step).to(device).split(t.batch_size))
        stats = train_step(engine, micro_batches, step, t, sparsity, setup.loss_fn)
        if not math.isfinite(stats["loss"]):
            raise NonFiniteLoss(f"loss became {stats['loss']} at step {step + 1}")
        metrics = {"train_loss": stats["loss"], "lr": stats["lr"], "density": stats["density"],
                   "grad_rms": stats["grad_rms"], "tokens_per_s": step_tokens / (time.perf_counter() - tick)}
        done = step + 1
        if done % t.eval_every == 0 or done == t.steps:
            metrics |= _evaluation(model, tensors, val, t.eval_batches, device) | extra()
        tracker.log_metrics(metrics, done)
        bar.set_postfix(loss=f"{stats['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
        if done % t.checkpoint_every == 0 or done == t.steps:
            state = engine.full_state()  # a collective under DeepSpeed: every rank takes part, rank 0 keeps it
            if lead:
                save_checkpoint(run_dir / "checkpoints", done, state, checkpoint_meta, keep=t.keep_checkpoints)
                if on_checkpoint is not None:
                    on_checkpoint()
            if done < t.steps:
                state = None  # held only while saving: never across steps, nor beside the next one
    final = _evaluation(model, tensors, val, t.eval_batches, device) | extra()
    final["residual_kurtosis"] = residual_kurtosis(model, val.batch(0).to(device))
    final["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # this rank's peak
    if state is None:  # resumed at the last step: nothing was trained, so no checkpoint was taken
        state = engine.full_state()
    return TrainResult(steps=t.steps, resumed_from=start, final=final, state=state)


def restore(root: Path, engine: Engine, log: Callable[[str], None]) -> int:
    """Load the newest good checkpoint under `root` into the engine; returns its step (0 if none)."""
    checkpoint = load_latest_checkpoint(root, warn=log)
    if checkpoint is None:
        return 0
    engine.load_full_state(checkpoint.tensors)
    log(f"resumed from {checkpoint.folder} (step {checkpoint.step})")
    return checkpoint.step


def _evaluation(model, tensors, val, batches: int, device) -> dict[str, float]:
    return {"val_loss": validation_loss(model, val, batches, device), "dead_neurons": float(dead_neurons(model)),
            **sparsity_figures(tensors)}
