"""Worker bodies for the DeepSpeed tests: they run in spawned processes (infra.distributed.spawn)."""

import json
import os
import time
from pathlib import Path

import torch

from infra.engine import DeepSpeedConfig, wrap
from kernels.topk import keep_count
from model.config import ModelConfig, SparsityConfig
from model.gpt import GPT
from model.sparsity import attach_masks, sparse_tensors
from pipeline.config import TrainConfig
from pipeline.train import build_optimizer, train_step

MODEL = ModelConfig(d_model=64, num_layers=2, d_head=16, context_length=16)
SPARSITY = SparsityConfig(density=1 / 16, anneal_start=0.0, anneal_end=0.0)  # at the target from step 1
TRAIN = TrainConfig(steps=10, batch_size=4, lr=1e-2)


def make_engine(kind: str, stage: int):
    torch.manual_seed(0)
    model = GPT(MODEL, 80)
    tensors = sparse_tensors(model, SPARSITY)
    optimizer = build_optimizer(model, tensors, TRAIN, SPARSITY)
    engine = wrap(model, optimizer, engine=kind, cfg=DeepSpeedConfig(zero_stage=stage), micro_batch=4, grad_accum=1,
                  attach_masks=lambda masks: attach_masks(tensors, masks))
    return engine, tensors


def batches(rank: int, world: int, steps: int, rows: int | None = None):
    """This rank's share of fixed global batches of `rows` sequences (default 4 per rank)."""
    rows = rows or world * 4
    gen = torch.Generator().manual_seed(7)
    data = torch.randint(0, 80, (steps, rows, 17), generator=gen)
    share = rows // world
    return [data[s, rank * share : (rank + 1) * share] for s in range(steps)]


def check_zeros_survive(stage: int, out: str) -> None:
    """After every step, the fp32 master copy and the module's weights are the same and hold exactly k
    nonzeros: the projection was not undone by the optimizer's own copy."""
    from deepspeed.utils import safe_get_full_fp32_param

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    engine, tensors = make_engine("deepspeed", stage)
    report = []
    for step, batch in enumerate(batches(rank, world, 5)):
        if train_step(engine, [batch], step, TRAIN, SPARSITY)["density"] == 1.0:
            continue  # step 0 is dense: the anneal starts there
        for t in tensors:
            master = t.param.detach() if stage == 0 else safe_get_full_fp32_param(t.param)
            module = engine.full_state(every_rank=True)[f"model/{t.name}"] if stage == 3 else t.param.detach()
            k = keep_count(t.param.numel() if stage != 3 else master.numel(), 1 / 16)
            assert int(master.count_nonzero()) == k, (stage, step, t.name, int(master.count_nonzero()), k)
            assert torch.equal(module.reshape(master.shape), master), (stage, step, t.name)
        report.append(step)
    state = engine.full_state()  # gathered to rank 0 only: the other ranks keep nothing
    assert (len(state) > 0) == (rank == 0), (rank, len(state))
    if rank == 0:
        assert all(f"model/{t.name}" in state for t in tensors)
        Path(out).write_text(json.dumps({"stage": stage, "steps": report, "world": world}))


def final_weights(kind: str, stage: int, out: str) -> None:
    """Train 6 steps on this rank's share of fixed batches; rank 0 saves the final full state."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    engine, _ = make_engine(kind, stage)
    for step, batch in enumerate(batches(rank, world, 6)):
        train_step(engine, [batch], step, TRAIN, SPARSITY)
    state = engine.full_state()
    if rank == 0:
        torch.save({k: v for k, v in state.items() if k.startswith("model/")}, out)


class WorkerError(ValueError):
    """An exception type of the test's own, so the parent can be checked to raise exactly it."""


def fail(message: str) -> None:
    raise WorkerError(f"{message} on rank {os.environ['RANK']}")


def fail_on_rank_one(message: str) -> None:
    """Rank 1 fails at once; rank 0 carries on as if stuck in a collective with its dead peer."""
    if os.environ["RANK"] == "1":
        raise WorkerError(f"{message} on rank 1")
    time.sleep(600)


