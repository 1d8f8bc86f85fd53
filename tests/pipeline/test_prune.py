import dataclasses

import pytest
import torch

from model.graph import all_kept, locations
from model.hooks import intervene, record
from pipeline.prune import (
    NodeMask,
    PruneConfig,
    ablation_hooks,
    bisect_k,
    circuit_loss,
    kept_top,
    node_means,
    prune_task,
)
from pipeline.records import CircuitRecord


@pytest.fixture(scope="module")
def setup(tiny_task_setup):
    return tiny_task_setup[:6]


def test_node_means_shapes_and_pooling(setup):
    model, means, _, _, _, loader = setup
    assert {loc: m.shape[-1] for loc, m in means.items()} == locations(model)
    per_position = node_means(model, loader, 2, "per_position")
    assert all(m.shape == (32, size) for (loc, size), m in zip(locations(model).items(), per_position.values(),
                                                                strict=True))
    torch.testing.assert_close(per_position[(0, "mlp_neuron")].mean(0), means[(0, "mlp_neuron")], atol=1e-5,
                               rtol=1e-4)


def test_fully_pruned_nodes_carry_their_means(setup):
    model, means, _, _, _, _ = setup
    gates = {loc: torch.zeros(size) for loc, size in locations(model).items()}
    name = "transformer.h.0.mlp.hook_post"
    with intervene(model, ablation_hooks(model, gates, means)), record(model, [name]) as cache:
        model(torch.randint(0, 100, (2, 10)))
    torch.testing.assert_close(cache[name], means[(0, "mlp_neuron")].expand(2, 10, -1))


def test_mask_is_a_hard_step_with_a_sigmoid_surrogate_gradient():
    mask = NodeMask({(0, "q"): 4}, temperature=0.5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mask.tau[0].copy_(torch.tensor([0.3, -0.2, 0.0, 1.5]))
    gate = mask.gates()[(0, "q")]
    assert gate.tolist() == [1.0, 0.0, 0.0, 1.0]
    gate.sum().backward()
    s = torch.sigmoid(torch.tensor([0.3, -0.2, 0.0, 1.5]) / 0.5)
    torch.testing.assert_close(mask.tau[0].grad, s * (1 - s) / 0.5)
    with torch.no_grad():
        mask.tau[0].mul_(10)
    mask.clamp_()
    assert mask.tau[0].abs().max() <= 1.0


def test_bisection_finds_the_smallest_circuit_that_reaches_the_target(setup):
    model, means, train, _, pad, _ = setup
    ranking = [(loc, i) for loc, size in locations(model).items() for i in range(size)]
    full = circuit_loss(model, train, all_kept(model), means, pad, "cpu")
    target = full + 0.02
    found = bisect_k(model, train, ranking, means, target, pad, "cpu")
    assert found is not None
    k, loss = found
    assert loss <= target
    if k > 0:
        assert circuit_loss(model, train, kept_top(model, ranking, k - 1), means, pad, "cpu") > target
    assert bisect_k(model, train, ranking, means, 1e-6, pad, "cpu") is None  # unreachable is reported


def test_prune_task_records_a_validated_circuit(setup, tmp_path):
    model, means, train, test, pad, _ = setup
    full = circuit_loss(model, train, all_kept(model), means, pad, "cpu")
    cfg = dataclasses.replace(PruneConfig(), steps=20, target_loss=full + 0.05, batch_pairs=4)
    rec = prune_task(model, train, test, means, cfg, pad_id=pad)
    assert rec.status == "found" and rec.total_nodes == sum(locations(model).values())
    assert len(rec.nodes) <= rec.total_nodes and rec.edges == len(rec.edge_list)
    assert all(len(n) == 4 and isinstance(n[3], float) for n in rec.nodes)  # with its mean activation
    kept = {(n[0], n[1], n[2]) for n in rec.nodes}
    for src_layer, src_kind, src_i, dst_layer, dst_kind, dst_i, weight in rec.edge_list:
        assert (src_layer, src_kind, src_i) in kept and weight != 0.0
        assert dst_kind == "logit" or (dst_layer, dst_kind, dst_i) in kept
    for value in (rec.sufficiency_loss, rec.necessity_loss, rec.random_loss):
        assert value is not None and value >= 0
    rec.save(tmp_path / "circuit.json")
    assert CircuitRecord.load(tmp_path / "circuit.json") == rec
    unreachable = prune_task(model, train, test, means, dataclasses.replace(cfg, target_loss=1e-6), pad_id=pad)
    assert unreachable.status == "unreachable" and unreachable.nodes == []
