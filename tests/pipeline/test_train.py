import pytest
import torch

from kernels.optimizer import normalize_grad_rms_
from model.config import ModelConfig, SparsityConfig
from model.gpt import GPT
from model.sparsity import keep_count, sparse_tensors
from pipeline.config import TrainConfig, resolve_config
from pipeline.errors import ConfigError
from pipeline.evaluate import lm_loss
from pipeline.train import build_optimizer, make_engine, schedule_at, train_step

MODEL = ModelConfig(d_model=64, num_layers=2, d_head=16, context_length=16)
VOCAB = 64


def run(steps: int, density: float, *, seed: int = 0, batches=None, lr: float = 1e-2, **train_kw):
    torch.manual_seed(seed)
    model = GPT(MODEL, VOCAB)
    sparsity = SparsityConfig(density=density, anneal_start=0.0, anneal_end=0.5)
    train = TrainConfig(steps=steps, lr=lr, **train_kw)
    tensors = sparse_tensors(model, sparsity)
    engine = make_engine(model, tensors, train, sparsity)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for step in range(steps):
        batch = batches[step] if batches is not None else torch.randint(0, VOCAB, (4, 17), generator=gen)
        history.append(train_step(engine, [batch], step, train, sparsity))
    return model, tensors, history


def test_every_sparse_matrix_holds_its_budget_after_each_step():
    model, tensors, history = run(12, 1 / 16)
    for t in tensors:
        assert int((t.param != 0).sum()) == keep_count(t.param.numel(), 1 / 16), t.name
        if t.floor_dim is not None:
            assert ((t.param != 0).sum(dim=t.floor_dim) >= 4).all()
    assert history[-1]["density"] == pytest.approx(1 / 16)
    assert model.bigram_table.abs().sum() > 0 and (model.bigram_table != 0).float().mean() > 0.5  # dense


def test_schedules_follow_their_formulas():
    train = TrainConfig(steps=100, lr=0.02, warmup_frac=0.1)
    sparsity = SparsityConfig(density=0.25, anneal_start=0.0, anneal_end=0.5)
    s = schedule_at(25, train, sparsity)
    assert s.density == pytest.approx(1 - 0.75 * 0.5)
    assert s.lr == pytest.approx(0.02 * (75 / 90) * (0.25 / s.density) ** 0.5)
    assert schedule_at(60, train, sparsity).density == pytest.approx(0.25)


def test_two_runs_are_bit_identical():
    a, _, _ = run(6, 1 / 16)
    b, _, _ = run(6, 1 / 16)
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("density", [1.0, 1 / 16])
def test_overfits_a_repeated_batch(density):
    batch = torch.randint(0, VOCAB, (8, 17), generator=torch.Generator().manual_seed(3))
    model, _, history = run(80, density, batches=[batch] * 80, lr=2e-2)
    assert history[-1]["loss"] < 0.5 * history[0]["loss"], (history[0]["loss"], history[-1]["loss"])


def test_gradient_rms_modes():
    g = torch.full((100,), 3.0)
    assert normalize_grad_rms_([g], "rescale") == pytest.approx(3.0)
    assert g.pow(2).mean().sqrt() == pytest.approx(1.0, rel=1e-4)
    g = torch.full((100,), 0.5)
    normalize_grad_rms_([g], "clip")
    assert g[0] == 0.5  # below 1: untouched
    g = torch.full((100,), 4.0)
    normalize_grad_rms_([g], "clip")
    assert g[0] == pytest.approx(1.0)
    g = torch.full((100,), 4.0)  # one group of a gradient whose global RMS an engine computed: 2
    assert normalize_grad_rms_([g], "rescale", rms=2.0) == 2.0
    assert g[0] == pytest.approx(2.0, rel=1e-4)


def test_bigram_table_gets_its_own_eps():
    model = GPT(MODEL, VOCAB)
    optimizer = build_optimizer(model, sparse_tensors(model, SparsityConfig()), TrainConfig(), SparsityConfig())
    eps = sorted(g["eps"] for g in optimizer.param_groups)
    assert eps == [1e-8, 0.1]


def test_loss_is_next_token_cross_entropy():
    torch.manual_seed(0)
    model = GPT(MODEL, VOCAB)
    batch = torch.randint(0, VOCAB, (2, 9))
    logits = model(batch[:, :-1])
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
    torch.testing.assert_close(lm_loss(model, batch), expected)


def test_density_below_the_floor_is_a_config_error():
    with pytest.raises(ConfigError, match=r"smallest allowed density is 0.0625"):
        resolve_config(None, ["model.d_model=64", "sparsity.density=0.01"])
    resolve_config(None, ["model.d_model=64", "sparsity.density=0.0625"])
    resolve_config(None, ["model.d_model=64", "sparsity.density=0.01", "sparsity.neuron_floor=0"])


def test_fixed_bigram_table_from_counts():
    from pipeline.train import bigram_log_probs

    tokens = torch.tensor([0, 1, 0, 1, 0, 2, 2, 2])
    table = bigram_log_probs(tokens, 3, smoothing=0.0)
    torch.testing.assert_close(table.exp().sum(dim=1)[:3], torch.ones(3))
    assert table[0, 1].exp() == pytest.approx(2 / 3) and table[2, 2].exp() == pytest.approx(1.0)
    model = GPT(ModelConfig(d_model=32, num_layers=1, d_head=8, context_length=8, bigram_table="fixed"), 3)
    assert "bigram_table" not in dict(model.named_parameters())
    model.bigram_table.copy_(bigram_log_probs(tokens, 3))
    assert "bigram_table" in model.state_dict()
