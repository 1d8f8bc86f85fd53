"""The node graph (METHOD.md section 4): node addresses, and the edges between kept nodes.

Nodes, one per channel: `embed` (the embedding's residual write, layer -1), per layer `attn_in` and
`mlp_in` (residual reads after each norm), `q`, `k`, `v` (attention channels), `attn_out` and
`mlp_out` (residual writes), `mlp_neuron` (after GELU), and `final` (the unembedding's read after
ln_f, layer = num_layers).

An edge is a nonzero weight between two kept nodes:
- residual: a write (embed, attn_out, mlp_out) to every later read (attn_in, mlp_in, final) of the
  same channel, through the identity of the residual stream and the read's nonzero norm gain;
- read -> q / k / v through c_attn, v -> attn_out through attn c_proj (q and k meet in the attention
  pattern, not through a weight, so they have no outgoing edge);
- read -> neuron through c_fc, neuron -> write through mlp c_proj;
- final -> unembedding: nonzero lm_head entries from a kept final channel to the output tokens
  of interest (all tokens by default; a task passes its two candidates).
Kept sets are `{(layer, kind): bool tensor over that location's channels}`; a missing location
counts as fully pruned.
"""

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from model.config import d_mlp
from model.gpt import GPT

Location = tuple[int, str]
KeptNodes = dict[Location, torch.Tensor]
READS, WRITES = ("attn_in", "mlp_in"), ("attn_out", "mlp_out")
# Hook point per node kind (relative to its block), so pruning masks sit where the nodes are.
HOOKS = {
    "attn_in": "attn.hook_in", "q": "attn.hook_q", "k": "attn.hook_k", "v": "attn.hook_v",
    "attn_out": "attn.hook_out", "mlp_in": "mlp.hook_in", "mlp_neuron": "mlp.hook_post", "mlp_out": "mlp.hook_out",
}


@dataclass(frozen=True, order=True)
class Node:
    layer: int
    kind: str
    index: int


def locations(model: GPT) -> dict[Location, int]:
    """Every node location with its number of channels, in forward order."""
    d, inner, hidden = model.cfg.d_model, model.cfg.d_model, d_mlp(model.cfg)
    sizes: dict[Location, int] = {(-1, "embed"): d}
    for layer in range(model.cfg.num_layers):
        for kind, size in (("attn_in", d), ("q", inner), ("k", inner), ("v", inner), ("attn_out", d),
                           ("mlp_in", d), ("mlp_neuron", hidden), ("mlp_out", d)):
            sizes[(layer, kind)] = size
    sizes[(model.cfg.num_layers, "final")] = d
    return sizes


def hook_name(location: Location, num_layers: int) -> str:
    layer, kind = location
    if kind == "embed":
        return "hook_embed"
    if kind == "final":
        return "hook_resid_final"
    return f"transformer.h.{layer}.{HOOKS[kind]}"


def all_kept(model: GPT) -> KeptNodes:
    return {loc: torch.ones(size, dtype=torch.bool) for loc, size in locations(model).items()}


def kept_nodes(model: GPT, nodes: Iterable[tuple[int, str, int]]) -> KeptNodes:
    """The kept-node set that keeps exactly `nodes`, each (layer, kind, index); every other node is pruned."""
    kept = {loc: torch.zeros(size, dtype=torch.bool) for loc, size in locations(model).items()}
    for layer, kind, index in nodes:
        kept[(layer, kind)][index] = True
    return kept


def count_edges(model: GPT, kept: KeptNodes, output_tokens: list[int] | None = None) -> int:
    return sum(int(mask.sum()) for _, _, mask in _edge_blocks(model, kept, output_tokens))


