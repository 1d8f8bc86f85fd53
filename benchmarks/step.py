"""One training step of the recipe (forward, backward, fused sparse Adam: update, top-k projection, decay),
dense vs sparse, side by side in one run.

Shapes: the `cpu` preset (4 layers, d_model 128, batch 32 x 128 tokens, AbsTopK at 1/4), the same
without activation sparsity (`model.afrac=1`: what AbsTopK costs), and d_model 1024 (2 layers, batch 8 x
128 tokens, to keep a CPU step at about a second; AbsTopK on, as in the preset). Densities 1, 1/4, 1/16,
1/64 (a density below the per-neuron floor, j / d_model, is skipped and said so). Each shape runs with
the dispatched kernels (`--kernels`, default auto) and, at d_model 1024, with the plain-torch reference
kernels too (the before/after of the kernels issue). Prints medians over `--repeats` steps and a final
JSON line with `abstopk_ratio_cpu_1_16` (the cpu preset's step with AbsTopK over without, at density
1/16), `step_ratio_1_16`, `step_ratio_1_64` (sparse / dense at d_model 1024) and `topk_share` (share of
the density-1/64 step spent in the projection: top-k mask, zeroing and decay, at d_model 1024), for the
dispatched kernels.

    .venv/bin/python benchmarks/step.py [--repeats 5] [--kernels auto|cpu|reference|triton]
"""

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

# This folder holds kernels.py: run as a script, it would shadow the `kernels` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from model.config import SparsityConfig, min_density  # noqa: E402
from model.gpt import GPT  # noqa: E402
from model.sparsity import sparse_tensors  # noqa: E402
from pipeline.config import TrainConfig, resolve_config  # noqa: E402
from pipeline.train import make_engine, train_step  # noqa: E402

PRESET = Path(__file__).resolve().parents[1] / "sweeps" / "configs" / "cpu.yaml"
DENSITIES = {"1": 1.0, "1/4": 0.25, "1/16": 1 / 16, "1/64": 1 / 64}
VOCAB = 2048
PHASES = ("fwd_bwd_s", "optim_s")


def shapes() -> dict[str, tuple]:
    cpu = resolve_config(PRESET)
    plain = resolve_config(PRESET, ["model.afrac=1.0"])
    wide = resolve_config(PRESET, ["model.d_model=1024", "model.num_layers=2", "train.batch_size=8"])
    return {"cpu preset": (cpu.model, cpu.train.batch_size),
            "cpu no AbsTopK": (plain.model, plain.train.batch_size),
            "d_model 1024": (wide.model, wide.train.batch_size)}


def time_steps(model_cfg, batch_size: int, density: float, repeats: int, device: str) -> dict[str, float]:
    torch.manual_seed(0)
    model = GPT(model_cfg, VOCAB, device=device)
    sparsity = SparsityConfig(density=density)
    train = TrainConfig(steps=1000)
    tensors = sparse_tensors(model, sparsity)
    engine = make_engine(model, tensors, train, sparsity)
    batch = torch.randint(0, VOCAB, (batch_size, model_cfg.context_length + 1), device=device)
    step = int(0.6 * train.steps)  # past the anneal: the projection runs at the target density
    for _ in range(2):  # warm-up: allocator, Adam state, thread pools
        train_step(engine, [batch], step, train, sparsity)
    runs = [train_step(engine, [batch], step + i, train, sparsity) for i in range(repeats)]
    result = {key: statistics.median(r[key] for r in runs) for key in runs[0] if key.endswith("_s")}
    result["step_s"] = statistics.median(sum(r[p] for p in PHASES) for r in runs)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kernels", default="auto", choices=["auto", "cuda", "cpu", "reference", "triton"])
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads; medians of {args.repeats} steps")
    table: dict[tuple[str, str, str], dict] = {}
    for shape, (model_cfg, batch_size) in shapes().items():
        backends = [args.kernels] + (["reference"] if shape == "d_model 1024" and args.kernels != "reference" else [])
        floor_min = min_density(model_cfg, SparsityConfig())
        for backend in backends:
            cfg = dataclasses.replace(model_cfg, kernels=backend)
            dense = None
            for label, density in DENSITIES.items():
                if density < 1.0 and density < floor_min:
                    print(f"{shape:14s} {backend:9s} density {label:5s}: skipped, below the per-neuron floor "
                          f"(j / d_model = {floor_min:g})")
                    continue
                r = time_steps(cfg, batch_size, density, args.repeats, device)
                dense = dense or r["step_s"]
                table[(shape, backend, label)] = r
                print(f"{shape:14s} {backend:9s} density {label:5s}: step {r['step_s'] * 1e3:8.1f} ms  ratio "
                      f"{r['step_s'] / dense:5.2f}  fwd+bwd {r['fwd_bwd_s'] * 1e3:7.1f}  adam {r['adam_s'] * 1e3:6.1f}"
                      f"  projection {r['project_s'] * 1e3:7.1f} ms ({r['project_s'] / r['step_s']:5.1%})")
    wide = ("d_model 1024", args.kernels)
    dense = table[(*wide, "1")]["step_s"]
    sparse64 = table[(*wide, "1/64")]
    with_topk, without = (table[(shape, args.kernels, "1/16")]["step_s"] for shape in ("cpu preset", "cpu no AbsTopK"))
    abstopk = with_topk / without
    print(json.dumps({
        "abstopk_ratio_cpu_1_16": round(abstopk, 3),
        "step_ratio_1_16": round(table[(*wide, "1/16")]["step_s"] / dense, 3),
        "step_ratio_1_64": round(sparse64["step_s"] / dense, 3),
        "topk_share": round(sparse64["project_s"] / sparse64["step_s"], 3),
    }))


if __name__ == "__main__":
    main()
