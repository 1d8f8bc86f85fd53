"""Does the L0-following step train as well as the exact recipe? (issue 18, "Quality")

The `cpu` preset (4 layers, context 128, AbsTopK 1/4, 600 steps of 4096 tokens on the stdlib mixed with
idioms) widened to d_model 256 at matrix density 1/64, below the CPU crossover (1/32), so that every matrix
enters the sparse step once the L0 anneal passes it. The per-neuron floor is 2: at the default 4, 4 / 256
is the whole budget of a 256-wide row, and the top-k would have nothing left to choose. For each seed, one
run with `sparsity.compute=exact` and one with `sparsity.compute=sparse` (same data, same initial weights),
each through the training loop (`pipeline.train.train`; no MLflow); the final validation loss (the whole
validation split) and the mean held-out task accuracy of both, and the wall time of each run.

    .venv/bin/python benchmarks/l0_quality.py [--seeds 2] [--steps 600] [--d-model 256]

Final JSON line: `val_loss_exact` and `val_loss_sparse` (per seed), `relative_gap` (mean sparse over mean
exact, minus 1; the issue's goal is within 1%), `per_seed_gap`, and the run times.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

# This folder holds kernels.py: run as a script, it would shadow the `kernels` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from infra.tracking import NullTracker  # noqa: E402
from model.gpt import GPT  # noqa: E402
from pipeline.config import resolve_config  # noqa: E402
from pipeline.data import build_data  # noqa: E402
from pipeline.evaluate import task_metrics  # noqa: E402
from pipeline.train import train  # noqa: E402
from pipeline.trial import build_training  # noqa: E402

PRESET = Path(__file__).resolve().parents[1] / "sweeps" / "configs" / "cpu.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--density", type=float, default=1 / 64)
    args = parser.parse_args()
    base = [f"model.d_model={args.d_model}", f"sparsity.density={args.density}", "sparsity.neuron_floor=2",
            f"train.steps={args.steps}"]
    dataset = build_data(resolve_config(PRESET, base).data, progress=False).dataset
    tokenizer = dataset.tokenizer()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; cpu preset at d_model {args.d_model}, "
          f"density {args.density:g}, floor 2, {args.steps} steps", flush=True)
    losses: dict[str, list[float]] = {"exact": [], "sparse": []}
    seconds: dict[str, list[float]] = {"exact": [], "sparse": []}
    with tempfile.TemporaryDirectory() as scratch:
        for seed in range(args.seeds):
            for compute in ("exact", "sparse"):
                run = Path(scratch) / f"{compute}-{seed}"
                cfg = resolve_config(PRESET, [*base, f"train.run_dir={run}", f"train.seed={seed}",
                                              f"sparsity.compute={compute}"])
                tick = time.perf_counter()
                result = train(build_training(cfg, dataset, "cpu"), cfg.train, cfg.sparsity, run, NullTracker(),
                               checkpoint_meta={}, progress=False, log=lambda _: None)
                seconds[compute].append(time.perf_counter() - tick)
                model = GPT(cfg.model, tokenizer.get_vocab_size())
                model.load_state_dict({k[len("model/"):]: v for k, v in result.state.items()
                                       if k.startswith("model/")})
                model.eval()
                scores = task_metrics(model, tokenizer, [], log=lambda _: None)
                accuracy = statistics.mean(v for k, v in scores.items() if k.endswith("/accuracy"))
                losses[compute].append(result.final["val_loss"])
                print(f"seed {seed} {compute:6s}: validation loss {result.final['val_loss']:.4f}  mean task "
                      f"accuracy {accuracy:.3f}  {seconds[compute][-1]:.0f} s", flush=True)
    gap = statistics.mean(losses["sparse"]) / statistics.mean(losses["exact"]) - 1
    per_seed = [s / e - 1 for e, s in zip(losses["exact"], losses["sparse"], strict=True)]
    print(f"sparse vs exact: mean validation loss {statistics.mean(losses['sparse']):.4f} vs "
          f"{statistics.mean(losses['exact']):.4f} ({gap:+.2%}); per seed "
          + ", ".join(f"{g:+.2%}" for g in per_seed)
          + f"; run time {statistics.mean(seconds['sparse']):.0f} s vs {statistics.mean(seconds['exact']):.0f} s")
    print(json.dumps({"val_loss_exact": [round(v, 4) for v in losses["exact"]],
                      "val_loss_sparse": [round(v, 4) for v in losses["sparse"]],
                      "relative_gap": round(gap, 4), "per_seed_gap": [round(g, 4) for g in per_seed],
                      "seconds_exact": [round(s) for s in seconds["exact"]],
                      "seconds_sparse": [round(s) for s in seconds["sparse"]]}))


if __name__ == "__main__":
    main()
