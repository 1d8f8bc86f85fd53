"""The pruning stage: learned node masks to minimal task circuits (METHOD.md section 4).

Per task: node means over pretraining data; first the empty circuit (every node mean-ablated, the
bigram table alone): a task it solves after calibration is `direct` and has no circuit to find; else
masks (one tau per node; hard step forward, sigmoid surrogate backward) trained on task cross-entropy
(the pair's two sequences summed, the released code's scale for k_coef) + k_coef x kept nodes; nodes
ranked by tau and k bisected (uncalibrated, as the replication does) to the smallest circuit whose train
loss reaches the target; then validation on held-out pairs (sufficiency, necessity, a random circuit of
the same size, the attribution baseline) and edges counted on the node graph. Every calibration (a
logit scale) is fit on the train pairs and applied unchanged to the held-out pairs. The defaults are
the paper's search centres; `prune.search_runs` > 1 searches around them with Ray Tune
(sweeps/prune_search.py). Viewer pages: pipeline/viewer.py.
"""

import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from model.gpt import GPT
from model.graph import (
    KeptNodes,
    Location,
    all_kept,
    count_edges,
    edge_list,
    edge_weight,
    hook_name,
    kept_nodes,
    locations,
)
from model.hooks import intervene, record
from pipeline.records import CircuitRecord, CurvePoint, EdgeRecord, NodeRecord
from pipeline.tasks import EncodedTask, check_task_names, last_logits, pair_loss


@dataclass(kw_only=True, frozen=True)
class PruneConfig:
    tasks: list[str] = field(default_factory=list)  # empty: every task of the suite
    target_loss: float = 0.15  # METHOD.md 4: bisect k to the smallest circuit reaching this loss
    k_coef: float = 1e-4
    lr: float = 3e-3
    weight_decay: float = 1e-3
    beta2: float = 0.95
    warmup_frac: float = 0.05
    temperature: float = 1.0
    steps: int = 1000
    batch_pairs: int = 64  # METHOD.md 4: 64 task pairs per mask-training batch
    pairs: int = 64  # pairs drawn per task for training the masks, and again (held out) for validation
    mean_batches: int = 16  # pretraining batches averaged for the node means
    mean_pooling: Literal["pooled", "per_position"] = "pooled"  # METHOD.md 4 leaves it open
    # Pruning runs per task: 1 = the settings above; more = a Ray Tune search around them
    # (sweeps/prune_search.py). The paper spent 256 runs per (model, task).
    search_runs: int = 1
    curve_targets: list[float] = field(default_factory=list)  # extra targets: circuit size vs target (Fig. 2)
    viewer_batches: int = 8  # validation batches scanned for each node's top-activating contexts (0: none)


def check_prune_config(cfg: PruneConfig) -> None:
    for key in ("target_loss", "lr", "temperature"):
        value = getattr(cfg, key)
        if value <= 0:
            raise ValueError(f"prune.{key}: must be > 0, got {value}")
    for key in ("k_coef", "weight_decay", "viewer_batches"):
        value = getattr(cfg, key)
        if value < 0:
            raise ValueError(f"prune.{key}: must be >= 0, got {value}")
    for key in ("steps", "batch_pairs", "pairs", "mean_batches", "search_runs"):
        value = getattr(cfg, key)
        if value < 1:
            raise ValueError(f"prune.{key}: must be a positive integer, got {value}")
    if not 0.0 <= cfg.beta2 < 1.0:
        raise ValueError(f"prune.beta2: must lie in [0, 1), got {cfg.beta2}")
    if not 0.0 <= cfg.warmup_frac <= 1.0:
        raise ValueError(f"prune.warmup_frac: must lie in [0, 1], got {cfg.warmup_frac}")
    if any(t <= 0 for t in cfg.curve_targets):
        raise ValueError(f"prune.curve_targets: every target must be > 0, got {cfg.curve_targets}")
    if len(set(cfg.tasks)) != len(cfg.tasks):
        raise ValueError(f"prune.tasks: lists a task twice: {cfg.tasks}")
    check_task_names(cfg.tasks)


# --- node means -------------------------------------------------------------------------------------

@torch.no_grad()
def node_means(model: GPT, loader, batches: int, pooling: str, device: str | torch.device = "cpu"
               ) -> dict[Location, torch.Tensor]:
    """Mean activation of every node over pretraining data (METHOD.md 4): pooled over all positions
    (size,) or per position (context, size)."""
    names = {loc: hook_name(loc, model.cfg.num_layers) for loc in locations(model)}
    sums: dict[Location, torch.Tensor] = {}
    count = 0
    for i in range(batches):
        batch = loader.batch(i).to(device)[:, :-1]
        with record(model, list(names.values())) as cache:
            model(batch)
        for loc, name in names.items():
            x = cache[name].double()  # (B, T, size)
            part = x.sum(dim=(0, 1)) if pooling == "pooled" else x.sum(dim=0)
            sums[loc] = sums[loc] + part if loc in sums else part
        count += batch.shape[0] * (batch.shape[1] if pooling == "pooled" else 1)
    return {loc: (s / count).float() for loc, s in sums.items()}


