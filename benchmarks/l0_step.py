"""Training step time and peak memory, exact recipe vs the L0-following step (`sparsity.compute=sparse`),
side by side in one run, at the paper grid's widths scaled to fit one machine.

Shapes: the `cpu` preset (AbsTopK at 1/4) widened to d_model 1024 (2 layers, batch 8 x 128 tokens), 2048
(1 layer, 8 x 128) and 4096 (1 layer, 4 x 128), at the paper grid's matrix densities for those widths
(1/16 to 1/1024; the embedding density is the grid's, density x d_model / 256). Each (shape, density,
compute) runs in its own process, so that its peak RSS is its own: the exact step, then the sparse one
(after its first dense step and the step that enters the mode), its regrow step (a dense-gradient pass,
once every `sparsity.regrow_every` steps), and the amortized step = (regrow + (R - 1) x sparse) / R with
R = regrow_every (100). Medians over `--repeats` steps. Memory, exact / sparse: the optimizer state, and
the RSS after the timed steps; the peak RSS includes the first, dense steps (as a real run's does: its
L0 anneal starts dense, and the exact path runs until the density passes the crossover).

With `--zero STAGE` every configuration trains under DeepSpeed ZeRO 1 or 2 on `--workers` local workers
(gloo on CPU; each worker takes the batch, so a step trains workers x batch sequences): the figures are rank
0's (its step time, its optimizer state: its ZeRO shard plus the sparse part, which ZeRO does not hold).

Ends with a JSON line: `sparse_vs_exact_1_64` and `sparse_vs_exact_1_256` (amortized sparse step over the
exact step at d_model 1024 on this machine), `device`, `zero` (the stage, or null), and every measured row.

    .venv/bin/python benchmarks/l0_step.py [--repeats 3] [--quick] [--zero 2 --workers 2]
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

# This folder holds kernels.py: run as a script, it would shadow the `kernels` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "sweeps" / "configs" / "cpu.yaml"
VOCAB = 2048
REGROW_EVERY = 100
# d_model -> (layers, batch, densities): the paper grid's densities at each width (sweeps/paper.yaml), and 1/256
# at d_model 1024 for the figure (the floor j = 4 allows down to 4 / 1024)
SHAPES = {
    1024: (2, 8, ["1/16", "1/64", "1/128", "1/256"]),
    2048: (1, 8, ["1/64", "1/256", "1/512"]),
    4096: (1, 4, ["1/256", "1/1024"]),
}
QUICK = {1024: (2, 8, ["1/16", "1/32", "1/64", "1/256"])}


def optimizer_state_mb(engine) -> float:
    """This process's optimizer state: the plain-torch engine's, or under DeepSpeed its ZeRO shard's plus
    the sparse part's (split off, replicated)."""
    optimizers = [engine.sparse, engine.side] if hasattr(engine, "sparse") else [engine.optimizer]
    return sum(v.nbytes for opt in optimizers if opt is not None for state in opt.state.values()
               for v in state.values() if torch.is_tensor(v)) / 2**20


