import dataclasses

import pytest
import torch

from model.graph import kept_nodes, locations
from model.hooks import intervene, record
from pipeline.prune import (
    NodeMask,
    PruneConfig,
    ablation_hooks,
    bisect_k,
    calibrated_test_loss,
    circuit_loss,
    fit_calibration,
    kept_top,
    node_means,
    overlap,
    pair_logits,
    prune_task,
)
from pipeline.records import CircuitRecord, NodeRecord
from pipeline.tasks import EncodedTask, pair_loss
from tests.pipeline.planted import (
    PAD,
    PLANTED,
    TARGET,
    P,
    Q,
    X,
    Y,
    as_ranking,
    planted_means,
    planted_model,
    planted_task,
)


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


def test_partly_pruned_location_keeps_its_kept_channels(setup):
    model, means, _, _, _, _ = setup
    name, loc = "transformer.h.0.mlp.hook_post", (0, "mlp_neuron")
    tokens = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    with record(model, [name]) as clean:
        model(tokens)
    gates = {loc: (torch.arange(locations(model)[loc]) < 5).float()}  # keep channels 0..4
    with intervene(model, ablation_hooks(model, gates, means)), record(model, [name]) as seen:
        model(tokens)
    torch.testing.assert_close(seen[name][..., :5], clean[name][..., :5])
    torch.testing.assert_close(seen[name][..., 5:], means[loc][5:].expand(2, 10, -1))


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


def test_bisection_finds_the_smallest_circuit_that_reaches_the_target():
    """On the planted model (tests/pipeline/planted.py) the target is reached exactly from the prefix that
    holds the last planted node on."""
    model = planted_model()
    means, task = planted_means(model), planted_task()
    others = [((layer, kind), i) for (layer, kind), size in locations(model).items() for i in range(size)
              if (layer, kind, i) not in PLANTED]
    ranking = others[:3] + as_ranking(PLANTED[:2]) + others[3:6] + as_ranking(PLANTED[2:]) + others[6:]
    k, loss = bisect_k(model, task, ranking, means, TARGET, PAD, "cpu")
    assert k == 3 + 2 + 3 + 3 and loss <= TARGET
    assert circuit_loss(model, task, kept_top(model, ranking, k - 1), means, PAD, "cpu") > TARGET
    assert bisect_k(model, task, others, means, TARGET, PAD, "cpu") is None  # unreachable is reported


@pytest.fixture(scope="module")
def pruned():
    """The planted model (tests/pipeline/planted.py) pruned to its target: a circuit that is not empty."""
    model = planted_model()
    means, task = planted_means(model), planted_task()
    cfg = dataclasses.replace(PruneConfig(), steps=50, target_loss=TARGET, batch_pairs=8)
    return model, means, task, cfg, prune_task(model, task, planted_task(4), means, cfg, pad_id=PAD)


def test_prune_task_records_a_validated_circuit(pruned, tmp_path):
    model, means, task, cfg, rec = pruned
    assert rec.status == "found" and rec.total_nodes == sum(locations(model).values())
    assert 0 < len(rec.nodes) <= rec.total_nodes and rec.edges == len(rec.edge_list) > 0
    assert all(isinstance(n, NodeRecord) and isinstance(n.mean, float) for n in rec.nodes)  # with its mean
    kept = {n.key for n in rec.nodes}
    assert len(kept) == len(rec.nodes)
    for e in rec.edge_list:
        assert e.src in kept and e.weight != 0.0
        assert e.dst_kind == "logit" or e.dst in kept
    for value in (rec.sufficiency_loss, rec.necessity_loss, rec.random_loss, rec.empty_loss):
        assert value is not None and value >= 0
    rec.save(tmp_path / "circuit.json")
    assert CircuitRecord.load(tmp_path / "circuit.json") == rec
    unreachable = prune_task(model, task, task, means, dataclasses.replace(cfg, target_loss=1e-6), pad_id=PAD)
    assert unreachable.status == "unreachable" and unreachable.nodes == []


def test_held_out_losses_use_the_calibration_fit_on_the_train_pairs(pruned):
    """No leakage: the logit scale is fit on the train pairs and applied unchanged to the held-out ones."""
    model, means, task, _, rec = pruned
    kept = kept_nodes(model, [n.key for n in rec.nodes])
    train_scale = fit_calibration(model, task, kept, means, PAD, "cpu")
    assert rec.sufficiency_loss == pytest.approx(
        circuit_loss(model, planted_task(4), kept, means, PAD, "cpu", calibration=train_scale))
    # a held-out set whose own best scale differs: the train pairs' scale is what it gets
    skewed = EncodedTask("skewed", task.prompts[:1], task.candidates[:1])  # only the X -> P sequence
    own = fit_calibration(model, skewed, kept, means, PAD, "cpu")
    assert own.scale != pytest.approx(train_scale.scale)
    assert calibrated_test_loss(model, task, skewed, kept, means, PAD, "cpu") == pytest.approx(
        circuit_loss(model, skewed, kept, means, PAD, "cpu", calibration=train_scale))


def test_a_task_the_empty_circuit_solves_is_direct():
    """With bigram entries that tell X -> P from Y -> Q, the bigram table alone solves the planted task: the
    empty circuit reaches the target, so the task is `direct` and no masks are learned."""
    model = planted_model()
    with torch.no_grad():
        model.bigram_table[X, P], model.bigram_table[Y, Q] = 6.0, 9.0
    means = planted_means(model)
    cfg = dataclasses.replace(PruneConfig(), steps=5, target_loss=TARGET)
    rec = prune_task(model, planted_task(), planted_task(4), means, cfg, pad_id=PAD)
    assert rec.status == "direct" and rec.nodes == [] and rec.empty_loss <= TARGET
    assert rec.summary().status == "direct" and rec.summary().empty_loss == rec.empty_loss


def test_mask_training_loss_sums_the_pair(pruned):
    """The released code's scale for k_coef: the task loss of a batch is the mean over pairs of the pair's
    two sequences summed (twice the mean per sequence)."""
    model, means, task, _, _ = pruned
    gates = {loc: torch.ones(size) for loc, size in locations(model).items()}
    rows = torch.arange(len(task.prompts))
    per_sequence = pair_loss(pair_logits(model, task, rows, gates, means, PAD, "cpu"))
    assert per_sequence.view(-1, 2).sum(1).mean() == pytest.approx(2 * per_sequence.mean().item())


def test_overlap_compares_the_node_and_edge_sets_of_found_circuits(pruned):
    model, _, _, _, rec = pruned
    half = dataclasses.replace(rec, nodes=rec.nodes[: len(rec.nodes) // 2])
    missing = CircuitRecord(task="m", target_loss=0.1, unpruned_loss=1.0, total_nodes=rec.total_nodes,
                            status="unreachable")
    matrix = overlap(model, {"all": rec, "half": half, "missing": missing})
    assert list(matrix["nodes"]) == ["all", "half"]  # no circuit, no overlap
    assert matrix["nodes"]["all"]["all"] == 1.0 and matrix["edges"]["all"]["all"] == 1.0
    assert matrix["nodes"]["all"]["half"] == pytest.approx((len(rec.nodes) // 2) / len(rec.nodes))
    assert 0.0 <= matrix["edges"]["half"]["all"] < 1.0
