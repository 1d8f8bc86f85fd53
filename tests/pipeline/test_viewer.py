import dataclasses
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from model.graph import all_kept, edge_list, edge_weight, hook_name, kept_nodes
from model.hooks import record
from pipeline.prune import PruneConfig, circuit_loss, prune_task
from pipeline.records import CircuitRecord, EdgeRecord, NodeRecord
from pipeline.viewer import KIND_COLOUR, Example, node_examples, padded, render


@pytest.fixture(scope="module")
def circuit(tiny_task_setup):
    model, means, train, test, pad, loader, tok = tiny_task_setup
    full = circuit_loss(model, train, all_kept(model), means, pad, "cpu")
    rec = prune_task(model, train, test, means, dataclasses.replace(PruneConfig(), steps=5, target_loss=full + 0.05),
                     pad_id=pad)  # an untrained model: the empty circuit does; give it a hand-picked one to draw
    nodes = [(-1, "embed", 1), (0, "attn_in", 1), (0, "v", 2), (0, "attn_out", 5), (0, "mlp_in", 5),
             (0, "mlp_neuron", 7), (0, "mlp_out", 9), (1, "final", 9)]
    tokens = sorted(set(test.candidates.flatten().tolist()))
    rec = dataclasses.replace(rec, status="found", sufficiency_loss=0.125, necessity_loss=0.75, random_loss=0.7,
                              nodes=[NodeRecord(*n, 0.0) for n in nodes], edge_list=[
        EdgeRecord(s.layer, s.kind, s.index, t.layer, t.kind, t.index, edge_weight(model, s, t))
        for s, t in edge_list(model, kept_nodes(model, nodes), output_tokens=tokens)])
    assert len(rec.edge_list) > len(nodes) and any(e.dst_kind == "logit" for e in rec.edge_list)
    return model, tok, rec, test, [loader.batch(i)[:, :-1] for i in range(2)]


def test_examples_are_the_largest_activations_and_skip_padding(circuit):
    model, tok, rec, _, batches = circuit
    node = (0, "mlp_neuron", 3)
    batch = batches[0].clone()
    batch[1, 10:] = -1  # padding: never an example
    examples = node_examples(model, tok, [node], [batch], top=3)[node]
    with torch.no_grad(), record(model, [hook_name((0, "mlp_neuron"), 1)]) as cache:
        model(batch.clamp(min=0))
    act = cache[hook_name((0, "mlp_neuron"), 1)][..., 3]
    act[1, 10:] = 0.0
    best = act.abs().flatten().topk(3).values
    assert [abs(e.activation) for e in examples] == pytest.approx(best.tolist(), rel=1e-5)
    b, t = divmod(int(act.abs().flatten().argmax()), act.shape[1])
    assert examples[0].token == tok.decode([int(batch[b, t])])
    assert "".join(examples[0].before) == tok.decode(batch[b, max(0, t - 12): t].tolist())


def page_for(circuit) -> str:
    model, tok, rec, test, batches = circuit
    nodes = [n.key for n in rec.nodes]
    candidates = {int(t): tok.decode([int(t)]) for t in test.candidates.flatten().unique().tolist()}
    return render(rec, model_name="tiny", candidate_tokens=candidates,
                  task_examples=node_examples(model, tok, nodes, padded(test.prompts, 32)),
                  data_examples=node_examples(model, tok, nodes, batches))


def test_page_draws_every_node_and_edge_and_is_self_contained(circuit):
    _, _, rec, _, _ = circuit
    page = page_for(circuit)
    logits = {e.dst for e in rec.edge_list if e.dst_kind == "logit"}
    assert page.count("<circle") == len(rec.nodes) + len(logits)
    assert page.count("<path") == len(rec.edge_list)
    for n in rec.nodes:
        assert f'id="n-{n.layer}-{n.kind}-{n.index}"' in page and f'href="#n-{n.layer}-{n.kind}-{n.index}"' in page
    assert f"{rec.sufficiency_loss:.3f}" in page and f"{len(rec.nodes)} of {rec.total_nodes}" in page
    # offline: nothing fetched from anywhere (the only URL is the SVG namespace), no scripts
    assert re.findall(r"(?:src|href)=\"(?!#)", page) == [] and "<script" not in page and "<link" not in page


def test_empty_and_unreachable_circuits_say_why(circuit):
    _, _, rec, _, _ = circuit
    empty = dataclasses.replace(rec, nodes=[], edge_list=[], edges=0, status="direct", empty_loss=0.01)
    page = render(empty, model_name="m", candidate_tokens={}, task_examples={}, data_examples={})
    assert "Direct path: the empty circuit reaches the target" in page and "0.010" in page
    missing = CircuitRecord(task="t", target_loss=0.15, unpruned_loss=1.0, total_nodes=10, status="unreachable")
    assert "does not reach the target" in render(missing, model_name="m", candidate_tokens={}, task_examples={},
                                                data_examples={})



def test_tokens_are_escaped_and_show_their_whitespace(circuit):
    _, _, rec, _, _ = circuit
    odd = Example(before=["<b>", " x"], token="\n&", activation=0.5)
    page = render(rec, model_name="<m>", candidate_tokens={}, task_examples={rec.nodes[0].key: [odd]},
                  data_examples={})
    assert '<span class="ctx">&lt;b&gt;·x</span><mark>⏎&amp;</mark> <span class="act">+0.5</span>' in page
    assert "<b>" not in page and "<title>if_equals circuit — &lt;m&gt;</title>" in page

def chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


def test_page_renders_a_graph_in_headless_chromium(circuit, tmp_path):
    """A screenshot of the page shows the graph (the node colours and edge colours are on screen)."""
    browser = chromium()
    if browser is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but no chromium on PATH (.ci/run installs Debian's chromium package)")
        pytest.skip("no chromium on this machine")
    from PIL import Image

    (tmp_path / "circuit.html").write_text(page_for(circuit), encoding="utf-8")
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1000",
                    f"--screenshot={shot}", (tmp_path / "circuit.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = torch.from_numpy(np.array(Image.open(shot).convert("RGB"))).reshape(-1, 3).int()

    def on_screen(hex_colour: str) -> int:
        rgb = torch.tensor([int(hex_colour[i: i + 2], 16) for i in (1, 3, 5)], dtype=torch.int32)
        return int(((pixels - rgb).abs().max(dim=1).values <= 8).sum())

    _, _, rec, _, _ = circuit
    kinds = {n.kind for n in rec.nodes}
    missing = [k for k in kinds if on_screen(KIND_COLOUR[k]) < 100]  # a node disc is ~250 pixels
    assert not missing, f"node kinds not on screen: {missing}"
    assert on_screen(KIND_COLOUR["logit"]) >= 100  # the candidate logits
    assert on_screen("#fafafa") > 50_000  # the graph panel itself


def test_a_bridged_circuit_shows_where_each_writing_node_goes_in_the_dense_model(circuit):
    _, _, rec, _, _ = circuit
    writer = next(n.key for n in rec.nodes if n.kind in ("embed", "attn_out", "mlp_out"))
    page = render(rec, model_name="m", candidate_tokens={}, task_examples={}, data_examples={},
                  bridge={writer: "|w| 1.5: ch 7 (+0.9)"})
    assert "writes to the dense model (bridge decoder)" in page and "|w| 1.5: ch 7 (+0.9)" in page
    assert "bridge decoder" not in page_for(circuit)  # an ordinary model's page has no such column
