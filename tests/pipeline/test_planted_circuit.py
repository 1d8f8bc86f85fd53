"""Pruning finds a circuit planted by hand, and nothing else (tests/pipeline/planted.py has the model)."""

import dataclasses
import math

import pytest

from model.graph import kept_nodes
from pipeline.prune import PruneConfig, circuit_loss, prune_task
from tests.pipeline.planted import HARMFUL, PAD, PLANTED, TARGET, planted_means, planted_model, planted_task


@pytest.fixture(scope="module")
def planted():
    model = planted_model()
    return model, planted_means(model), planted_task()


def test_the_planted_path_reaches_the_target_and_needs_every_node(planted):
    model, means, task = planted
    assert circuit_loss(model, task, kept_nodes(model, PLANTED), means, PAD, "cpu") <= TARGET
    for missing in PLANTED:  # without any one node X and Y look the same: the loss is ln 2 at best
        rest = [n for n in PLANTED if n != missing]
        loss = circuit_loss(model, task, kept_nodes(model, rest), means, PAD, "cpu")
        assert loss >= math.log(2) - 1e-4, missing
    with_harm = circuit_loss(model, task, kept_nodes(model, [*PLANTED, HARMFUL]), means, PAD, "cpu")
    alone = circuit_loss(model, task, kept_nodes(model, PLANTED), means, PAD, "cpu")
    assert with_harm > alone + 0.03  # the harmful neuron hurts where it is kept


def test_pruning_finds_exactly_the_planted_nodes(planted):
    """The learned masks rank the five planted nodes first (the harmful neuron and the irrelevant nodes
    after them), so bisection keeps exactly those; 10 mask steps instead of 50 keep extra nodes."""
    model, means, task = planted
    cfg = dataclasses.replace(PruneConfig(), steps=50, target_loss=TARGET, batch_pairs=8)
    rec = prune_task(model, task, task, means, cfg, pad_id=PAD)
    assert rec.status == "found"
    assert sorted(n.key for n in rec.nodes) == sorted(PLANTED)
    assert rec.edges == 4 + 2  # four along the path, then final OUT -> the logits of P and Q