# --- masks --------------------------------------------------------------------------------------------

class NodeMask(nn.Module):
    """One real parameter tau per node (METHOD.md 4): forward keeps a node where tau > 0 (a hard step),
    backward uses the derivative of sigmoid(tau / temperature) (a straight-through surrogate)."""

    def __init__(self, sizes: dict[Location, int], temperature: float, generator: torch.Generator) -> None:
        super().__init__()
        self.locations = list(sizes)
        self.temperature = temperature
        self.tau = nn.ParameterList(
            nn.Parameter(0.1 + 0.01 * torch.randn(size, generator=generator)) for size in sizes.values()
        )

    def gates(self) -> dict[Location, torch.Tensor]:
        out = {}
        for loc, tau in zip(self.locations, self.tau, strict=True):
            soft = torch.sigmoid(tau / self.temperature)
            out[loc] = (tau > 0).float() + soft - soft.detach()
        return out

    def kept(self) -> torch.Tensor:
        """Number of kept nodes, with the surrogate gradient."""
        return sum(g.sum() for g in self.gates().values())

    @torch.no_grad()
    def clamp_(self) -> None:
        for tau in self.tau:
            tau.clamp_(-1.0, 1.0)

    def ranking(self) -> list[tuple[Location, int]]:
        """Every node, highest tau first (ties: forward order)."""
        scores = torch.cat([t.detach() for t in self.tau])
        index = [(loc, i) for loc, tau in zip(self.locations, self.tau, strict=True) for i in range(tau.numel())]
        order = torch.argsort(-scores, stable=True).tolist()
        return [index[j] for j in order]


def ablation_hooks(model: GPT, gates: dict[Location, torch.Tensor], means: dict[Location, torch.Tensor]) -> dict:
    """Hook functions that keep each node by its gate and mean-ablate it otherwise."""
    hooks = {}
    for loc, gate in gates.items():
        mean = means[loc]

        def ablate(x: torch.Tensor, gate=gate, mean=mean) -> torch.Tensor:
            m = mean if mean.dim() == 1 else mean[: x.shape[1]]  # per-position means: (T, size)
            return x * gate + m * (1 - gate)

        hooks[hook_name(loc, model.cfg.num_layers)] = ablate
    return hooks


def gates_from_kept(kept: KeptNodes) -> dict[Location, torch.Tensor]:
    return {loc: mask.float() for loc, mask in kept.items()}


# --- losses -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Calibration:
    """A scale of the final logits, fit to a discretized circuit on the train pairs (METHOD.md 4) and then
    applied unchanged to held-out pairs. (The paper fits a scale and shift of the logits; a shift common to
    every logit cancels in the softmax over the two candidates, so the scale is what remains.)"""

    scale: float

    def apply(self, pair: torch.Tensor) -> torch.Tensor:
        return self.scale * pair


def pair_logits(model: GPT, task: EncodedTask, rows: torch.Tensor, gates, means, pad_id: int, device
                ) -> torch.Tensor:
    """(rows, 2) logits of [correct, alternative] with the nodes gated / mean-ablated."""
    prompts = [task.prompts[i] for i in rows.tolist()]
    with intervene(model, ablation_hooks(model, gates, means)):
        logits = last_logits(model, prompts, pad_id, model.cfg.context_length, device)
    return logits.gather(1, task.candidates[rows].to(device))


