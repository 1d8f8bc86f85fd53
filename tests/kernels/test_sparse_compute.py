"""The L0-following step (kernels/sparse_compute.py, sparsity.compute=sparse) against its plain-torch twins,
and the recipe's invariants after every step of training in that mode."""

import dataclasses

import pytest
import torch

from kernels import sparse_compute as sc
from kernels.masked_linear import masked_linear_reference
from kernels.topk import keep_count, topk_mask_reference
from model.config import ModelConfig, SparsityConfig
from model.gpt import GPT
from model.sparsity import sparse_tensors
from pipeline.config import ConfigError, TrainConfig, resolve_config
from pipeline.train import make_engine, train_step


def _active(out_f=24, in_f=40, k=60, extra=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_f, in_f, generator=g)
    mask = topk_mask_reference(weight, k, floor=1, floor_dim=1)
    weight = weight * mask
    outside = (~mask).reshape(-1).nonzero().squeeze(1)
    chosen = outside[torch.randperm(outside.numel(), generator=g)[:extra]]
    index = torch.cat([mask.reshape(-1).nonzero().squeeze(1), chosen]).sort().values
    return weight, mask, sc.ActiveSet((out_f, in_f), index, mask.reshape(-1)[index])


@pytest.mark.parametrize("bias", [False, True])
def test_sparse_compute_linear_matches_the_masked_linear(bias):
    weight, mask, active = _active()
    b = torch.randn(weight.shape[0], requires_grad=True) if bias else None
    x = torch.randn(3, 5, weight.shape[1], requires_grad=True)
    y = sc.sparse_compute_linear(x, weight, active, b)
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    grad_values, grad_x = active.take_grad(), x.grad.clone()
    grad_b = b.grad.clone() if bias else None

    dense_w = weight.clone().requires_grad_()
    x.grad = None
    if bias:
        b.grad = None
    ref = masked_linear_reference(x, dense_w, mask, b)
    (ref * upstream).sum().backward()
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(grad_x, x.grad)
    # the weight gradient at the active entries is the dense (straight-through) gradient there
    torch.testing.assert_close(grad_values, dense_w.grad.reshape(-1)[active.index])
    if bias:
        torch.testing.assert_close(grad_b, b.grad)


def test_sddmm_matches_its_twin():
    _, _, active = _active(out_f=33, in_f=17, k=90, extra=120, seed=5)
    g_t, x_t = torch.randn(33, 11), torch.randn(17, 11)
    torch.testing.assert_close(sc.sddmm(active, g_t, x_t), sc.sddmm_reference(active.rows, active.cols, g_t, x_t))


def test_micro_batches_accumulate_into_one_gradient():
    weight, _, active = _active()
    x1, x2 = torch.randn(4, weight.shape[1]), torch.randn(4, weight.shape[1])
    sc.sparse_compute_linear(x1, weight, active, None).sum().backward()
    sc.sparse_compute_linear(x2, weight, active, None).sum().backward()
    both = active.take_grad()
    sc.sparse_compute_linear(torch.cat([x1, x2]), weight, active, None).sum().backward()
    torch.testing.assert_close(both, active.take_grad())


@pytest.mark.parametrize("floor_dim", [0, 1])
def test_project_active_over_every_entry_is_the_reference_top_k(floor_dim):
    weight = torch.randn(16, 12)
    index = torch.arange(weight.numel())
    active = sc.ActiveSet(tuple(weight.shape), index, torch.ones_like(index, dtype=torch.bool))
    kept = sc.project_active(weight.reshape(-1), active, 40, 2, floor_dim)
    expected = topk_mask_reference(weight, 40, floor=2, floor_dim=floor_dim)
    assert torch.equal(kept.reshape(weight.shape), expected)


def test_project_active_keeps_exactly_k_and_the_floor_of_every_neuron():
    weight, mask, active = _active(k=60, extra=80, seed=3)
    values = weight.reshape(-1)[active.index] + 0.5 * torch.randn(active.index.numel())
    kept = sc.project_active(values, active, 50, 1, 1)
    assert int(kept.sum()) == 50
    rows = active.rows[kept]
    assert torch.bincount(rows, minlength=weight.shape[0]).min() >= 1


def test_grow_adds_the_largest_gradients_outside_the_mask_and_carry_keeps_moments():
    mask = torch.zeros(4, 5, dtype=torch.bool)
    mask[0, 0] = mask[2, 3] = True
    grad = torch.arange(20.0).reshape(4, 5)
    grad[2, 3] = 100.0  # kept already: not a candidate
    index = sc.grow(mask, grad, 3)
    assert index.tolist() == [0, 13, 17, 18, 19]
    moments = sc.carry(torch.tensor([0, 5, 13]), torch.tensor([1.0, 2.0, 3.0]), index)
    assert moments.tolist() == [1.0, 3.0, 0.0, 0.0, 0.0]


