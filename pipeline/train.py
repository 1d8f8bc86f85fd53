"""The training stage: the paper's recipe (METHOD.md section 3).

Per optimizer step: forward/backward, global gradient-RMS normalization, Adam (eps 0.1, betas 0.9 /
0.95), the top-k projection at the annealed density, then decoupled weight decay on the matrices.
LR follows the sharkfin schedule. Every schedule is a pure function of the step, so a resumed run
needs only the step number. `train()` is the loop: evaluation every `eval_every` steps, a
checkpoint every `checkpoint_every` steps and at the end, exact resume from the newest good
checkpoint, a progress bar with loss and tokens/s, and every metric to the injected tracker.
"""

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from infra.checkpoint import load_latest_checkpoint, save_checkpoint
from kernels.optimizer import SparseAdam, SparseSpec
from model.config import SparsityConfig
from model.gpt import GPT
from model.sparsity import SparseTensor, attach_mask, density_at, lr_at, sparse_tensors
from pipeline.data import Dataset
from pipeline.evaluate import dead_neurons, lm_loss, residual_kurtosis, sparsity_figures, validation_loss
from pipeline.loader import TokenLoader

if TYPE_CHECKING:
    from pipeline.config import ExperimentConfig


@dataclass(kw_only=True, frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32  # sequences per optimizer step per worker
    grad_accum: int = 1
    lr: float = 1e-2  # peak LR at the final L0; scaled by the sharkfin factor (METHOD.md 3)
    warmup_frac: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 0.1  # METHOD.md 3: Adam eps 0.1 for the sparse weights
    weight_decay: float = 0.1
    # rescale: always divide the global gradient by its RMS (released code); clip: only when RMS > 1
    # (the paper's wording); none: neither. (Not 'off': YAML reads that as false.)
    grad_rms: Literal["rescale", "clip", "none"] = "rescale"
    # METHOD.md 8: with eps 0.1 and RMS normalization the dense bigram table barely trains; its own
    # optimizer group with a small eps fixed that.
    bigram_eps: float = 1e-8
    seed: int = 0
    eval_every: int = 100
    eval_batches: int = 10  # validation batches per evaluation (a fixed, unshuffled set)
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    run_dir: str | None = None  # None: runs/train/<hash of the resolved config>


@dataclass(kw_only=True, frozen=True)
class TrialConfig:
    workers: int = 1  # data-parallel training processes per trial


def check_train_config(cfg: TrainConfig) -> None:
    for key in ("steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "checkpoint_every",
                "keep_checkpoints"):
        value = getattr(cfg, key)
        if value < 1:
            raise ValueError(f"train.{key}: must be a positive integer, got {value}")
    for key in ("lr", "eps", "bigram_eps"):
        value = getattr(cfg, key)
        if value <= 0:
            raise ValueError(f"train.{key}: must be > 0, got {value}")
    for key in ("beta1", "beta2"):
        value = getattr(cfg, key)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"train.{key}: must lie in [0, 1), got {value}")
    if not 0.0 <= cfg.warmup_frac <= 1.0:
        raise ValueError(f"train.warmup_frac: must lie in [0, 1], got {cfg.warmup_frac}")
    if cfg.weight_decay < 0:
        raise ValueError(f"train.weight_decay: must be >= 0, got {cfg.weight_decay}")


def check_trial_config(cfg: TrialConfig) -> None:
    if cfg.workers < 1:
        raise ValueError(f"trial.workers: must be a positive integer, got {cfg.workers}")


@dataclass(frozen=True)
class Schedule:
    density: float  # matrix density now
    embedding_density: float  # embedding (and sparse-bias) density now
    lr: float


def schedule_at(step: int, train: TrainConfig, sparsity: SparsityConfig) -> Schedule:
    target = sparsity.density
    embedding_target = sparsity.embedding_density if sparsity.embedding_density is not None else target
    density = density_at(step, train.steps, target, sparsity)
    return Schedule(
        density=density,
        embedding_density=density_at(step, train.steps, embedding_target, sparsity),
        lr=lr_at(step, train.steps, train.lr, train.warmup_frac, density, target),
    )


