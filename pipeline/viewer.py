"""The circuit viewer: one self-contained HTML page per circuit (no server, no network, no script).

The page draws the circuit as an inline SVG, layers left to right (embedding, then per layer the
attention reads, q/k/v, attention writes, MLP reads, neurons, MLP writes, then the final read and the
two candidate logits); edges are drawn with width by |weight| and colour by sign. Every node links to
its row in a table below: its mean activation, its top-activating task tokens (on the task's held-out
prompts) and its top-activating contexts from pretraining data (a simple concept or not?). The
validation numbers of the record head the page. `layout` places the drawing; the page itself is the
template `templates/viewer.html.j2`.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache

import torch
from tokenizers import Tokenizer

from model.gpt import GPT
from model.graph import hook_name
from model.hooks import record
from pipeline.records import CircuitRecord, NodeKey
from pipeline.tasks import pad_prompts
from pipeline.templating import environment

# Forward order of node kinds within a layer (the columns of the drawing).
KIND_ORDER = ("embed", "attn_in", "q", "k", "v", "attn_out", "mlp_in", "mlp_neuron", "mlp_out", "final", "logit")
KIND_COLOUR = {
    "embed": "#6b6b6b", "attn_in": "#1f77b4", "q": "#17becf", "k": "#9467bd", "v": "#8c564b",
    "attn_out": "#1f77b4", "mlp_in": "#2ca02c", "mlp_neuron": "#ff7f0e", "mlp_out": "#2ca02c",
    "final": "#444444", "logit": "#d62728",
}
CONTEXT_TOKENS = 12  # tokens of context shown before an example's active token
COLUMN_GAP, ROW_GAP = 150, 34  # pixels between columns and between the nodes of a column


@dataclass(frozen=True)
class Example:
    """One activating position: the tokens before it, the token itself, and the node's activation."""

    before: list[str]
    token: str
    activation: float


def node_examples(model: GPT, tokenizer: Tokenizer, nodes: Iterable[NodeKey], sequences: Iterable[torch.Tensor],
                  *, top: int = 5, device: str | torch.device = "cpu") -> dict[NodeKey, list[Example]]:
    """The `top` positions with the largest |activation| of each node over `sequences` (batches of token
    ids, (B, T), with -1 marking padding that is skipped)."""
    nodes = list(nodes)
    by_loc: dict[tuple[int, str], list[int]] = {}
    for layer, kind, index in nodes:
        by_loc.setdefault((layer, kind), []).append(index)
    names = {loc: hook_name(loc, model.cfg.num_layers) for loc in by_loc}
    found: dict[NodeKey, list[tuple[float, list[int]]]] = {n: [] for n in nodes}
    for batch in sequences:
        valid = batch >= 0
        ids = batch.clamp(min=0)
        with torch.no_grad(), record(model, sorted(set(names.values()))) as cache:
            model(ids.to(device))
        for loc, indices in by_loc.items():
            act = cache[names[loc]][..., indices].float().cpu()  # (B, T, n)
            score = act.abs().masked_fill(~valid[..., None], -1.0)
            flat = score.flatten(0, 1)  # (B*T, n)
            best = flat.topk(min(top, flat.shape[0]), dim=0).indices  # (top, n)
            for column, index in enumerate(indices):
                for position in best[:, column].tolist():
                    b, t = divmod(position, batch.shape[1])
                    if not valid[b, t]:
                        continue
                    found[(loc[0], loc[1], index)].append(
                        (float(act[b, t, column]), ids[b, max(0, t - CONTEXT_TOKENS): t + 1].tolist()))
    out = {}
    for node, items in found.items():
        items.sort(key=lambda item: -abs(item[0]))
        out[node] = [Example([tokenizer.decode([i]) for i in window[:-1]], tokenizer.decode([window[-1]]), value)
                     for value, window in _unique(items)[:top]]
    return out


def _unique(items: list) -> list:
    """Drop repeated (activation, context) examples (the same text seen in two batches)."""
    seen, out = set(), []
    for item in items:
        key = (round(item[0], 5), tuple(item[1]))
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


def padded(prompts: list[list[int]], context_length: int, batch_size: int = 64) -> list[torch.Tensor]:
    """Task prompts as right-padded batches with -1 marking padding (see node_examples)."""
    return [pad_prompts(prompts[start: start + batch_size], context_length, -1)[0]
            for start in range(0, len(prompts), batch_size)]


# --- the drawing ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Column:
    x: int
    caption: str


