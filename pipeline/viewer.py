"""The circuit viewer: one self-contained HTML page per circuit (no server, no network, no script).

The page draws the circuit as an inline SVG, layers left to right (embedding, then per layer the
attention reads, q/k/v, attention writes, MLP reads, neurons, MLP writes, then the final read and the
two candidate logits); edges are drawn with width by |weight| and colour by sign. Every node links to
its row in a table below: its mean activation, its top-activating task tokens (on the task's held-out
prompts) and its top-activating contexts from pretraining data (a simple concept or not?). The
validation numbers of the record head the page.
"""

import html
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from model.gpt import GPT
from model.graph import hook_name
from model.hooks import record
from pipeline.records import CircuitRecord
from pipeline.tasks import pad_prompts

# Forward order of node kinds within a layer (the columns of the drawing).
KIND_ORDER = ("embed", "attn_in", "q", "k", "v", "attn_out", "mlp_in", "mlp_neuron", "mlp_out", "final", "logit")
KIND_COLOUR = {
    "embed": "#6b6b6b", "attn_in": "#1f77b4", "q": "#17becf", "k": "#9467bd", "v": "#8c564b",
    "attn_out": "#1f77b4", "mlp_in": "#2ca02c", "mlp_neuron": "#ff7f0e", "mlp_out": "#2ca02c",
    "final": "#444444", "logit": "#d62728",
}
CONTEXT_TOKENS = 12  # tokens of context shown before an example's active token


@dataclass(frozen=True)
class Example:
    """One activating position: the tokens before it, the token itself, and the node's activation."""

    before: list[str]
    token: str
    activation: float


NodeKey = tuple[int, str, int]


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


def _column(layer: int, kind: str) -> tuple[int, int]:
    return (layer, KIND_ORDER.index(kind))


def _label(kind: str, index: int, tokens: dict[int, str]) -> str:
    return f"logit {tokens.get(index, index)!r}" if kind == "logit" else f"{kind} {index}"


def _tok(text: str) -> str:
    """A token for display: whitespace made visible."""
    return html.escape(text.replace("\n", "⏎").replace("\t", "⇥").replace(" ", "·"))


def _example_html(example: Example) -> str:
    return (f'<span class="ctx">{"".join(_tok(t) for t in example.before)}</span>'
            f'<mark>{_tok(example.token)}</mark> <span class="act">{example.activation:+.3g}</span>')


