"""An export in the paper's layout gives our logits under the paper's own forward (tests/reference_paper_gpt.py,
re-implemented from the released inference code)."""

import json

import pytest
import torch

from model.config import ModelConfig, SparsityConfig
from model.gpt import GPT
from model.sparsity import project_, sparse_tensors
from pipeline.export import export_model
from tests.reference_paper_gpt import paper_forward


def sparse_model(afrac: float, vocab: int) -> GPT:
    """Weight-sparse (density 1/4) with an attention sink, a learnable bigram table and AbsTopK at every
    location; sinks, table and biases random, so that each one's export is checked."""
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, num_layers=2, d_head=8, context_length=16, afrac=afrac, attention_sink=True,
                      bigram_table="learnable")
    model = GPT(cfg, vocab).eval()
    project_(sparse_tensors(model, SparsityConfig()), 1 / 4, 1 / 4, floor=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".bias", "sink_logit")) or name == "bigram_table":
                p.normal_(std=0.5)
    return model


@pytest.mark.parametrize("afrac", [0.3, 1.0])
def test_paper_forward_of_the_export_gives_our_logits(afrac, small_dataset, tmp_path):
    ds = small_dataset.dataset
    vocab = ds.tokenizer().get_vocab_size()
    model = sparse_model(afrac, vocab)
    idx = torch.randint(0, vocab, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(idx)
    if afrac < 1:  # 0.3 x 32 = 9.6 and 0.3 x 128 = 38.4: the paper keeps 9 and 38, rounding up 10 and 39
        block = model.transformer["h"][0]
        assert block.attn.act_in.k == 9 and block.mlp.act_neuron.k == 38
    folder = export_model(model, "model: {}\n", ds, tmp_path / "export")
    config = json.loads((folder / "paper" / "beeg_config.json").read_text())
    state = torch.load(folder / "paper" / "final_model.pt", weights_only=True)
    assert config["afrac"] == (afrac if afrac < 1 else None)
    torch.testing.assert_close(paper_forward(config, state, idx), ours, rtol=1e-5, atol=1e-5)