@dataclass(frozen=True)
class Dot:
    """A node where the drawing puts it, with its label and hover text."""

    key: NodeKey
    x: float
    y: float
    label: str
    title: str


@dataclass(frozen=True)
class Wire:
    """An edge drawn from (x1, y1) to (x2, y2), its stroke width by |weight|."""

    x1: float
    y1: float
    x2: float
    y2: float
    weight: float
    width: float
    title: str


@dataclass(frozen=True)
class Drawing:
    width: int
    height: int  # of the node area; the SVG adds a caption row
    columns: list[Column]
    dots: list[Dot]
    wires: list[Wire]


def _column(key: NodeKey) -> tuple[int, int]:
    return (key[0], KIND_ORDER.index(key[1]))


def _label(key: NodeKey, tokens: dict[int, str]) -> str:
    _, kind, index = key
    return f"logit {tokens.get(index, index)!r}" if kind == "logit" else f"{kind} {index}"


def layout(rec: CircuitRecord, candidate_tokens: dict[int, str],
           task_examples: dict[NodeKey, list[Example]]) -> Drawing:
    """Columns by layer and kind in forward order, each column's nodes stacked and centred; the
    candidate logits the circuit writes to form the last column."""
    logits = sorted({(e.dst_layer, "logit", e.dst_index) for e in rec.edge_list if e.dst_kind == "logit"})
    everything = [n.key for n in rec.nodes] + logits
    columns = sorted({_column(key) for key in everything})
    col_x = {c: 90 + COLUMN_GAP * i for i, c in enumerate(columns)}
    stacks: dict[tuple[int, int], list[NodeKey]] = {}
    for key in sorted(everything):
        stacks.setdefault(_column(key), []).append(key)
    height = max(260, 60 + ROW_GAP * max((len(s) for s in stacks.values()), default=1))
    width = max(520, 180 + COLUMN_GAP * len(columns))
    pos = {}
    for column, stack in stacks.items():
        top = (height - ROW_GAP * (len(stack) - 1)) / 2
        for i, key in enumerate(stack):
            pos[key] = (col_x[column], top + ROW_GAP * i)
    dots = [Dot(key, *pos[key], _label(key, candidate_tokens), _title(key, candidate_tokens, task_examples))
            for key in everything]
    biggest = max((abs(e.weight) for e in rec.edge_list), default=1.0) or 1.0
    wires = [Wire(*pos[e.src], *pos[e.dst], e.weight, 0.6 + 4.4 * abs(e.weight) / biggest,
                  f"{_label(e.src, {})} → {_label(e.dst, candidate_tokens)}: {e.weight:+.4g}")
             for e in rec.edge_list if e.src in pos and e.dst in pos]
    return Drawing(width, height, [Column(col_x[c], _caption(c)) for c in columns], dots, wires)


def _caption(column: tuple[int, int]) -> str:
    layer, kind = column[0], KIND_ORDER[column[1]]
    return kind if kind in ("embed", "final", "logit") else f"L{layer} {kind}"


def _title(key: NodeKey, tokens: dict[int, str], task_examples: dict[NodeKey, list[Example]]) -> str:
    """A node's hover text: its label and its top three task tokens."""
    hint = "; ".join(f"{e.token!r} {e.activation:+.2g}" for e in task_examples.get(key, [])[:3])
    return f"{_label(key, tokens)} | {hint}" if hint else _label(key, tokens)


def shown(text: str) -> str:
    """A token for display: whitespace made visible."""
    return text.replace("\n", "⏎").replace("\t", "⇥").replace(" ", "·")


def render(rec: CircuitRecord, *, model_name: str, candidate_tokens: dict[int, str],
           task_examples: dict[NodeKey, list[Example]], data_examples: dict[NodeKey, list[Example]],
           bridge: dict[NodeKey, str] | None = None) -> str:
    """The viewer page for one circuit record (a string of HTML); `bridge`: for a bridged sparse model, what
    each residual-writing node writes into the dense model through the bridge's decoder (a column)."""
    return _template().render(
        rec=rec, title=f"{rec.task} circuit — {model_name}", drawing=layout(rec, candidate_tokens, task_examples),
        colours=KIND_COLOUR, task_examples=task_examples, data_examples=data_examples, bridge=bridge)


@cache
def _template():
    """The page's template, its Jinja environment built once per process (every circuit renders with it)."""
    env = environment("pipeline")
    env.filters["shown"] = shown
    return env.get_template("viewer.html.j2")