def fit_scale(pair: torch.Tensor, steps: int = 16) -> Calibration:
    """The logit scale minimising the mean task loss of `pair` (sequences, 2), 16 LBFGS steps."""
    scale = torch.ones((), requires_grad=True)
    pair = pair.detach().float().cpu()
    optimizer = torch.optim.LBFGS([scale], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = pair_loss(scale * pair).mean()
        loss.backward()
        return loss

    optimizer.step(closure)
    return Calibration(float(scale.detach()))


# --- learning and discretizing ------------------------------------------------------------------------

def learn_masks(model: GPT, task: EncodedTask, means, cfg: PruneConfig, *, pad_id: int, device="cpu",
                seed: int = 0, progress: bool = False) -> NodeMask:
    """Train node masks: task cross-entropy + k_coef x kept nodes, AdamW with clipping, warmup then
    linear decay of the LR, tau clamped to [-1, 1] after each step (METHOD.md 4)."""
    generator = torch.Generator().manual_seed(seed)
    mask = NodeMask(locations(model), cfg.temperature, generator).to(device)
    optimizer = torch.optim.AdamW(mask.parameters(), lr=cfg.lr, betas=(0.9, cfg.beta2), weight_decay=cfg.weight_decay)
    warmup = max(1, int(cfg.warmup_frac * cfg.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (cfg.steps - s) / max(1, cfg.steps - warmup))))
    pairs = len(task.prompts) // 2  # sequences 2i and 2i + 1 are pair i's two prompts
    for _ in tqdm(range(cfg.steps), desc=f"masks {task.name}", disable=not progress, leave=False):
        chosen = torch.randint(0, pairs, (min(cfg.batch_pairs, pairs),), generator=generator)
        rows = torch.stack([2 * chosen, 2 * chosen + 1], dim=1).flatten()
        pair = pair_logits(model, task, rows, mask.gates(), means, pad_id, device)
        # the released code's scale, which k_coef's search centre assumes: the pair's two sequences summed
        loss = pair_loss(pair).view(-1, 2).sum(dim=1).mean() + cfg.k_coef * mask.kept()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(mask.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        mask.clamp_()
    return mask


def kept_top(model: GPT, ranking: list[tuple[Location, int]], k: int) -> KeptNodes:
    """The first `k` nodes of `ranking` kept, every other node pruned."""
    return kept_nodes(model, ((layer, kind, i) for (layer, kind), i in ranking[:k]))


@torch.no_grad()
def circuit_logits(model, task, kept: KeptNodes, means, pad_id, device) -> torch.Tensor:
    """(sequences, 2) candidate logits of every sequence of `task` with only `kept` nodes (the rest
    mean-ablated)."""
    return pair_logits(model, task, torch.arange(len(task.prompts)), gates_from_kept(kept), means, pad_id, device)


def circuit_loss(model, task, kept: KeptNodes, means, pad_id, device, *, calibration: Calibration | None = None
                 ) -> float:
    """Mean task loss of the circuit `kept` on `task`; with `calibration` (fit elsewhere) applied."""
    pair = circuit_logits(model, task, kept, means, pad_id, device).float().cpu()
    return pair_loss(calibration.apply(pair) if calibration else pair).mean().item()


def fit_calibration(model, task, kept: KeptNodes, means, pad_id, device) -> Calibration:
    """The circuit's logit scale, fit on `task` (the train pairs): apply it unchanged to held-out pairs."""
    return fit_scale(circuit_logits(model, task, kept, means, pad_id, device))


def calibrated_test_loss(model, train, test, kept: KeptNodes, means, pad_id, device) -> float:
    """Held-out loss of a circuit under the calibration fit on the train pairs (no leakage)."""
    calibration = fit_calibration(model, train, kept, means, pad_id, device)
    return circuit_loss(model, test, kept, means, pad_id, device, calibration=calibration)


def bisect_k(model, task, ranking, means, target: float, pad_id, device, full_loss: float | None = None
             ) -> tuple[int, float] | None:
    """Smallest k (nodes kept in ranking order) whose task loss on `task` reaches `target`; None when even
    the whole model does not reach it (reported, never forced). Uncalibrated, as in the replication's code
    (jacobcd52/sparse_pretrain_public): the calibration is fit once, after the bisection."""
    lo, hi = 0, len(ranking)
    best = full_loss if full_loss is not None else circuit_loss(model, task, kept_top(model, ranking, hi), means,
                                                                pad_id, device)
    if best > target:
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        loss = circuit_loss(model, task, kept_top(model, ranking, mid), means, pad_id, device)
        if loss <= target:
            hi, best = mid, loss
        else:
            lo = mid + 1
    return hi, best


def prune_task(model: GPT, train: EncodedTask, test: EncodedTask, means, cfg: PruneConfig, *, pad_id: int,
               device="cpu", seed: int = 0, progress: bool = False) -> CircuitRecord:
    """Check the empty circuit, learn masks on the task's train pairs, bisect k to the target, and
    validate on held-out pairs (every calibration fit on the train pairs, applied unchanged to them)."""
    start = time.perf_counter()
    for p in model.parameters():
        p.requires_grad_(False)
    unpruned = circuit_loss(model, test, all_kept(model), means, pad_id, device)
    record = CircuitRecord(task=train.name, target_loss=cfg.target_loss, unpruned_loss=unpruned,
                           total_nodes=sum(locations(model).values()))
    empty = kept_nodes(model, [])
    record.empty_loss = calibrated_test_loss(model, train, test, empty, means, pad_id, device)
    full = circuit_loss(model, train, all_kept(model), means, pad_id, device)  # every node kept
    if record.empty_loss <= cfg.target_loss:
        record.status = "direct"  # the bigram table alone (+ calibration) solves it: no circuit to find
    elif full > cfg.target_loss:
        record.status = "unreachable"  # not even the whole model reaches the target
    if record.status != "pending":
        record.seconds = time.perf_counter() - start
        return record
    mask = learn_masks(model, train, means, cfg, pad_id=pad_id, device=device, seed=seed, progress=progress)
    ranking = mask.ranking()
    found = bisect_k(model, train, ranking, means, cfg.target_loss, pad_id, device, full_loss=full)
    tokens = sorted(set(train.candidates.flatten().tolist()))
    if found is None:
        record.status = "unreachable"
    else:
        k, _ = found
        kept = kept_top(model, ranking, k)
        complement = {loc: ~mask_ for loc, mask_ in kept.items()}
        gen = torch.Generator().manual_seed(seed + 1)
        random_kept = kept_top(model, [ranking[i] for i in torch.randperm(len(ranking), generator=gen)], k)
        record.status = "found"
        record.nodes = [NodeRecord(loc[0], loc[1], i, _mean_of(means[loc], i)) for loc, i in ranking[:k]]
        record.edge_list = [EdgeRecord(s.layer, s.kind, s.index, t.layer, t.kind, t.index, edge_weight(model, s, t))
                            for s, t in edge_list(model, kept, output_tokens=tokens)]
        record.edges = len(record.edge_list)
        record.sufficiency_loss = calibrated_test_loss(model, train, test, kept, means, pad_id, device)
        record.necessity_loss = circuit_loss(model, test, complement, means, pad_id, device)
        record.random_loss = calibrated_test_loss(model, train, test, random_kept, means, pad_id, device)
        record.random_edges = count_edges(model, random_kept, output_tokens=tokens)
    for target in cfg.curve_targets:  # the same ranking, bisected again: how size grows as the target tightens
        point = bisect_k(model, train, ranking, means, target, pad_id, device, full_loss=full)
        edges = None if point is None else count_edges(model, kept_top(model, ranking, point[0]), output_tokens=tokens)
        record.target_curve.append(CurvePoint(target, None if point is None else point[0], edges))
    record.attribution_edges = attribution_edges(model, train, means, cfg.target_loss, pad_id=pad_id, device=device)
    record.seconds = time.perf_counter() - start
    return record


def attribution_ranking(model: GPT, task: EncodedTask, means, *, pad_id: int, device="cpu"
                        ) -> list[tuple[Location, int]]:
    """The baseline METHOD.md 4 compares against: rank nodes by the first-order estimate of what
    mean-ablating each one does to the task loss, |dL/dgate| at gate = 1 (attribution patching)."""
    gates = {loc: torch.ones(size, device=device, requires_grad=True) for loc, size in locations(model).items()}
    rows = torch.arange(len(task.prompts))
    pair_loss(pair_logits(model, task, rows, gates, means, pad_id, device)).mean().backward()
    scores = torch.cat([gates[loc].grad.abs() for loc in gates])
    index = [(loc, i) for loc, size in locations(model).items() for i in range(size)]
    return [index[j] for j in torch.argsort(-scores, stable=True).tolist()]


def attribution_edges(model: GPT, task: EncodedTask, means, target: float, *, pad_id: int, device="cpu"
                      ) -> int | None:
    """Edges of the smallest attribution-ranked circuit reaching `target` (None if none does)."""
    ranking = attribution_ranking(model, task, means, pad_id=pad_id, device=device)
    found = bisect_k(model, task, ranking, means, target, pad_id, device)
    if found is None:
        return None
    tokens = sorted(set(task.candidates.flatten().tolist()))
    return count_edges(model, kept_top(model, ranking, found[0]), output_tokens=tokens)


def overlap(model: GPT, records: dict[str, CircuitRecord]) -> dict[str, dict[str, dict[str, float]]]:
    """Task x task overlap of found circuits: Jaccard index of their node sets and of their edge sets
    (the paper's claim: different tasks use different circuits)."""
    nodes, edges = {}, {}
    for name, rec in records.items():
        if rec.status != "found":
            continue
        nodes[name] = {n.key for n in rec.nodes}
        edges[name] = {e for e in edge_list(model, kept_nodes(model, nodes[name]))
                       if e[1].kind != "logit"}  # shared internal edges

    def jaccard(a: set, b: set) -> float:
        return len(a & b) / len(a | b) if a | b else 0.0

    names = list(nodes)
    return {
        "nodes": {a: {b: jaccard(nodes[a], nodes[b]) for b in names} for a in names},
        "edges": {a: {b: jaccard(edges[a], edges[b]) for b in names} for a in names},
    }


def _mean_of(mean: torch.Tensor, index: int) -> float:
    """A node's mean activation (averaged over positions when the means are per position)."""
    return float(mean[index] if mean.dim() == 1 else mean[:, index].mean())
