import torch

from model.config import ModelConfig
from model.gpt import GPT
from model.graph import Node, all_kept, count_edges, edge_list, hook_name, kept_nodes, locations
from model.hooks import hook_points


def hand_built() -> GPT:
    """1 layer, d_model 4 (2 heads of 2), 4 neurons, vocab 3; every weight zero except a few."""
    model = GPT(ModelConfig(d_model=4, num_layers=1, d_head=2, mlp_ratio=1, context_length=8), 3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".weight") and p.dim() == 2:
                p.zero_()
        block = model.transformer["h"][0]
        w = block.attn.c_attn.weight  # rows: q 0..3, k 4..7, v 8..11
        w[0, 1] = 1.0  # attn_in 1 -> q 0
        w[4 + 3, 0] = 1.0  # attn_in 0 -> k 3
        w[8 + 2, 1] = 1.0  # attn_in 1 -> v 2
        block.attn.c_proj.weight[3, 2] = 1.0  # v 2 -> attn_out 3
        block.mlp.c_fc.weight[1, 3] = 1.0  # mlp_in 3 -> neuron 1
        block.mlp.c_proj.weight[0, 1] = 1.0  # neuron 1 -> mlp_out 0
        model.lm_head.weight[2, 0] = 1.0  # final 0 -> logit of token 2
    return model


KEPT = [
    (-1, "embed", 1), (0, "attn_in", 1), (0, "q", 0), (0, "v", 2), (0, "attn_out", 3),
    (0, "mlp_in", 3), (0, "mlp_neuron", 1), (0, "mlp_out", 0), (1, "final", 0),
]


def test_locations_cover_every_channel_and_map_to_hooks():
    model = hand_built()
    assert sum(locations(model).values()) == 4 + 8 * 4 + 4
    names = set(hook_points(model))
    assert all(hook_name(loc, 1) in names for loc in locations(model))


def test_kept_nodes_keeps_exactly_the_given_nodes():
    model = hand_built()
    kept = kept_nodes(model, KEPT)
    assert {loc: mask.shape[0] for loc, mask in kept.items()} == locations(model)  # every location, pruned or not
    assert sorted((layer, kind, i) for (layer, kind), mask in kept.items() for i in mask.nonzero().flatten().tolist()
                  ) == sorted(KEPT)
    assert not any(mask.any() for mask in kept_nodes(model, []).values())


def test_edges_of_a_hand_built_circuit():
    model = hand_built()
    kept = kept_nodes(model, KEPT)
    edges = set(edge_list(model, kept))
    assert edges == {
        (Node(-1, "embed", 1), Node(0, "attn_in", 1)),  # residual channel 1
        (Node(0, "attn_out", 3), Node(0, "mlp_in", 3)),  # residual channel 3
        (Node(0, "mlp_out", 0), Node(1, "final", 0)),  # residual channel 0
        (Node(0, "attn_in", 1), Node(0, "q", 0)),
        (Node(0, "attn_in", 1), Node(0, "v", 2)),
        (Node(0, "v", 2), Node(0, "attn_out", 3)),
        (Node(0, "mlp_in", 3), Node(0, "mlp_neuron", 1)),
        (Node(0, "mlp_neuron", 1), Node(0, "mlp_out", 0)),
        (Node(1, "final", 0), Node(2, "logit", 2)),
    }
    assert count_edges(model, kept) == 9
    assert count_edges(model, kept, output_tokens=[0, 1]) == 8  # token 2 is not of interest
    assert (Node(1, "final", 0), Node(2, "logit", 2)) in edge_list(model, kept, output_tokens=[2])


def test_all_kept_and_zero_norm_gains():
    model = hand_built()
    # residual: embed -> 4 attn_in + 4 mlp_in + 4 final; attn_out -> 4 mlp_in + 4 final; mlp_out -> 4 final
    # weights: q, k, v, attn_out, neuron, mlp_out, logit: 7 nonzero entries
    assert count_edges(model, all_kept(model)) == 24 + 7
    with torch.no_grad():
        model.transformer["h"][0].ln_2.weight[3] = 0.0  # channel 3 is no longer read by the MLP
    assert count_edges(model, kept_nodes(model, KEPT)) == 8
    assert count_edges(model, {}) == 0


def test_edge_weights_are_the_entries_they_stand_for():
    from model.graph import edge_weight

    model = hand_built()
    weights = {(s.kind, t.kind): edge_weight(model, s, t) for s, t in edge_list(model, kept_nodes(model, KEPT))}
    assert weights[("attn_in", "q")] == 1.0 and weights[("v", "attn_out")] == 1.0
    assert weights[("embed", "attn_in")] == 1.0  # the norm gain of the reading channel
    with torch.no_grad():
        model.transformer["h"][0].mlp.c_fc.weight[1, 3] = -2.5
    assert edge_weight(model, Node(0, "mlp_in", 3), Node(0, "mlp_neuron", 1)) == -2.5
    assert edge_weight(model, Node(1, "final", 0), Node(2, "logit", 2)) == 1.0
