import math

import pytest
import torch

from model.config import ModelConfig, param_counts
from model.gpt import GPT, AbsTopK


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**({"d_model": 32, "num_layers": 2, "d_head": 8, "context_length": 16} | kw))


def test_paper_sizes():
    """METHOD.md 2: the 1x model (8 layers, d_model 256, vocab 2048, no bigram table) is about 7.4M weights
    (its 29.7M, 118.8M for ef 2, 4 are 7.4M x ef^2 bookkeeping; the real count grows slower because
    embeddings scale with ef, not ef^2)."""
    cfg = ModelConfig(d_model=256, num_layers=8)
    assert param_counts(cfg, 2048)["total"] == pytest.approx(7.4e6, rel=0.01)


def test_param_counts_match_the_module():
    for kw in ({}, {"pos_embedding": "learned", "attention_sink": True}, {"bias": False, "bigram_table": "none"}):
        cfg = tiny(**kw)
        model = GPT(cfg, 100)
        counts = param_counts(cfg, 100)
        actual = sum(p.numel() for n, p in model.named_parameters() if n != "bigram_table")
        assert actual == counts["total"], kw


def test_forward_shapes_and_causality():
    torch.manual_seed(0)
    for kw in ({}, {"attention_sink": True}, {"pos_embedding": "learned"}):
        model = GPT(tiny(**kw), 50)
        x = torch.randint(0, 50, (3, 12))
        logits = model(x)
        assert logits.shape == (3, 12, 50)
        y = x.clone()
        y[:, 8:] = (y[:, 8:] + 1) % 50  # changing later tokens must not change earlier logits
        torch.testing.assert_close(model(y)[:, :8], logits[:, :8])


def test_sink_with_zero_logit_matches_manual_attention():
    torch.manual_seed(0)
    model = GPT(tiny(attention_sink=True, num_layers=1), 20)
    attn = model.transformer["h"][0].attn
    with torch.no_grad():
        attn.sink_logit.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    q, k, v = (torch.randn(2, 4, 5, 8) for _ in range(3))
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    scores = scores.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
    sink = attn.sink_logit.view(1, 4, 1, 1).expand(2, 4, 5, 1)
    probs = torch.softmax(torch.cat([sink, scores], dim=-1), dim=-1)[..., 1:]  # the sink's value is 0
    torch.testing.assert_close(attn._attend(q, k, v), probs @ v)


def test_sequence_longer_than_context_is_refused():
    with pytest.raises(ValueError, match="context_length"):
        GPT(tiny(), 10)(torch.zeros(1, 17, dtype=torch.long))


def test_abstopk_keeps_exactly_k_and_masks_gradients():
    x = torch.randn(4, 7, 32, requires_grad=True)
    y = AbsTopK(8)(x)
    assert ((y != 0).sum(-1) == 8).all()
    kept = y != 0
    top = x.detach().abs().topk(8, dim=-1).values[..., -1:]
    assert (x.detach().abs()[kept] >= top.expand_as(x)[kept]).all()
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float())


@pytest.mark.parametrize("shape,k", [((4, 7, 32), 8), ((3, 128), 32), ((2, 5, 512), 128), ((6, 3), 1)])
def test_abstopk_matches_its_plain_torch_twin(shape, k):
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    grad = torch.randn(*shape)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = AbsTopK(k)(x), AbsTopK.reference(x_ref, k)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0)


def test_activation_sparsity_at_the_configured_locations():
    from model.hooks import record

    torch.manual_seed(0)
    model = GPT(tiny(afrac=0.25, afrac_locations=["q", "mlp_neuron"]), 30)
    with record(model) as cache:
        model(torch.randint(0, 30, (2, 10)))
    assert ((cache["transformer.h.0.attn.hook_q"] != 0).sum(-1) == 8).all()  # 1/4 of 32
    assert ((cache["transformer.h.1.mlp.hook_post"] != 0).sum(-1) == 32).all()  # 1/4 of 128
    assert ((cache["transformer.h.0.attn.hook_k"] != 0).sum(-1) > 8).any()  # k is not sparsified


def test_activation_sparsity_truncates_as_the_paper_does():
    """int(afrac x width), as the released code's maybe_activation_sparsity: 0.3 x 32 = 9.6 keeps 9, and
    0.3 x 128 = 38.4 keeps 38 (rounding up would keep 10 and 39)."""
    from model.hooks import record

    torch.manual_seed(0)
    model = GPT(tiny(afrac=0.3), 30)
    with record(model) as cache:
        model(torch.randint(0, 30, (2, 10)))
    for name, kept in (("attn.hook_in", 9), ("attn.hook_v", 9), ("mlp.hook_post", 38), ("mlp.hook_out", 9)):
        assert ((cache[f"transformer.h.1.{name}"] != 0).sum(-1) == kept).all(), name


def test_dense_model_has_no_topk_modules():
    model = GPT(tiny(), 30)
    assert not any(isinstance(m, AbsTopK) for m in model.modules())
