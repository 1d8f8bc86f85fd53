"""One training step of the recipe (forward, backward, optimizer, top-k projection, decay), dense vs
sparse, side by side in one run: the baseline the kernels issue must beat.

Shapes: the `cpu` preset (4 layers, d_model 128, batch 32 x 128 tokens) and d_model 1024 (2 layers,
batch 8 x 128 tokens, to keep a CPU step at seconds). Densities 1, 1/4, 1/16, 1/64 (a density below
the per-neuron floor, j / d_model, is skipped and said so). Prints medians over `--repeats` steps and
a final JSON line with `step_ratio_1_16`, `step_ratio_1_64` (sparse / dense at d_model 1024) and
`topk_share` (share of the density-1/64 step spent in the projection at d_model 1024).

    .venv/bin/python benchmarks/step.py [--repeats 5]
"""

import argparse
import json
import statistics
from pathlib import Path

import torch

from model.config import SparsityConfig, min_density
from model.gpt import GPT
from model.sparsity import sparse_tensors
from pipeline.config import resolve_config
from pipeline.train import TrainConfig, build_optimizer, train_step

PRESET = Path(__file__).resolve().parents[1] / "sweeps" / "configs" / "cpu.yaml"
DENSITIES = {"1": 1.0, "1/4": 0.25, "1/16": 1 / 16, "1/64": 1 / 64}
VOCAB = 2048


def shapes() -> dict[str, tuple]:
    cpu = resolve_config(PRESET)
    wide = resolve_config(PRESET, ["model.d_model=1024", "model.num_layers=2", "train.batch_size=8"])
    return {"cpu preset": (cpu.model, cpu.train.batch_size), "d_model 1024": (wide.model, wide.train.batch_size)}


def time_steps(model_cfg, batch_size: int, density: float, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = GPT(model_cfg, VOCAB)
    sparsity = SparsityConfig(density=density)
    train = TrainConfig(steps=1000)
    optimizer, tensors = build_optimizer(model, train), sparse_tensors(model, sparsity)
    batch = torch.randint(0, VOCAB, (batch_size, model_cfg.context_length + 1))
    step = int(0.6 * train.steps)  # past the anneal: the projection runs at the target density
    for _ in range(2):  # warm-up: allocator, Adam state, thread pools
        train_step(model, optimizer, tensors, [batch], step, train, sparsity)
    runs = [train_step(model, optimizer, tensors, [batch], step + i, train, sparsity) for i in range(repeats)]
    phases = ("fwd_bwd_s", "optim_s", "project_s", "decay_s")
    result = {p: statistics.median(r[p] for r in runs) for p in phases}
    result["step_s"] = statistics.median(sum(r[p] for p in phases) for r in runs)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of {args.repeats} steps")
    table: dict[tuple[str, str], dict] = {}
    for shape, (model_cfg, batch_size) in shapes().items():
        floor_min = min_density(model_cfg, SparsityConfig())
        dense = None
        for label, density in DENSITIES.items():
            if density < 1.0 and density < floor_min:
                print(f"{shape:13s} density {label:5s}: skipped, below the per-neuron floor "
                      f"(j / d_model = {floor_min:g})")
                continue
            r = time_steps(model_cfg, batch_size, density, args.repeats)
            dense = dense or r["step_s"]
            table[(shape, label)] = r
            print(f"{shape:13s} density {label:5s}: step {r['step_s'] * 1e3:8.1f} ms  ratio to dense "
                  f"{r['step_s'] / dense:5.2f}  fwd+bwd {r['fwd_bwd_s'] * 1e3:7.1f}  optim {r['optim_s'] * 1e3:6.1f}  "
                  f"top-k {r['project_s'] * 1e3:7.1f} ms ({r['project_s'] / r['step_s']:5.1%})")
    wide = "d_model 1024"
    dense = table[(wide, "1")]["step_s"]
    sparse64 = table[(wide, "1/64")]
    print(json.dumps({
        "step_ratio_1_16": round(table[(wide, "1/16")]["step_s"] / dense, 3),
        "step_ratio_1_64": round(sparse64["step_s"] / dense, 3),
        "topk_share": round(sparse64["project_s"] / sparse64["step_s"], 3),
    }))


if __name__ == "__main__":
    main()