def _setup(compute: str, seed: int = 0, density: float = 1 / 64, regrow_every: int = 3):
    cfg = ModelConfig(d_model=128, num_layers=1, context_length=16, d_head=32)
    sparsity = SparsityConfig(density=density, neuron_floor=2, compute=compute, regrow_every=regrow_every,
                              anneal_start=0.0, anneal_end=0.25)
    train = TrainConfig(steps=16, lr=1e-2, batch_size=4)
    torch.manual_seed(seed)
    model = GPT(cfg, 64)
    tensors = sparse_tensors(model, sparsity)
    return model, tensors, make_engine(model, tensors, train, sparsity), train, sparsity


def _batches(seed: int, steps: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (4, 17), generator=g) for _ in range(steps)]


def test_sparse_compute_trains_with_exact_k_and_the_floor_after_every_step():
    model, tensors, engine, train, sparsity = _setup("sparse")
    sparse_steps = regrows = 0
    for step, batch in enumerate(_batches(0, train.steps)):
        stats = train_step(engine, [batch], step, train, sparsity)
        for t in tensors:
            module = t.module
            if t.group != "matrix" or module is None or stats["density"] >= 1.0:
                continue
            k = keep_count(t.param.numel(), stats["density"])
            assert int(module.mask.sum()) == k, (t.name, step)
            assert not t.param.detach()[~module.mask].any(), "weights outside the mask are zero"
            neurons = module.mask.sum(dim=t.floor_dim)
            assert int(neurons.min()) >= sparsity.neuron_floor, (t.name, step)
            state = engine.optimizer.state[t.param]
            if module.active is not None:
                sparse_steps += 1
                regrows += module.active.regrow
                # optimizer state only on the active entries (kept + candidates), not the dense matrix
                assert "exp_avg" not in state
                assert state["active_exp_avg"].numel() == module.active.index.numel()
    assert sparse_steps and regrows
    for t in tensors:  # after a regrow at the target density: about 2k entries (kept + as many candidates)
        if t.group == "matrix":
            k = keep_count(t.param.numel(), sparsity.density)
            assert engine.optimizer.state[t.param]["active_index"].numel() <= 2 * k + 1
    assert torch.isfinite(torch.tensor(stats["loss"]))


def test_sparse_compute_resumes_bit_identically():
    batches = _batches(1, 16)
    model, tensors, engine, train, sparsity = _setup("sparse")
    for step, batch in enumerate(batches):
        train_step(engine, [batch], step, train, sparsity)
    straight = {k: v.clone() for k, v in model.state_dict().items()}

    model, tensors, engine, train, sparsity = _setup("sparse")
    for step, batch in enumerate(batches[:10]):
        train_step(engine, [batch], step, train, sparsity)
    state = {k: v.clone() for k, v in engine.full_state().items()}
    model, tensors, engine, train, sparsity = _setup("sparse", seed=7)  # other initial weights: all from state
    engine.load_full_state(state)
    for step, batch in enumerate(batches[10:], start=10):
        train_step(engine, [batch], step, train, sparsity)
    for key, value in model.state_dict().items():
        assert torch.equal(value, straight[key]), key


def test_exact_mode_and_dense_densities_never_enter_the_sparse_step():
    model, tensors, engine, train, sparsity = _setup("exact")
    for step, batch in enumerate(_batches(2, 6)):
        train_step(engine, [batch], step, train, sparsity)
    assert all(getattr(t.module, "active", None) is None for t in tensors)
    # sparse compute at a density the dispatch rule does not take (1/4 on a CPU) stays on the exact path
    model, tensors, engine, train, sparsity = _setup("sparse", density=0.25)
    for step, batch in enumerate(_batches(2, 6)):
        train_step(engine, [batch], step, train, sparsity)
    assert all(getattr(t.module, "active", None) is None for t in tensors)


def test_the_dispatch_rule_follows_the_measured_crossover():
    assert sc.pays(sc.CROSSOVER["cpu"], torch.device("cpu"))
    assert not sc.pays(sc.CROSSOVER["cpu"] * 2, torch.device("cpu"))


@pytest.mark.parametrize("override, says", [
    (["sparsity.compute=fast"], "sparsity.compute"),
    (["sparsity.regrow_every=0"], "sparsity.regrow_every"),
    (["sparsity.candidates=0"], "sparsity.candidates"),
    (["sparsity.compute=sparse", "trial.workers=2", "deepspeed.zero_stage=3"], "ZeRO stage 1 or 2"),
    (["sparsity.compute=sparse", "trial.engine=deepspeed", "deepspeed.zero_stage=0"], "ZeRO stage 1 or 2"),
])
def test_bad_sparse_compute_settings_are_named(override, says):
    with pytest.raises(ConfigError, match=says):
        resolve_config(None, override)


def test_the_config_carries_the_new_keys():
    cfg = resolve_config(None, ["sparsity.compute=sparse", "sparsity.regrow_every=50"])
    assert dataclasses.asdict(cfg.sparsity)["compute"] == "sparse" and cfg.sparsity.regrow_every == 50