def build_optimizer(
    model: nn.Module, tensors: list[SparseTensor], train: TrainConfig, sparsity: SparsityConfig
) -> SparseAdam:
    """The fused sparse Adam over every parameter, with the model's kernels. Decay is decoupled and
    applied after the projection to weight matrices (embeddings included), never the bigram table;
    the bigram table gets its own group with a small eps (METHOD.md 8)."""
    bigram = [p for n, p in model.named_parameters() if n == "bigram_table"]
    rest = [p for n, p in model.named_parameters() if n != "bigram_table"]
    groups = [{"params": rest, "eps": train.eps, "lr": train.lr}]
    if bigram:
        groups.append({"params": bigram, "eps": train.bigram_eps, "lr": train.lr})
    specs = {t.param: SparseSpec(t.group, t.floor_dim, decay=t.param.dim() == 2) for t in tensors}
    for name, p in model.named_parameters():  # dense matrices (e.g. the dense baseline's) still decay
        if p.dim() == 2 and name != "bigram_table" and p not in specs:
            specs[p] = SparseSpec("matrix", None, decay=True)
    return SparseAdam(groups, specs, betas=(train.beta1, train.beta2), weight_decay=train.weight_decay,
                      floor=sparsity.neuron_floor, kernels=model.kernels)


@torch.no_grad()
def normalize_gradients_(params: list[nn.Parameter], mode: str) -> float:
    """Scale the global gradient so its RMS is 1 (rescale) or at most 1 (clip); returns the RMS before."""
    grads = [p.grad for p in params if p.grad is not None]
    numel = sum(g.numel() for g in grads)
    rms = torch.sqrt(sum((g.float() ** 2).sum() for g in grads) / max(numel, 1)).item()
    if mode == "rescale":
        scale = 1.0 / (rms + 1e-5)
    elif mode == "clip":
        scale = 1.0 / rms if rms > 1.0 else 1.0
    else:
        scale = 1.0
    if scale != 1.0:
        torch._foreach_mul_(grads, scale)
    return rms


def train_step(
    model: nn.Module,
    optimizer: SparseAdam,
    tensors: list[SparseTensor],
    micro_batches: list[torch.Tensor],
    step: int,
    train: TrainConfig,
    sparsity: SparsityConfig,
) -> dict[str, float]:
    """One optimizer step of the recipe over `micro_batches` (gradient accumulation).

    Returns loss, lr, density, the gradient RMS before normalization, and seconds per phase.
    """
    schedule = schedule_at(step, train, sparsity)
    clock = [time.perf_counter()]
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for batch in micro_batches:
        loss = lm_loss(model, batch) / len(micro_batches)
        loss.backward()
        total += loss.item()
    clock.append(time.perf_counter())
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_rms = normalize_gradients_(params, train.grad_rms)
    for group in optimizer.param_groups:
        group["lr"] = schedule.lr
    optimizer.densities = {"matrix": schedule.density, "embedding": schedule.embedding_density,
                           "bias": schedule.embedding_density}
    optimizer.step()  # Adam, then top-k projection and decoupled decay (kernels/optimizer.py)
    clock.append(time.perf_counter())
    for t in tensors:
        if t.param in optimizer.masks:
            attach_mask(t, optimizer.masks[t.param])
    seconds = [b - a for a, b in itertools.pairwise(clock)]
    phases = dict(zip(("fwd_bwd_s", "optim_s"), seconds, strict=True)) | optimizer.timings
    return {"loss": total, "lr": schedule.lr, "density": schedule.density, "grad_rms": grad_rms} | phases


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
class TrainResult:
    model: GPT
    steps: int
    resumed_from: int  # step of the checkpoint it started from, 0 for a fresh run
    final: dict[str, float]


