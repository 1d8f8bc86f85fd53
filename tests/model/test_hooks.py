import pytest
import torch

from model.config import ModelConfig
from model.gpt import GPT
from model.hooks import hook_points, intervene, record


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GPT(ModelConfig(d_model=32, num_layers=2, d_head=8, context_length=16), 40)


X = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(1))


def test_hook_names_follow_the_module_path(model):
    names = set(hook_points(model))
    for name in ("hook_embed", "hook_resid_final", "transformer.h.0.hook_resid_pre", "transformer.h.1.hook_resid_mid",
                 "transformer.h.1.hook_resid_post", "transformer.h.0.attn.hook_in", "transformer.h.0.attn.hook_q",
                 "transformer.h.0.attn.hook_k", "transformer.h.0.attn.hook_v", "transformer.h.0.attn.hook_out",
                 "transformer.h.0.mlp.hook_in", "transformer.h.0.mlp.hook_post", "transformer.h.0.mlp.hook_out"):
        assert name in names


def test_record_captures_what_flows(model):
    with record(model, ["transformer.h.0.hook_resid_pre", "hook_embed", "transformer.h.1.hook_resid_post"]) as c:
        logits = model(X)
    torch.testing.assert_close(c["hook_embed"], model.transformer["wte"](X))
    torch.testing.assert_close(c["transformer.h.0.hook_resid_pre"], c["hook_embed"])
    final = model.lm_head(model.transformer["ln_f"](c["transformer.h.1.hook_resid_post"])) + model.bigram_table[X]
    torch.testing.assert_close(final, logits)


def test_intervene_replaces_and_cleans_up(model):
    clean = model(X)
    with intervene(model, {"transformer.h.1.hook_resid_post": torch.zeros_like}):
        ablated = model(X)
    expected = model.lm_head(model.transformer["ln_f"](torch.zeros(2, 9, 32))) + model.bigram_table[X]
    torch.testing.assert_close(ablated, expected)
    torch.testing.assert_close(model(X), clean)  # hooks removed
    assert all(not p._fns for p in hook_points(model).values())


def test_nested_blocks_compose_and_unwind_on_error(model):
    name = "transformer.h.0.attn.hook_v"
    with pytest.raises(RuntimeError):
        with intervene(model, {name: lambda x: x * 2}):
            with intervene(model, {name: lambda x: x + 1}), record(model, [name]) as c:
                model(X)
                raise RuntimeError("boom")
    with record(model, [name]) as plain:
        model(X)
    torch.testing.assert_close(c[name], plain[name] * 2 + 1)
    assert all(not p._fns for p in hook_points(model).values())


def test_unknown_hook_name(model):
    with pytest.raises(KeyError, match="unknown hook"):
        with record(model, ["transformer.h.9.attn.hook_q"]):
            pass
