"""Bridge sites, hybrids and loss terms (model/bridge.py) on tiny models."""

import copy

import pytest
import torch

from model.bridge import Bridge, BridgedPair, bridge_terms, nmse, residuals, run_from, site_names
from model.config import ModelConfig
from model.gpt import GPT

VOCAB = 50


def tiny(d_model: int, **kw) -> GPT:
    cfg = ModelConfig(d_model=d_model, num_layers=2, d_head=8, context_length=16, **kw)
    return GPT(cfg, VOCAB)


def batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 17), generator=torch.Generator().manual_seed(seed))


def test_continuing_from_any_site_reproduces_the_forward_pass():
    torch.manual_seed(0)
    model = tiny(32, afrac=0.25)
    idx = batch()[:, :-1]
    res = residuals(model, idx)
    assert len(res) == len(site_names(2)) == 5
    full = model(idx)
    for site, x in enumerate(res):
        assert torch.allclose(run_from(model, site, x, idx), full, atol=1e-5), site_names(2)[site]


def test_a_perfect_bridge_leaves_every_term_at_zero_and_substitution_unchanged():
    """Identity encoders and decoders, no AbsTopK, and a sparse model equal to the dense one."""
    torch.manual_seed(0)
    dense = tiny(32)
    sparse = copy.deepcopy(dense)
    bridge = Bridge(32, 32, sites=5, k=32)
    with torch.no_grad():
        for linear in [*bridge.encoders, *bridge.decoders]:
            linear.weight.copy_(torch.eye(32))
            linear.bias.zero_()
    pair = BridgedPair(sparse, bridge, dense)
    b = batch()
    with torch.no_grad():
        terms = bridge_terms(pair, b, sites=list(range(5)))
    for name in ("nmse_encode", "nmse_decode", "kl_dense_prefix", "kl_sparse_prefix"):
        assert float(terms[name]) == pytest.approx(0.0, abs=1e-6), name
    idx = b[:, :-1]
    dense_res = residuals(dense, idx)
    for site in range(5):  # the dense model with one site replaced through the bridge
        hybrid = run_from(dense, site, bridge.decode(site, bridge.encode(site, dense_res[site])), idx)
        assert torch.allclose(hybrid, dense(idx), atol=1e-5)


def test_nmse_is_the_unexplained_fraction_and_a_zero_residual_cannot_blow_it_up():
    """A real sparse embedding had rows with no weight left: its residual at h0.pre was exactly zero at
    those tokens, and a per-position ratio made the term 3e4 there. The ratio of sums stays bounded."""
    target = torch.randn(4, 16, 8, generator=torch.Generator().manual_seed(0))
    assert float(nmse(torch.zeros_like(target), target)) == pytest.approx(1.0)
    assert float(nmse(target, target)) == 0.0
    assert float(nmse(0.5 * target, target)) == pytest.approx(0.25)
    target[0, 3] = 0.0  # one position of the target with nothing in it
    prediction = target + 0.1 * torch.randn(target.shape, generator=torch.Generator().manual_seed(1))
    assert float(nmse(prediction, target)) < 0.05
    grown = target.clone().requires_grad_(True)  # the target's own norm gets no gradient through the denominator
    nmse(target, grown).backward()
    assert torch.count_nonzero(grown.grad) == 0


@torch.no_grad()
def sampled(model: GPT, sequences: int, length: int, seed: int) -> torch.Tensor:
    """Text the dense model writes itself: data on which its own predictions are the right ones."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (sequences, 1), generator=generator)
    for _ in range(length - 1):
        x = torch.cat([x, torch.multinomial(torch.softmax(model(x)[:, -1], -1), 1, generator=generator)], 1)
    return x


def test_training_the_pair_lowers_every_term_and_leaves_the_dense_model_alone():
    torch.manual_seed(0)
    dense = tiny(32)
    for p in dense.parameters():  # a dense model with some structure to match
        p.data.mul_(3.0)
    frozen = {k: v.clone() for k, v in dense.state_dict().items()}
    pair = BridgedPair(tiny(16, afrac=0.25), Bridge(32, 16, sites=5, k=4), dense)
    assert not any("dense" in n for n, _ in pair.named_parameters())
    optimizer = torch.optim.Adam(pair.parameters(), lr=3e-3)
    data = sampled(dense, 64, 17, seed=1)
    with torch.no_grad():
        before = {k: float(v) for k, v in bridge_terms(pair, data, sites=list(range(5))).items()}
    for _ in range(300):
        optimizer.zero_grad()
        sum(bridge_terms(pair, data).values()).backward()
        optimizer.step()
    with torch.no_grad():
        after = {k: float(v) for k, v in bridge_terms(pair, data, sites=list(range(5))).items()}
    for name in before:  # each term falls by at least 15% (measured: the dense-prefix KL by 23% at 200 steps)
        assert after[name] < 0.85 * before[name], (name, before[name], after[name])
    assert all(torch.equal(frozen[k], v) for k, v in dense.state_dict().items())


def test_a_bridge_needs_equal_layer_counts():
    with pytest.raises(ValueError, match="equal layer counts"):
        BridgedPair(tiny(16), Bridge(32, 16, 5, 4), GPT(ModelConfig(d_model=32, num_layers=3, d_head=8,
                                                                     context_length=16), VOCAB))