def render(rec: CircuitRecord, *, model_name: str, candidate_tokens: dict[int, str],
           task_examples: dict[NodeKey, list[Example]], data_examples: dict[NodeKey, list[Example]]) -> str:
    """The viewer page for one circuit record (a string of HTML)."""
    nodes: list[NodeKey] = [(int(n[0]), str(n[1]), int(n[2])) for n in rec.nodes]
    means = {(int(n[0]), str(n[1]), int(n[2])): (n[3] if len(n) > 3 else None) for n in rec.nodes}
    logits = sorted({(int(e[3]), "logit", int(e[5])) for e in rec.edge_list if e[4] == "logit"})
    everything = nodes + logits
    columns = sorted({_column(n[0], n[1]) for n in everything})
    col_x = {c: 90 + 150 * i for i, c in enumerate(columns)}
    stacks: dict[tuple[int, int], list[NodeKey]] = {}
    for node in sorted(everything):
        stacks.setdefault(_column(node[0], node[1]), []).append(node)
    tallest = max((len(s) for s in stacks.values()), default=1)
    height = max(260, 60 + 34 * tallest)
    width = max(520, 180 + 150 * len(columns))
    pos = {}
    for column, stack in stacks.items():
        top = (height - 34 * (len(stack) - 1)) / 2
        for i, node in enumerate(stack):
            pos[node] = (col_x[column], top + 34 * i)

    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 40}" '
           f'viewBox="0 0 {width} {height + 40}" role="img" aria-label="circuit graph">']
    for column in columns:
        layer, kind = column[0], KIND_ORDER[column[1]]
        caption = kind if kind in ("embed", "final", "logit") else f"L{layer} {kind}"
        svg.append(f'<text x="{col_x[column]}" y="22" class="col">{html.escape(caption)}</text>')
    biggest = max((abs(e[6]) for e in rec.edge_list), default=1.0) or 1.0
    for e in rec.edge_list:
        src = (int(e[0]), str(e[1]), int(e[2]))
        dst = (int(e[3]), str(e[4]), int(e[5]))
        if src not in pos or dst not in pos:
            continue
        (x1, y1), (x2, y2) = pos[src], pos[dst]
        w = float(e[6])
        stroke = "#2166ac" if w >= 0 else "#b2182b"
        thick = 0.6 + 4.4 * abs(w) / biggest
        svg.append(f'<path d="M{x1 + 9},{y1} C{(x1 + x2) / 2},{y1} {(x1 + x2) / 2},{y2} {x2 - 9},{y2}" '
                   f'stroke="{stroke}" stroke-width="{thick:.2f}" stroke-opacity="0.65" fill="none">'
                   f'<title>{html.escape(_label(src[1], src[2], {}))} → '
                   f'{html.escape(_label(dst[1], dst[2], candidate_tokens))}: {w:+.4g}</title></path>')
    for node in everything:
        x, y = pos[node]
        label = _label(node[1], node[2], candidate_tokens)
        examples = task_examples.get(node, [])
        hint = "; ".join(f"{e.token!r} {e.activation:+.2g}" for e in examples[:3])
        anchor = f"n-{node[0]}-{node[1]}-{node[2]}"
        svg.append(f'<a href="#{anchor}"><circle cx="{x}" cy="{y}" r="9" fill="{KIND_COLOUR[node[1]]}">'
                   f'<title>{html.escape(label)}{" | " + html.escape(hint) if hint else ""}</title></circle>'
                   f'<text x="{x + 13}" y="{y + 4}" class="lab">{html.escape(label)}</text></a>')
    svg.append("</svg>")

    def fmt(value: float | None, digits: int = 3) -> str:
        return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"

    facts = [
        ("status", rec.status), ("target loss", fmt(rec.target_loss)),
        ("unpruned loss (held out)", fmt(rec.unpruned_loss)),
        ("nodes kept", f"{len(rec.nodes)} of {rec.total_nodes}"), ("edges", str(rec.edges)),
        ("sufficiency loss (circuit alone)", fmt(rec.sufficiency_loss)),
        ("necessity loss (circuit ablated)", fmt(rec.necessity_loss)),
        ("random circuit of the same size: loss", fmt(rec.random_loss)),
        ("random circuit: edges", "—" if rec.random_edges is None else str(rec.random_edges)),
        ("attribution baseline: edges at the target", "—" if rec.attribution_edges is None
         else str(rec.attribution_edges)),
        ("pruning seconds", fmt(rec.seconds, 1)),
    ]
    notes = []
    if rec.status == "found" and not rec.nodes:
        notes.append("The empty circuit reaches the target: with every node mean-ablated, the direct token "
                     "path (the bigram table and the calibration) alone solves this task, so it says nothing "
                     "about the transformer's circuits.")
    if rec.status != "found":
        notes.append("No circuit: the whole model does not reach the target loss on this task.")
    rows = []
    for node in nodes:
        anchor = f"n-{node[0]}-{node[1]}-{node[2]}"
        task_cell = "<br>".join(_example_html(e) for e in task_examples.get(node, [])) or "—"
        data_cell = "<br>".join(_example_html(e) for e in data_examples.get(node, [])) or "—"
        mean = means.get(node)
        rows.append(f'<tr id="{anchor}"><td><span class="dot" style="background:{KIND_COLOUR[node[1]]}"></span>'
                    f'L{node[0]} {html.escape(node[1])} {node[2]}</td><td>{fmt(mean)}</td>'
                    f"<td>{task_cell}</td><td>{data_cell}</td></tr>")
    title = f"{rec.task} circuit — {model_name}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; background: #fff; }}
h1 {{ font-size: 20px; margin: 0 0 8px; }}
table {{ border-collapse: collapse; }}
td, th {{ border-bottom: 1px solid #ddd; padding: 4px 8px; vertical-align: top; text-align: left; }}
.facts td:first-child {{ color: #555; }}
.graph {{ overflow-x: auto; border: 1px solid #ccc; margin: 16px 0; background: #fafafa; }}
.col {{ font-size: 12px; font-weight: 600; text-anchor: middle; fill: #333; }}
.lab {{ font-size: 10px; fill: #333; }}
a text {{ text-decoration: none; }}
tr:target {{ background: #fff3b0; }}
.ctx {{ font-family: ui-monospace, monospace; color: #777; white-space: pre; }}
mark {{ font-family: ui-monospace, monospace; background: #ffd75e; white-space: pre; }}
.act {{ color: #555; font-size: 12px; }}
.dot {{ display: inline-block; width: 10px; height: 10px; border-radius: 5px; margin-right: 6px; }}
.note {{ background: #fdecea; padding: 8px; border-left: 4px solid #b2182b; }}
</style></head>
<body>
<h1>{html.escape(title)}</h1>
{"".join(f'<p class="note">{html.escape(n)}</p>' for n in notes)}
<table class="facts">{"".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in facts)}</table>
<div class="graph">{"".join(svg)}</div>
<p>Edges: blue positive, red negative weight, width by |weight|. Click a node for its examples;
hover for its weight or top task tokens. Tokens show spaces as ·, newlines as ⏎.</p>
<h2>Nodes</h2>
<table><tr><th>node</th><th>mean</th><th>top-activating task tokens (held-out prompts)</th>
<th>top-activating pretraining contexts</th></tr>
{"".join(rows)}
</table>
</body></html>
"""