def measure(d_model: int, layers: int, batch: int, density: float, compute: str, repeats: int,
            every_density: bool = False, zero: int | None = None) -> dict:
    """One configuration, in this process (one rank of it under `zero`): median step seconds (and the regrow
    step's for sparse), the optimizer state's size and the process's RSS after the timed steps."""
    import psutil

    from infra.engine import DeepSpeedConfig
    from kernels import sparse_compute
    from model.gpt import GPT
    from model.sparsity import sparse_tensors
    from pipeline.config import TrainConfig, resolve_config
    from pipeline.train import make_engine, train_step

    floor = 2 if density < 4 / d_model else 4  # as the grid lowers the floor where j / d_model exceeds the density
    cfg = resolve_config(PRESET, [f"model.d_model={d_model}", f"model.num_layers={layers}",
                                  f"train.batch_size={batch}", f"sparsity.density={density}",
                                  f"sparsity.embedding_density={min(1.0, density * d_model / 256)}",
                                  f"sparsity.neuron_floor={floor}", f"sparsity.compute={compute}",
                                  f"sparsity.regrow_every={REGROW_EVERY}"])
    if every_density:  # measuring the crossover itself: the sparse step at every density
        sparse_compute.CROSSOVER[torch.device("cpu").type] = 1.0
    torch.manual_seed(0)
    model = GPT(cfg.model, VOCAB)
    train = TrainConfig(steps=1000, batch_size=batch)
    tensors = sparse_tensors(model, cfg.sparsity)
    if zero is None:
        engine = make_engine(model, tensors, train, cfg.sparsity)
    else:
        engine = make_engine(model, tensors, train, cfg.sparsity, kind="deepspeed",
                             deepspeed=DeepSpeedConfig(zero_stage=zero))
    data = torch.randint(0, VOCAB, (batch, cfg.model.context_length + 1))
    step = int(0.6 * train.steps)  # past the anneal: the target density
    for i in range(3):  # the first projection, the step into the sparse mode, one more (allocator, state)
        train_step(engine, [data], step + i, train, cfg.sparsity)
    times = []
    for i in range(repeats):
        tick = time.perf_counter()
        train_step(engine, [data], step + 3 + i, train, cfg.sparsity)
        times.append(time.perf_counter() - tick)
    out = {"step_s": statistics.median(times)}
    linears = [m for m in model.modules() if getattr(m, "active", None) is not None]
    out["sparse_matrices"] = len(linears)
    if compute == "sparse":
        regrows = []
        for i in range(max(1, repeats // 2)):
            for m in linears:
                m.active.regrow = True
            tick = time.perf_counter()
            train_step(engine, [data], step + 3 + repeats + i, train, cfg.sparsity)
            regrows.append(time.perf_counter() - tick)
        out["regrow_s"] = statistics.median(regrows)
        out["amortized_s"] = (out["regrow_s"] + (REGROW_EVERY - 1) * out["step_s"]) / REGROW_EVERY
    out["optim_state_mb"] = optimizer_state_mb(engine)
    out["rss_mb"] = psutil.Process().memory_info().rss / 2**20
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def measure_rank(args: list, out: str) -> None:
    """`measure` on one rank of a DeepSpeed run (infra.distributed.spawn); rank 0 writes the figures."""
    figures = measure(*args)
    if os.environ["RANK"] == "0":
        Path(out).write_text(json.dumps(figures))


def run_child(d_model, layers, batch, density, compute, repeats, every_density=False, zero=None,
              workers=1) -> dict:
    args = [sys.executable, __file__, "--child",
            json.dumps([[d_model, layers, batch, density, compute, repeats, every_density, zero], workers])]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT,
                          env=os.environ | {"PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise SystemExit(f"l0_step: the {compute} step at d_model {d_model}, density {density:g} failed:\n"
                         f"{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="d_model 1024 only, 1/16 to 1/256")
    parser.add_argument("--every-density", action="store_true",
                        help="the sparse step at every density, whatever the dispatch rule says (finds the crossover)")
    parser.add_argument("--zero", type=int, choices=[1, 2], help="train under DeepSpeed ZeRO at this stage")
    parser.add_argument("--workers", type=int, default=2, help="DeepSpeed workers with --zero (default 2)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        config, workers = json.loads(args.child)
        if config[-1] is None:
            print(json.dumps(measure(*config)))
            return
        import tempfile

        from infra.distributed import spawn

        with tempfile.TemporaryDirectory() as tmp:
            spawn(measure_rank, workers, config, f"{tmp}/rank0.json")
            print(Path(f"{tmp}/rank0.json").read_text())
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    where = f"ZeRO {args.zero} on {args.workers} workers (rank 0's figures)" if args.zero else "one process"
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, {where}; medians of "
          f"{args.repeats} steps; sparse amortized over regrow_every={REGROW_EVERY}")
    workers = args.workers if args.zero else 1
    rows, ratios = [], {}
    for d_model, (layers, batch, labels) in (QUICK if args.quick else SHAPES).items():
        for label in labels:
            density = 1 / int(label.split("/")[1])
            exact = run_child(d_model, layers, batch, density, "exact", args.repeats, zero=args.zero, workers=workers)
            sparse = run_child(d_model, layers, batch, density, "sparse", args.repeats, args.every_density,
                               zero=args.zero, workers=workers)
            ratio = sparse["amortized_s"] / exact["step_s"]
            row = {"d_model": d_model, "layers": layers, "tokens": batch * 128, "density": label,
                   "exact_s": round(exact["step_s"], 4), "sparse_s": round(sparse["step_s"], 4),
                   "regrow_s": round(sparse["regrow_s"], 4), "amortized_s": round(sparse["amortized_s"], 4),
                   "ratio": round(ratio, 3), "exact_rss_mb": round(exact["peak_rss_mb"]),
                   "sparse_rss_mb": round(sparse["peak_rss_mb"]), "sparse_matrices": sparse["sparse_matrices"]}
            rows.append(row)
            if d_model == 1024:
                ratios[f"sparse_vs_exact_{label.replace('/', '_')}"] = round(ratio, 3)
            print(f"d_model {d_model:4d} x{layers} density {label:6s}: exact {exact['step_s'] * 1e3:8.1f} ms  "
                  f"sparse {sparse['step_s'] * 1e3:8.1f} ms (regrow {sparse['regrow_s'] * 1e3:8.1f} ms)  "
                  f"amortized ratio {ratio:5.3f}  optimizer state {exact['optim_state_mb']:6.0f} / "
                  f"{sparse['optim_state_mb']:5.0f} MB  RSS {exact['rss_mb']:5.0f} / {sparse['rss_mb']:5.0f} MB (peak "
                  f"{exact['peak_rss_mb']:5.0f} / {sparse['peak_rss_mb']:5.0f})  {sparse['sparse_matrices']} sparse "
                  "matrices",
                  flush=True)
    print(json.dumps({**ratios, "device": device, "zero": args.zero, "rows": rows}))


if __name__ == "__main__":
    main()