def edge_list(model: GPT, kept: KeptNodes, output_tokens: list[int] | None = None) -> list[tuple[Node, Node]]:
    """Every edge as (source node, target node); the unembedding's targets are ('logit', token id)."""
    edges = []
    for source, target, mask in _edge_blocks(model, kept, output_tokens):
        for t, s in mask.nonzero().tolist():
            if target[1] == "logit" and output_tokens is not None:
                t = output_tokens[t]  # report token ids, not positions in the token list
            edges.append((Node(source[0], source[1], s), Node(target[0], target[1], t)))
    return edges


@torch.no_grad()
def _edge_blocks(
    model: GPT, kept: KeptNodes, output_tokens: list[int] | None
) -> Iterator[tuple[Location, Location, torch.Tensor]]:
    """(source location, target location, mask[target, source]) of present edges."""
    sizes = locations(model)

    def on(loc: Location) -> torch.Tensor:
        return kept.get(loc, torch.zeros(sizes[loc], dtype=torch.bool)).to(torch.bool)

    blocks = model.transformer["h"]
    L = len(blocks)
    inner = model.cfg.d_model
    writes = [(-1, "embed")]
    for layer, block in enumerate(blocks):
        for read, norm in (("attn_in", block.ln_1), ("mlp_in", block.ln_2)):
            for source in writes:
                yield source, (layer, read), torch.diag(on(source) & on((layer, read)) & (norm.weight != 0))
            if read == "attn_in":
                w_q, w_k, w_v = block.attn.c_attn.weight.split(inner, dim=0)
                for kind, w in (("q", w_q), ("k", w_k), ("v", w_v)):
                    yield (layer, read), (layer, kind), _weight_mask(w, on((layer, read)), on((layer, kind)))
                w_o = block.attn.c_proj.weight
                yield (layer, "v"), (layer, "attn_out"), _weight_mask(w_o, on((layer, "v")), on((layer, "attn_out")))
                writes.append((layer, "attn_out"))
            else:
                neuron, out = (layer, "mlp_neuron"), (layer, "mlp_out")
                yield (layer, read), neuron, _weight_mask(block.mlp.c_fc.weight, on((layer, read)), on(neuron))
                yield neuron, out, _weight_mask(block.mlp.c_proj.weight, on(neuron), on(out))
                writes.append(out)
    final = (L, "final")
    for source in writes:
        yield source, final, torch.diag(on(source) & on(final) & (model.transformer["ln_f"].weight != 0))
    unembed = model.lm_head.weight
    if output_tokens is not None:
        unembed = unembed[output_tokens]
    tokens = torch.ones(unembed.shape[0], dtype=torch.bool)
    yield final, (L + 1, "logit"), _weight_mask(unembed, on(final), tokens)


def _weight_mask(weight: torch.Tensor, kept_in: torch.Tensor, kept_out: torch.Tensor) -> torch.Tensor:
    """mask[out, in]: the weight is nonzero and both ends are kept."""
    return (weight != 0) & kept_out[:, None] & kept_in[None, :]


@torch.no_grad()
def edge_weight(model: GPT, source: Node, target: Node) -> float:
    """The weight an edge stands for: the read's norm gain for a residual edge, else the matrix entry
    (for the unembedding, target.index is the token id)."""
    if target.kind in ("attn_in", "mlp_in", "final"):
        if target.kind == "final":
            norm = model.transformer["ln_f"]
        else:
            block = model.transformer["h"][target.layer]
            norm = block.ln_1 if target.kind == "attn_in" else block.ln_2
        return float(norm.weight[target.index])
    if target.kind == "logit":
        return float(model.lm_head.weight[target.index, source.index])
    block = model.transformer["h"][target.layer]
    if target.kind in ("q", "k", "v"):
        offset = ("q", "k", "v").index(target.kind) * model.cfg.d_model
        return float(block.attn.c_attn.weight[offset + target.index, source.index])
    matrix = {"attn_out": block.attn.c_proj, "mlp_neuron": block.mlp.c_fc, "mlp_out": block.mlp.c_proj}[target.kind]
    return float(matrix.weight[target.index, source.index])