def group_at_exit(out: str) -> None:
    """Join the group, gather once (gloo starts its worker threads), and record at interpreter exit
    whether the group is still up: spawn() must have destroyed it before the interpreter goes down."""
    import atexit

    import torch.distributed as dist

    from infra.distributed import init_process_group

    rank, world = init_process_group("gloo")
    gathered = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(gathered, torch.tensor([float(rank)]))
    assert [float(t) for t in gathered] == [float(r) for r in range(world)]
    atexit.register(lambda: Path(f"{out}.{rank}").write_text(str(dist.is_initialized())))


# sparsity.compute=sparse under ZeRO 1-2: a model whose matrices pass the CPU crossover (1/64 < 1/32), the
# anneal at the target after 3 of 12 steps, a regrow step every 3
SPARSE_MODEL = ModelConfig(d_model=128, num_layers=1, d_head=32, context_length=16)
SPARSE = SparsityConfig(density=1 / 64, neuron_floor=2, compute="sparse", regrow_every=3, anneal_start=0.0,
                        anneal_end=0.25)
SPARSE_TRAIN = TrainConfig(steps=12, batch_size=4, lr=1e-2)


def sparse_engine(kind: str, stage: int, seed: int = 0):
    torch.manual_seed(seed)
    model = GPT(SPARSE_MODEL, 80)
    tensors = sparse_tensors(model, SPARSE)
    optimizer = build_optimizer(model, tensors, SPARSE_TRAIN, SPARSE)
    engine = wrap(model, optimizer, engine=kind, cfg=DeepSpeedConfig(zero_stage=stage), micro_batch=4,
                  grad_accum=1, attach_masks=lambda masks: attach_masks(tensors, masks))
    return engine, tensors


def _sparse_invariants(engine, tensors, density: float) -> tuple[int, int]:
    """After a step: every matrix holds exactly k weights, the per-neuron floor, zeros outside its mask;
    one in the sparse step keeps Adam state on its active entries only. Returns (matrices in the sparse
    step, of them at a regrow step next)."""
    optimizer = getattr(engine, "side", None) or engine.optimizer
    sparse = regrow = 0
    for t in tensors:
        if t.group != "matrix" or density >= 1.0:
            continue
        mask = t.module.mask
        assert int(mask.sum()) == keep_count(t.param.numel(), density), t.name
        assert not t.param.detach()[~mask].any(), t.name
        assert int(mask.sum(dim=t.floor_dim).min()) >= SPARSE.neuron_floor, t.name
        if t.module.active is not None:
            state = optimizer.state[t.param]
            assert "exp_avg" not in state and state["active_exp_avg"].numel() == t.module.active.index.numel()
            sparse += 1
            regrow += t.module.active.regrow
    return sparse, regrow


def sparse_compute_run(kind: str, stage: int, out: str, resume_at: int = 0) -> None:
    """Train SPARSE_TRAIN.steps steps with sparsity.compute=sparse on this rank's share of fixed batches
    (one process of the torch engine takes the whole batch: the same data), checking the invariants after
    every step. With `resume_at`, the run stops there, a new engine built from other weights loads its full
    state and trains on: the final state must equal the straight run's bit for bit. Every rank saves its
    final model tensors (`out`.<rank>) and rank 0 a report (`out`.json)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    data = batches(rank, world, SPARSE_TRAIN.steps, rows=8)  # the same global batches whatever the world
    engine, tensors = sparse_engine(kind, stage)
    sparse = regrows = 0
    for step, batch in enumerate(data):
        if resume_at and step == resume_at:
            saved = {k: v.clone() for k, v in engine.full_state(every_rank=True).items()}
            engine, tensors = sparse_engine(kind, stage, seed=7)
            engine.load_full_state(saved)
        stats = train_step(engine, [batch], step, SPARSE_TRAIN, SPARSE)
        counts = _sparse_invariants(engine, tensors, stats["density"])
        sparse, regrows = sparse + counts[0], regrows + counts[1]
    state = engine.full_state(every_rank=True)
    torch.save({k: v for k, v in state.items() if k.startswith("model/")}, f"{out}.{rank}")
    if rank == 0:
        Path(f"{out}.json").write_text(json.dumps({"world": world, "sparse_matrix_steps": sparse,
                                                   "regrow_steps": regrows, "loss": stats["loss"]}))