def train(
    cfg: "ExperimentConfig",
    dataset: Dataset,
    run_dir: Path,
    tracker: Tracker,
    *,
    device: str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train (or resume) one model under `run_dir`; raises NonFiniteLoss on a NaN/inf loss."""
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model, dataset.manifest["tokenizer"]["vocab_size"], device=device)
    if cfg.model.bigram_table == "fixed":
        model.bigram_table.copy_(bigram_log_probs(_train_sample(dataset), model.vocab_size))
    tensors = sparse_tensors(model, cfg.sparsity)
    optimizer = build_optimizer(model, tensors, cfg.train, cfg.sparsity)
    start = restore(run_dir / "checkpoints", model, optimizer, log)
    t = cfg.train
    loader = TokenLoader(dataset, split="train", batch_size=t.batch_size * t.grad_accum,
                         context_length=cfg.model.context_length, seed=t.seed)
    val = TokenLoader(dataset, split="val", batch_size=t.batch_size, context_length=cfg.model.context_length,
                      shuffle=False)
    tokens_per_step = t.batch_size * t.grad_accum * cfg.model.context_length
    bar = tqdm(range(start, t.steps), initial=start, total=t.steps, desc="training", disable=not progress)
    for step in bar:
        tick = time.perf_counter()
        micro_batches = list(loader.batch(step).to(device).split(t.batch_size))
        stats = train_step(model, optimizer, tensors, micro_batches, step, t, cfg.sparsity)
        if not math.isfinite(stats["loss"]):
            raise NonFiniteLoss(f"loss became {stats['loss']} at step {step + 1}")
        metrics = {"train_loss": stats["loss"], "lr": stats["lr"], "density": stats["density"],
                   "grad_rms": stats["grad_rms"], "tokens_per_s": tokens_per_step / (time.perf_counter() - tick)}
        done = step + 1
        if done % t.eval_every == 0 or done == t.steps:
            metrics |= _evaluation(model, tensors, val, t.eval_batches, device)
        tracker.log_metrics(metrics, done)
        bar.set_postfix(loss=f"{stats['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
        if done % t.checkpoint_every == 0 or done == t.steps:
            save_checkpoint(run_dir / "checkpoints", done, state_tensors(model, optimizer),
                            {"config": config_yaml(cfg)}, keep=t.keep_checkpoints)
    final = _evaluation(model, tensors, val, t.eval_batches, device)
    final["residual_kurtosis"] = residual_kurtosis(model, val.batch(0).to(device))
    return TrainResult(model=model, steps=t.steps, resumed_from=start, final=final)


def _evaluation(model, tensors, val, batches: int, device) -> dict[str, float]:
    return {"val_loss": validation_loss(model, val, batches, device), "dead_neurons": float(dead_neurons(model)),
            **sparsity_figures(tensors)}


def _train_sample(dataset: Dataset, max_tokens: int = 1 << 22) -> torch.Tensor:
    from pipeline.shards import map_shard

    first = dataset.shards("train")[0]
    return torch.from_numpy(map_shard(dataset.folder / first["file"])[:max_tokens].astype("int64"))


def config_yaml(cfg: "ExperimentConfig") -> str:
    from pipeline.config import config_to_yaml  # config.py imports this module for TrainConfig

    return config_to_yaml(cfg)


def state_tensors(model: GPT, optimizer: SparseAdam) -> dict[str, torch.Tensor]:
    """Everything a bit-exact resume needs, as named tensors: weights and buffers, Adam state,
    projection masks, and the torch RNG state (the loader needs none: it is a function of the step)."""
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    names = {p: n for n, p in model.named_parameters()}
    for p, state in optimizer.state.items():
        for key, value in state.items():
            tensors[f"optim/{names[p]}/{key}"] = value
    for name, module in model.named_modules():
        if getattr(module, "mask", None) is not None:
            tensors[f"mask/{name}"] = module.mask
    tensors["rng/torch"] = torch.get_rng_state()
    return tensors


def restore(root: Path, model: GPT, optimizer: SparseAdam, log: Callable[[str], None]) -> int:
    """Load the newest good checkpoint under `root` into model and optimizer; returns its step (0 if none)."""
    checkpoint = load_latest_checkpoint(root, warn=log)
    if checkpoint is None:
        return 0
    device = next(model.parameters()).device
    found = checkpoint.tensors
    model.load_state_dict({k[len("model/"):]: v for k, v in found.items() if k.startswith("model/")})
    params = dict(model.named_parameters())
    for key, value in found.items():
        if key.startswith("optim/"):
            name, field = key[len("optim/"):].rsplit("/", 1)
            optimizer.state[params[name]][field] = value if field == "step" else value.to(device)
        elif key.startswith("mask/"):
            model.get_submodule(key[len("mask/"):]).mask = value.to(device=device, dtype=torch.bool)
    torch.set_rng_state(found["rng/torch"])
    log(f"resumed from {checkpoint.folder} (step {checkpoint.step})")
    return checkpoint.step
