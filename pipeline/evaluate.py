"""Evaluation: validation loss, sparsity figures and the residual-stream statistics the paper tracks."""

import torch
import torch.nn.functional as F
from torch import nn

from model.gpt import GPT
from model.hooks import record
from model.sparsity import SparseTensor
from pipeline.loader import TokenLoader
from pipeline.tasks import encode_suite, task_scores
from pipeline.tokenizer import eot_id


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on a (B, T + 1) window batch."""
    logits = model(batch[:, :-1])  # (B, T, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))


@torch.no_grad()
def validation_loss(model: GPT, loader: TokenLoader, batches: int, device: str | torch.device) -> float:
    """Mean next-token loss over the first `batches` validation batches (a fixed set, not shuffled)."""
    was_training = model.training
    model.eval()
    losses = [lm_loss(model, loader.batch(i).to(device)).item() for i in range(batches)]
    model.train(was_training)
    return sum(losses) / len(losses)


def sparsity_figures(tensors: list[SparseTensor]) -> dict[str, float]:
    """Achieved L0 (nonzero weights) in total and each sparse tensor's achieved density."""
    figures: dict[str, float] = {}
    total = 0
    for t in tensors:
        nonzero = int(t.param.detach().count_nonzero())
        total += nonzero
        figures[f"density/{t.name}"] = nonzero / t.param.numel()
    figures["l0_total"] = float(total)
    return figures


def dead_neurons(model: GPT) -> int:
    """MLP neurons cut off by the sparsity: no nonzero input weight or no nonzero output weight."""
    dead = 0
    for block in model.transformer["h"]:
        no_input = block.mlp.c_fc.weight.detach().count_nonzero(dim=1) == 0
        no_output = block.mlp.c_proj.weight.detach().count_nonzero(dim=0) == 0
        dead += int((no_input | no_output).sum())
    return dead


@torch.no_grad()
def residual_kurtosis(model: GPT, batch: torch.Tensor) -> float:
    """Excess kurtosis of the final residual stream (before ln_f) over a batch; METHOD.md 6 reports
    that it rises as L0 falls or width grows."""
    from scipy import stats  # on use: scipy.stats takes ~0.6 s to import, and every CLI verb imports this module

    name = f"transformer.h.{model.cfg.num_layers - 1}.hook_resid_post"
    with record(model, [name]) as cache:
        model(batch[:, :-1])
    return float(stats.kurtosis(cache[name].double().flatten().cpu().numpy(), fisher=True, bias=True))


def task_metrics(model: GPT, tokenizer, names: list[str], *, pairs: int = 64, device: str | torch.device = "cpu",
                 log=print) -> dict[str, float]:
    """Loss and accuracy of the unpruned model on every expressible task's held-out test pairs
    (METHOD.md 5; chance accuracy is 0.5). Tasks the tokenizer cannot express are logged and skipped."""
    encoded, failures = encode_suite(tokenizer, names, split="test", pairs=pairs)
    for message in failures.values():
        log(message)
    metrics: dict[str, float] = {}
    pad = eot_id(tokenizer)
    for name, task in encoded.items():
        scores = task_scores(model, task, pad_id=pad, context_length=model.cfg.context_length, device=device)
        metrics[f"task/{name}/loss"] = scores["loss"]
        metrics[f"task/{name}/accuracy"] = scores["accuracy"]
    if encoded:
        accuracies = [v for k, v in metrics.items() if k.endswith("/accuracy")]
        metrics["task_accuracy_mean"] = sum(accuracies) / len(accuracies)
    return metrics
