"""Steering through a bridge (pipeline/steer.py) on a planted feature: a sparse channel that carries the
cue, a decoder that writes it onto the dense direction deciding the answer."""

import torch

from model.bridge import Bridge, BridgedPair
from model.config import ModelConfig
from model.gpt import GPT
from pipeline.steer import flip_strength, steer
from pipeline.tasks import EncodedTask

VOCAB, A, B, X, Y, CUE = 8, 1, 2, 5, 6, 3


def planted() -> BridgedPair:
    torch.manual_seed(0)
    dense = GPT(ModelConfig(d_model=16, num_layers=1, d_head=8, context_length=8), VOCAB)
    sparse = GPT(ModelConfig(d_model=8, num_layers=1, d_head=8, context_length=8), VOCAB)
    with torch.no_grad():
        for model in (dense, sparse):  # blocks that write nothing: the residual passes through
            for block in model.transformer["h"]:
                block.attn.c_proj.weight.zero_()
                block.mlp.c_proj.weight.zero_()
            model.transformer["wte"].weight.zero_()
        dense.bigram_table.zero_()
        dense.bigram_table[A, X] = dense.bigram_table[B, Y] = 2.0  # the dense model's own preference
        dense.lm_head.weight.zero_()
        dense.lm_head.weight[Y, 0], dense.lm_head.weight[X, 0] = 5.0, -5.0  # dense channel 0 decides X vs Y
        sparse.transformer["wte"].weight[B, CUE] = 10.0  # the cue: sparse channel CUE is on after B only
        bridge = Bridge(16, 8, sites=3, k=8)
        for linear in bridge.decoders:
            linear.weight.zero_()
            linear.bias.zero_()
        bridge.decoders[0].weight[0, CUE] = 1.0  # the embedding site's decoder: CUE -> dense channel 0
    return BridgedPair(sparse, bridge, dense).eval()


def test_steering_the_planted_cue_flips_the_dense_preference_and_a_random_set_does_not():
    pair = planted()
    task = EncodedTask("planted", [[A], [B]] * 4, torch.tensor([[X, Y], [Y, X]] * 4))
    every = [(layer, kind, i) for layer, kind, i in
             [(-1, "embed", c) for c in range(8)] + [(0, "mlp_neuron", c) for c in range(8)]]
    result = steer(pair, task, every, count=1, strengths=[0.0, 0.25, 0.5, 1.0, 1.5], pad_id=0)
    assert result.nodes == [(-1, "embed", CUE)] and result.site == "h0.pre"
    assert result.curve[0][1] > 0.8  # unsteered: the dense model's own answer
    assert result.flip_strength == 0.25 and result.curve[-1][1] < 0.01
    assert result.random_flip_strength is None
    assert all(abs(p - result.curve[0][1]) < 1e-6 for _, p in result.random_curve)  # zero decoder columns
    # the control is drawn among nodes an edit moves: not the other embedding channels, equal in A and B
    assert len(result.random_nodes) == 1 and result.random_nodes[0][1] == "mlp_neuron"


def test_flip_strength_needs_a_curve_that_starts_on_the_right_side():
    assert flip_strength([[0.0, 0.9], [0.5, 0.6], [1.0, 0.4]]) == 1.0
    assert flip_strength([[0.0, 0.4], [1.0, 0.1]]) is None  # the dense model did not prefer the answer
    assert flip_strength([[0.0, 0.9], [1.0, 0.7]]) is None


def test_decoder_directions_name_the_dense_channels_a_writing_node_feeds():
    from pipeline.steer import decoder_directions

    directions = decoder_directions(planted(), [(-1, "embed", CUE), (0, "mlp_neuron", 1), (-1, "embed", 0)])
    assert set(directions) == {(-1, "embed", CUE), (-1, "embed", 0)}  # a neuron writes no residual channel
    assert directions[(-1, "embed", CUE)].startswith("|w| 1: ch 0 (+1)")
    assert directions[(-1, "embed", 0)].startswith("|w| 0:")
