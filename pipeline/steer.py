"""Steering a dense model through its bridge (METHOD.md 7; `circuitscale steer BRIDGE_RUN --task TASK`).

1. The task's circuit in the bridge's sparse model: pruned on the task's train pairs as a trial prunes
   (pipeline/prune.py, the bridge run's `prune.*`).
2. The cue nodes: the circuit's nodes whose activation at the prompt's last token differs most, on
   average over held-out pairs, between a pair's two prompts (`cue_nodes`; the unembedding's read after
   ln_f is not a residual channel and is left out).
3. The steering curve: at strength s each chosen node's activation on a prompt is moved to
   own + s x (partner prompt's - own), at the last token, in the sparse model; the change this makes to
   the sparse residual at the first bridge site after every edited node is decoded by that site's decoder
   and added to the dense model's own residual there, and the dense model runs on. P(correct) is the
   dense model's probability of the prompt's own answer between the two candidates, averaged over the
   held-out prompts. It starts at the dense model's own preference (s = 0); the flip strength is the
   smallest s at which it drops below 1/2 (None if it never does up to the largest strength).
4. The control: a random node set of the same size, drawn (seeded) from the same candidates (the circuit)
   among the nodes that differ at all between a pair's prompts (`control_nodes`), edited the same way.
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from model.bridge import BridgedPair, residuals, run_from, site_names
from model.graph import HOOKS, Location, all_kept, hook_name, kept_nodes, locations
from model.hooks import intervene, record
from pipeline.bridge import load_bridge
from pipeline.circuits import viewer_batches, write_viewer
from pipeline.config import ExperimentConfig, token_loader
from pipeline.data import build_data
from pipeline.errors import UserError
from pipeline.prune import ablation_hooks, gates_from_kept, node_means, prune_task
from pipeline.records import NodeKey
from pipeline.tasks import TASKS, EncodedTask, encode_task, pad_prompts, pair_loss
from pipeline.tokenizer import eot_id

_ATTENTION = ("attn_in", "q", "k", "v", "attn_out")


@dataclass
class SteerResult:
    task: str
    site: str  # the bridge site the edit enters the dense model at
    nodes: list[NodeKey]
    curve: list[list[float]]  # [strength, P(correct)]
    flip_strength: float | None
    random_nodes: list[NodeKey]
    random_curve: list[list[float]]
    random_flip_strength: float | None
    circuit: dict = field(default_factory=dict)  # the circuit's status, size and losses

    def summary(self) -> dict:
        return asdict(self)


def node_site(layer: int, kind: str, num_layers: int) -> int:
    """The first bridge site (model/bridge.py order) whose residual includes what the node computes."""
    if kind == "embed":
        return 0
    if kind in _ATTENTION:
        return 2 * layer + 1
    if kind in HOOKS:  # MLP nodes: the next layer's pre-attention residual, or the final one
        return 2 * layer + 2
    raise ValueError(f"node kind {kind!r} has no bridge site")


def steerable(pair: BridgedPair) -> list[NodeKey]:
    """Every node of the sparse model that a bridge site sees (all but the unembedding's read)."""
    return [(layer, kind, i) for (layer, kind), size in locations(pair.sparse).items() if kind != "final"
            for i in range(size)]


@dataclass
class Prompts:
    """A task's prompts as one right-padded batch, each row's last position, and (`with_activations`) every
    node's activation there in the sparse model: what the cue search and every curve share."""

    batch: torch.Tensor  # (sequences, T)
    rows: torch.Tensor
    last: torch.Tensor
    candidates: torch.Tensor  # (sequences, 2): [own answer, the other]
    acts: dict[Location, torch.Tensor] = field(default_factory=dict)  # (sequences, size) per location


@torch.no_grad()
def prepare(pair: BridgedPair, task: EncodedTask, pad_id: int, *, with_activations: bool = True) -> Prompts:
    batch, lengths = pad_prompts(task.prompts, pair.sparse.cfg.context_length, pad_id)
    device = next(pair.sparse.parameters()).device
    rows = torch.arange(len(lengths), device=device)
    last = torch.tensor([n - 1 for n in lengths], device=device)
    prompts = Prompts(batch.to(device), rows, last, task.candidates.to(device))
    if with_activations:
        names = {loc: hook_name(loc, pair.sparse.cfg.num_layers) for loc in locations(pair.sparse)}
        with record(pair.sparse, list(names.values())) as cache:
            pair.sparse(prompts.batch)
        prompts.acts.update({loc: cache[name][rows, last] for loc, name in names.items()})
    return prompts


def _partner(x: torch.Tensor) -> torch.Tensor:
    """Each sequence's partner's row: sequences 2i and 2i + 1 are a pair."""
    return x.view(-1, 2, *x.shape[1:]).flip(1).reshape(x.shape)


def cue_gaps(prompts: Prompts, candidates: list[NodeKey]) -> dict[NodeKey, float]:
    """Each candidate's mean |partner - own| last-token activation over the prompts."""
    acts = prompts.acts
    return {key: float((_partner(acts[key[:2]][:, key[2]]) - acts[key[:2]][:, key[2]]).abs().mean())
            for key in candidates if key[1] != "final"}


def cue_nodes(prompts: Prompts, candidates: list[NodeKey], count: int) -> list[NodeKey]:
    """The `count` candidates whose last-token activation differs most between a pair's two prompts."""
    gap = cue_gaps(prompts, candidates)
    return sorted(gap, key=lambda k: (-gap[k], k))[:count]


def control_nodes(pair: BridgedPair, prompts: Prompts, candidates: list[NodeKey], chosen: list[NodeKey],
                  seed: int) -> list[NodeKey]:
    """The control: as many nodes as `chosen`, drawn at random (seeded) from the same candidates among those
    that differ at all between a pair's prompts; topped up from every other node of the sparse model that
    does. (A node equal in both prompts, such as the embedding of the shared last token, is moved nowhere
    by an edit toward its partner: drawn as a control, it makes the control a no-op by construction.)"""
    generator = torch.Generator().manual_seed(seed)
    out: list[NodeKey] = []
    for pool in (candidates, steerable(pair)):
        need = len(chosen) - len(out)
        if need == 0:
            break  # the candidates sufficed: no gaps over the whole model
        taken = set(chosen) | set(out)
        gap = cue_gaps(prompts, [k for k in pool if k not in taken])
        moving = sorted(k for k, g in gap.items() if g > 1e-6)
        out += [moving[i] for i in torch.randperm(len(moving), generator=generator)[:need].tolist()]
    return sorted(out)


@torch.no_grad()
def steering_curve(pair: BridgedPair, prompts: Prompts, nodes: list[NodeKey], strengths: list[float]
                   ) -> tuple[int, list[list[float]]]:
    """(site, [[s, mean P(own answer)] ...]) for edits of `nodes` toward each prompt's partner."""
    batch, rows, last, acts, device = prompts.batch, prompts.rows, prompts.last, prompts.acts, prompts.batch.device
    layers = pair.sparse.cfg.num_layers
    site = max(node_site(layer, kind, layers) for layer, kind, _ in nodes)
    by_location: dict[Location, list[int]] = {}
    for layer, kind, i in nodes:
        by_location.setdefault((layer, kind), []).append(i)
    base = residuals(pair.sparse, batch)[site]
    dense = residuals(pair.dense, batch)[site]
    curve = []
    for s in strengths:
        def edit(loc: Location, s: float = s):
            index = torch.tensor(by_location[loc], device=device)
            own = acts[loc][:, index]
            target = own + s * (_partner(acts[loc])[:, index] - own)

            def fn(x: torch.Tensor) -> torch.Tensor:
                x = x.clone()
                x[rows[:, None], last[:, None], index[None, :]] = target.to(x.dtype)
                return x
            return fn

        with intervene(pair.sparse, {hook_name(loc, layers): edit(loc) for loc in by_location}):
            edited = residuals(pair.sparse, batch)[site]
        delta = pair.bridge.decode(site, edited) - pair.bridge.decode(site, base)
        logits = run_from(pair.dense, site, dense + delta, batch)[rows, last]  # (sequences, vocab)
        pair_logits = logits.gather(1, prompts.candidates)  # [own answer, the other]
        curve.append([float(s), float(torch.softmax(pair_logits.float(), dim=-1)[:, 0].mean())])
    return site, curve


_WRITES = ("embed", "attn_out", "mlp_out")


@torch.no_grad()
def decoder_directions(pair: BridgedPair, nodes: list[NodeKey], top: int = 3) -> dict[NodeKey, str]:
    """For each residual-writing node, its decoder column at the first site after it: the dense-model
    direction it writes to (norm, then the largest dense channels with their weights)."""
    out = {}
    for layer, kind, i in nodes:
        if kind not in _WRITES:
            continue
        column = pair.bridge.decoders[node_site(layer, kind, pair.sparse.cfg.num_layers)].weight[:, i]
        order = column.abs().argsort(descending=True)[:top].tolist()
        out[(layer, kind, i)] = f"|w| {float(column.norm()):.3g}: " + ", ".join(
            f"ch {c} ({float(column[c]):+.2g})" for c in order)
    return out


def flip_strength(curve: list[list[float]]) -> float | None:
    """The smallest strength at which P(correct) is below 1/2, if the curve starts above it."""
    if not curve or curve[0][1] < 0.5:
        return None
    return next((s for s, p in curve if p < 0.5), None)


def steer(pair: BridgedPair, task: EncodedTask, candidates: list[NodeKey], *, count: int, strengths: list[float],
          pad_id: int, seed: int = 0) -> SteerResult:
    """Cue nodes among `candidates` (the circuit), their steering curve, and the random control's."""
    prompts = prepare(pair, task, pad_id)
    nodes = cue_nodes(prompts, candidates, count)
    site, curve = steering_curve(pair, prompts, nodes, strengths)
    random_nodes = control_nodes(pair, prompts, candidates, nodes, seed)
    # no node of the model differs between the prompts but the chosen ones: no control to draw
    random_curve = steering_curve(pair, prompts, random_nodes, strengths)[1] if random_nodes else []
    return SteerResult(task=task.name, site=site_names(pair.sparse.cfg.num_layers)[site], nodes=nodes, curve=curve,
                       flip_strength=flip_strength(curve), random_nodes=random_nodes, random_curve=random_curve,
                       random_flip_strength=flip_strength(random_curve))


@torch.no_grad()
def circuit_through_bridge(pair: BridgedPair, task: EncodedTask, kept, means, pad_id: int) -> dict[str, float]:
    """How much of the dense model's task behaviour the sparse circuit explains: the dense model's held-out
    task loss with its final residual replaced by the decoded final residual of the sparse model in which
    only `kept` nodes run (the rest mean-ablated), next to the dense model's own loss and the same
    replacement with every sparse node kept and with none. `recovered` = (none - circuit) / (none - dense)."""
    prompts = prepare(pair, task, pad_id, with_activations=False)
    batch = prompts.batch
    final = len(site_names(pair.sparse.cfg.num_layers)) - 1

    def loss(logits: torch.Tensor) -> float:
        return float(pair_loss(logits[prompts.rows, prompts.last].gather(1, prompts.candidates)).mean())

    def bridged(nodes) -> float:
        with intervene(pair.sparse, ablation_hooks(pair.sparse, gates_from_kept(nodes), means)):
            x = residuals(pair.sparse, batch)[final]
        return loss(pair.dense.unembed(pair.bridge.decode(final, x), batch))

    none = kept_nodes(pair.sparse, [])
    out = {"dense_task_loss": loss(pair.dense(batch)), "bridged_task_loss": bridged(all_kept(pair.sparse)),
           "circuit_task_loss": bridged(kept), "ablated_task_loss": bridged(none)}
    gap = out["ablated_task_loss"] - out["dense_task_loss"]
    out["recovered"] = (out["ablated_task_loss"] - out["circuit_task_loss"]) / gap if gap > 0 else float("nan")
    return out


def steer_run(run_dir: Path, cfg: ExperimentConfig, task_name: str, *, count: int, max_strength: float,
              points: int = 31, device: str = "cpu", log=print) -> tuple[dict, Path]:
    """`circuitscale steer`: the task's circuit in a finished bridge run's sparse model, what it explains of
    the dense model, the steering curve and its control; writes `<run>/steer/<task>/steering.json`."""
    if task_name not in TASKS:
        raise UserError(f"steer: unknown task {task_name!r}; known: {', '.join(TASKS)}")
    pair = load_bridge(Path(run_dir), device)
    dataset = build_data(cfg.data, progress=False).dataset
    tokenizer = dataset.tokenizer()
    pad_id = eot_id(tokenizer)
    task = TASKS[task_name]
    train = encode_task(task, tokenizer, split="train", pairs=cfg.prune.pairs)
    test = encode_task(task, tokenizer, split="test", pairs=cfg.prune.pairs)
    means = node_means(pair.sparse, token_loader(cfg, dataset, "train"), cfg.prune.mean_batches,
                       cfg.prune.mean_pooling, device)
    log(f"pruning the sparse model on {task_name} (target {cfg.prune.target_loss}, {cfg.prune.steps} steps)")
    record = prune_task(pair.sparse, train, test, means, cfg.prune, pad_id=pad_id, device=device)
    circuit = {"status": record.status, "nodes": len(record.nodes), "edges": record.edges,
               "unpruned_loss": record.unpruned_loss, "sufficiency_loss": record.sufficiency_loss}
    folder = Path(run_dir) / "steer" / task_name
    folder.mkdir(parents=True, exist_ok=True)
    if record.status == "found":
        members = [n.key for n in record.nodes]
        circuit |= circuit_through_bridge(pair, test, kept_nodes(pair.sparse, members), means, pad_id)
        write_viewer(folder / "circuit.html", record, pair.sparse, tokenizer, test, viewer_batches(cfg, dataset),
                     model_name=f"bridge {Path(run_dir).name}", device=device,
                     bridge=decoder_directions(pair, members))
    else:  # no circuit at the target: the cue nodes are sought among every node, and the output says so
        members = steerable(pair)
        log(f"no circuit for {task_name} ({record.status}); cue nodes are sought among all {len(members)} nodes")
    strengths = [max_strength * i / (points - 1) for i in range(points)]
    result = steer(pair, test, members, count=count, strengths=strengths, pad_id=pad_id, seed=cfg.train.seed)
    result.circuit = circuit
    (folder / "steering.json").write_text(json.dumps(result.summary(), indent=1) + "\n")
    return result.summary(), folder
