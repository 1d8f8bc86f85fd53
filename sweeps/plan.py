"""The price of a study before it runs (`circuitscale plan SWEEP.yaml`): per trial and in total the
training FLOPs, the memory per rank, the GPU-hours at a stated MFU and the cost, and how few GPUs each
trial would need (what a node could pack). Nothing is trained, no Ray is started; the study file is read
and expanded exactly as `circuitscale study` does (sweeps/spec.py).

- FLOPs: 6 N T (forward 2 N T, backward 4 N T per token: Kaplan et al. 2020, arXiv 2001.08361, sec. 2.1),
  for N the dense-equivalent parameter count (the paper's size: every weight but the bigram table, a
  lookup) and for N the nonzero count (L0 plus the weights that stay dense). The GPU time follows the
  dense-equivalent N, not L0: training runs masked dense kernels (kernels/masked_linear.py), so a zero
  weight costs as much as any other. The 6 N T rule leaves out attention's score FLOPs (6 x layers x
  context x d_model per token: 7% of 6 N at ef 1, less when wider) and counts the embedding lookup, which
  multiplies nothing, as a product (about as much at ef 1): the two nearly cancel.
- T: train.steps x the trainer's tokens per step (pipeline/train.py: batch_size x grad_accum x context x
  workers; train.batch_size is per worker, so the global batch grows with the workers).
- The LR search (sweeps/lr_search.py) trains every point at several rates first; its runs are priced
  here too, rung by rung, as if no candidate failed. Pruning and evaluation are not.
- Data preparation (CPU, once per corpus): hours per TB of text at the study's CPUs, extrapolated from the
  build's measured throughput per core (`DATA_MB_PER_S_PER_CORE`).
- Memory per rank: an estimate, stated by pipeline/cost.py's `memory_per_rank` and `activation_bytes`
  (the model-level counts live there: this folder imports no `model` or `kernels`).
- GPU-hours: FLOPs / (peak x MFU). The MFU is an assumption unless `--mfu` states a measured one
  (6 x N x tokens/s / peak, tokens/s from benchmarks/gpu_train.py on the target GPU).
"""

import math
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ExperimentConfig
from pipeline.cost import (
    EngineKind,
    Memory,
    ParamCount,
    Precision,
    count_params,
    memory_per_rank,
    sparse_step_crossover,
    sparse_step_pays,
    trial_engine,
    trial_tokens_per_step,
)
from pipeline.errors import UserError
from sweeps.lr_search import rung_steps, survivors
from sweeps.spec import StudyConfig, TrialSpec, load_study


@dataclass(kw_only=True, frozen=True)
class GpuSpec:
    name: str
    peak_flops: dict[str, float]  # dense (no 2:4 sparsity) peak FLOP/s by training precision
    memory_bytes: float
    price_usd: float  # per GPU-hour: an assumption, never a quote (--price sets the real one)


# Peaks from NVIDIA's datasheets (A100 80GB SXM: "NVIDIA A100 Tensor Core GPU" datasheet; H100 SXM: "NVIDIA
# H100 Tensor Core GPU" datasheet): BF16 Tensor Core 312 and 989 TFLOP/s dense (the datasheets' 624 / 1979
# count 2:4 structured sparsity, which masked dense kernels do not use). fp32 runs get the plain FP32 peak,
# 19.5 and 67 TFLOP/s: this project never enables TF32 matmuls. Both cards hold 80 GB.
# Prices: round ASSUMPTIONS, in the 2026 range of specialist clouds' on-demand rates for these cards (A100
# 80GB about $1.5-2.5, H100 SXM about $2.5-4 per GPU-hour; hyperscalers list more, reservations less).
GPUS = {
    "a100": GpuSpec(name="A100 80GB SXM", peak_flops={"bf16": 312e12, "fp32": 19.5e12}, memory_bytes=80e9,
                    price_usd=2.0),
    "h100": GpuSpec(name="H100 80GB SXM", peak_flops={"bf16": 989e12, "fp32": 67e12}, memory_bytes=80e9,
                    price_usd=3.0),
}
# An ASSUMPTION: large dense GPT training reaches 0.3-0.5 MFU; this project's small widths (d_model 256),
# 16-wide heads, AbsTopK and the top-k projection after every step will likely do worse. State a measured
# value with --mfu.
DEFAULT_MFU = 0.3
HEADROOM = 0.9  # a rank may plan on 90% of the card: the rest for the CUDA context, NCCL and DeepSpeed buffers
GPUS_PER_NODE = 8  # an HGX node (AWS p4de / p5): what the packing fills


@dataclass(frozen=True)
class TrialPlan:
    spec: TrialSpec
    counts: ParamCount
    engine: EngineKind  # as the trial would train on the study's workers
    precision: Precision
    tokens: int
    flops: float  # 6 N T, N dense-equivalent
    flops_nonzero: float  # 6 N T, N nonzero
    memory: Memory  # per rank on the study's workers
    fit_gpus: int | None  # fewest GPUs whose ranks fit the card (None: not even the study's workers)
    gpu_hours: float
    cost_usd: float


@dataclass(frozen=True)
class SearchPlan:
    """The LR search of one point: `runs` candidate trainings of `steps` steps in all."""

    trial: TrialPlan  # the point's first trial (its model and batch)
    runs: int
    steps: int
    tokens: int
    flops: float
    flops_nonzero: float
    gpu_hours: float
    cost_usd: float


@dataclass(frozen=True)
class Plan:
    study: StudyConfig
    gpu_key: str
    gpu: GpuSpec
    mfu: float
    mfu_assumed: bool
    price: float
    price_assumed: bool
    trials: list[TrialPlan]
    lr_search: list[SearchPlan]


def parse_options(gpu: str, mfu: str | float | None, price: str | float | None) -> tuple[GpuSpec, float, float]:
    """The GPU, MFU and price from the command line (None: the defaults); raises UserError in one line."""
    if gpu not in GPUS:
        raise UserError(f"plan: --gpu must be one of {', '.join(GPUS)}, got {gpu!r}")
    spec = GPUS[gpu]
    rate = _positive("--mfu", mfu, DEFAULT_MFU)
    if rate > 1.0:
        raise UserError(f"plan: --mfu is a fraction of the peak in (0, 1], got {mfu}")
    return spec, rate, _positive("--price", price, spec.price_usd)


def _positive(flag: str, value: str | float | None, default: float) -> float:
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number <= 0:
        raise UserError(f"plan: {flag} must be a positive number, got {value!r}")
    return number


def fit_gpus(cfg: ExperimentConfig, counts: ParamCount, workers: int, engine: EngineKind, gpu: GpuSpec) -> int | None:
    """The fewest GPUs (a power of two dividing `workers`, or `workers`) whose ranks fit the card with
    headroom, keeping the micro-batch and the global batch (train.grad_accum x workers / GPUs); the
    engine stays the study's (one GPU under DeepSpeed means trial.engine=deepspeed: auto would fall back
    to the fp32 torch engine)."""
    for gpus in gpu_counts(workers):
        if memory_per_rank(cfg, counts, gpus, engine).total <= HEADROOM * gpu.memory_bytes:
            return gpus
    return None


def gpu_counts(workers: int) -> list[int]:
    counts = [1 << i for i in range(workers.bit_length()) if workers % (1 << i) == 0]
    return counts + ([workers] if counts[-1] != workers else [])


def gpu_hours(flops: float, gpu: GpuSpec, precision: Precision, mfu: float) -> float:
    return flops / (gpu.peak_flops[precision] * mfu) / 3600


def plan_trial(spec: TrialSpec, study: StudyConfig, gpu: GpuSpec, mfu: float, price: float,
               counts: ParamCount) -> TrialPlan:
    cfg, workers = spec.config, study.workers
    engine, precision = trial_engine(cfg, workers)
    tokens = cfg.train.steps * trial_tokens_per_step(cfg, workers)
    flops = 6 * counts.dense * tokens
    hours = gpu_hours(flops, gpu, precision, mfu)
    return TrialPlan(spec=spec, counts=counts, engine=engine, precision=precision, tokens=tokens, flops=flops,
                     flops_nonzero=6 * counts.nonzero * tokens, memory=memory_per_rank(cfg, counts, workers, engine),
                     fit_gpus=fit_gpus(cfg, counts, workers, engine, gpu), gpu_hours=hours, cost_usd=hours * price)


def lr_search_steps(study: StudyConfig, steps: dict[str, int]) -> dict[str, list[int]]:
    """Per point (name -> its train.steps), the steps of every candidate run the LR search trains: the
    rungs of sweeps/lr_search.py, every point stepping together until each has one rate left, with no
    candidate failing (a failed one still ranks, so the survivors are the same in number)."""
    search = study.lr_search
    if not search.lrs:
        return {}
    alive = dict.fromkeys(steps, len(search.lrs))
    runs: dict[str, list[int]] = {name: [] for name in steps}
    rung, done = 0, False
    while not done:
        done = True
        for name, count in alive.items():
            length = rung_steps(steps[name], search.budget, search.eta, rung)
            runs[name] += [length] * count
            alive[name] = survivors(count, length, steps[name], search.eta)
            done &= alive[name] == 1
        rung += 1
    return runs


def plan_search(trial: TrialPlan, runs: list[int], study: StudyConfig, gpu: GpuSpec, mfu: float,
                price: float) -> SearchPlan:
    tokens = sum(runs) * trial_tokens_per_step(trial.spec.config, study.workers)
    flops = 6 * trial.counts.dense * tokens
    hours = gpu_hours(flops, gpu, trial.precision, mfu)
    return SearchPlan(trial=trial, runs=len(runs), steps=sum(runs), tokens=tokens, flops=flops,
                      flops_nonzero=6 * trial.counts.nonzero * tokens, gpu_hours=hours, cost_usd=hours * price)


def plan_study(path: str | Path, overrides: list[str] | None = None, *, gpu: str = "h100",
               mfu: str | float | None = None, price: str | float | None = None) -> Plan:
    """The plan of the study in `path` with `overrides` (as `circuitscale study` takes them)."""
    spec, rate, usd = parse_options(gpu, mfu, price)
    study, specs = load_study(path, overrides)
    counted: dict[str, ParamCount] = {}  # the seeds of a point share its model
    trials = []
    for trial in specs:
        if trial.point_name not in counted:
            counted[trial.point_name] = count_params(trial.config)
        trials.append(plan_trial(trial, study, spec, rate, usd, counted[trial.point_name]))
    first = {}
    for trial in trials:
        first.setdefault(trial.spec.point_name, trial)
    runs = lr_search_steps(study, {name: t.spec.config.train.steps for name, t in first.items()})
    searches = [plan_search(first[name], steps, study, spec, rate, usd) for name, steps in runs.items()]
    return Plan(study=study, gpu_key=gpu, gpu=spec, mfu=rate, mfu_assumed=mfu is None, price=usd,
                price_assumed=price is None, trials=trials, lr_search=searches)


def pack_nodes(gpus: list[int], per_node: int = GPUS_PER_NODE) -> int:
    """Nodes that run trials needing `gpus` GPUs each all at once: first-fit decreasing (a trial wider
    than a node takes whole nodes)."""
    free: list[int] = []
    whole = 0
    for need in sorted(gpus, reverse=True):
        if need >= per_node:
            whole += math.ceil(need / per_node)
            continue
        slot = next((i for i, room in enumerate(free) if room >= need), None)
        if slot is None:
            free.append(per_node)
            slot = len(free) - 1
        free[slot] -= need
    return whole + len(free)


# benchmarks/data_build.py on a 2-core CPU (2026-12-03): 338.4 MB of Python (the stdlib and a virtualenv's
# site-packages, 119M tokens) built in 200.2 s with data.engine=ray (181.1 s local): 0.85 MB/s per core end to end.
DATA_MB_PER_S_PER_CORE = 0.85


def data_cpus(study: StudyConfig) -> int:
    """The CPUs the study's cluster holds while it trains: what a `data.engine=ray` build can spread over."""
    return int(study.max_concurrent_trials * study.workers * study.cpus_per_worker)


def data_hours_per_tb(study: StudyConfig) -> float:
    return 1e6 / (DATA_MB_PER_S_PER_CORE * data_cpus(study)) / 3600


def summary(plan: Plan) -> dict:
    """The JSON line's figures for the whole sweep (trials and LR search)."""
    runs = [*plan.trials, *plan.lr_search]
    fits = [t.fit_gpus or plan.study.workers for t in plan.trials]
    return {
        "study": plan.study.name, "gpu": plan.gpu_key, "trials": len(plan.trials),
        "lr_search_runs": sum(s.runs for s in plan.lr_search),
        "tokens": sum(r.tokens for r in runs),
        "flops": float(sum(r.flops for r in runs)), "flops_nonzero": float(sum(r.flops_nonzero for r in runs)),
        "trial_flops": float(sum(t.flops for t in plan.trials)),
        "lr_search_flops": float(sum(s.flops for s in plan.lr_search)),
        "gpu_hours": float(f"{sum(r.gpu_hours for r in runs):.4g}"),
        "cost_usd": round(sum(r.cost_usd for r in runs), 2),
        "mfu": plan.mfu, "mfu_assumed": plan.mfu_assumed,
        "price_usd_per_gpu_hour": plan.price, "price_assumed": plan.price_assumed,
        "max_memory_per_rank_gb": round(max(t.memory.total for t in plan.trials) / 1e9, 2),
        "gpus_per_trial": plan.study.workers,
        "right_sized_gpus": sum(fits), "right_sized_nodes": pack_nodes(fits),
        "data_cpus": data_cpus(plan.study), "data_hours_per_tb": round(data_hours_per_tb(plan.study), 2),
        "l0_gpu_crossover": sparse_step_crossover("cuda"),
        "trial_flops_below_cpu_crossover": below_crossover(plan)[1],
    }


def below_crossover(plan: Plan) -> tuple[int, float]:
    """(trials whose matrix density is at or below the CPU's measured crossover of the L0-following step,
    their share of the trials' dense-equivalent FLOPs): what that step could take, were it to pay there on
    the GPU too (kernels/sparse_compute.py; no GPU crossover is measured, so the GPU-hours are the exact
    recipe's, which is what the trials run there)."""
    below = [t for t in plan.trials if sparse_step_pays(t.spec.config.sparsity.density, "cpu")]
    total = sum(t.flops for t in plan.trials)
    return len(below), round(sum(t.flops for t in below) / total, 4) if total else 0.0


def format_plan(plan: Plan) -> str:
    """The tables and the totals, as `circuitscale plan` prints them before the JSON line."""
    return "\n".join([*_trial_table(plan), *_search_table(plan), *_totals(plan)])


def _trial_table(plan: Plan) -> list[str]:
    study = plan.study
    lines = [f"study {study.name}: {len(plan.trials)} trials, {study.workers} workers each, priced on "
             f"{plan.gpu.name} (memory per rank on {study.workers} workers; 'fits': fewest GPUs that hold it)",
             f"  {'#':>3s} {'d_model':>7s} {'density':>8s} {'emb.dens':>8s} {'seed':>4s} {'engine':>10s} "
             f"{'N dense':>8s} {'N nonzero':>9s} {'tokens':>7s} {'FLOPs 6NT':>9s} {'nonzero':>8s} {'GB/rank':>7s} "
             f"{'fits':>4s} {'GPU-h':>7s} {'cost':>9s}"]
    for t in plan.trials:
        cfg = t.spec.config
        lines.append(f"  {_head(t)} {cfg.train.seed:4d} {_engine(t):>10s} {_count(t.counts.dense):>8s} "
                     f"{_count(t.counts.nonzero):>9s} {_count(t.tokens):>7s} {t.flops:9.2e} {t.flops_nonzero:8.1e} "
                     f"{t.memory.total / 1e9:7.1f} {t.fit_gpus or 'none':>4} {_hours(t.gpu_hours):>7s} "
                     f"{_usd(t.cost_usd):>9s}")
    return lines


def _search_table(plan: Plan) -> list[str]:
    if not plan.lr_search:
        return []
    search = plan.study.lr_search
    lines = [f"LR search per point (sweeps/lr_search.py: {len(search.lrs)} rates, budget {search.budget:g}, "
             f"eta {search.eta}; run by run as if none failed)",
             f"  {'#':>3s} {'d_model':>7s} {'density':>8s} {'emb.dens':>8s} {'runs':>4s} {'steps':>7s} "
             f"{'tokens':>7s} {'FLOPs 6NT':>9s} {'nonzero':>8s} {'GPU-h':>7s} {'cost':>9s}"]
    for s in plan.lr_search:
        lines.append(f"  {_head(s.trial)} {s.runs:4d} {s.steps:7d} {_count(s.tokens):>7s} {s.flops:9.2e} "
                     f"{s.flops_nonzero:8.1e} {_hours(s.gpu_hours):>7s} {_usd(s.cost_usd):>9s}")
    return lines


def _totals(plan: Plan) -> list[str]:
    figures, study = summary(plan), plan.study
    precisions = sorted({t.precision for t in plan.trials})
    peaks = ", ".join(f"{plan.gpu.peak_flops[p] / 1e12:g} TFLOP/s {p}" for p in precisions)
    largest = max(plan.trials, key=lambda t: t.memory.total)
    lines = [
        f"total: {len(plan.trials)} trials + {figures['lr_search_runs']} LR-search runs over {len(plan.lr_search)} "
        f"points; {figures['tokens']:.3g} tokens",
        f"  FLOPs 6NT, N dense-equivalent (masked dense kernels execute every weight, zero or not): "
        f"{figures['flops']:.3e} (trials {figures['trial_flops']:.3e}, LR search {figures['lr_search_flops']:.3e})",
        f"  FLOPs 6NT, N nonzero (what truly sparse kernels would need): {figures['flops_nonzero']:.3e}",
        f"  {plan.gpu.name}: peak {peaks} (NVIDIA datasheet, dense); MFU {plan.mfu:g} "
        + ("(ASSUMED: --mfu states a measured one)" if plan.mfu_assumed else "(stated with --mfu)"),
        f"  GPU-hours {_hours(figures['gpu_hours'])}; cost {_usd(figures['cost_usd'])} at ${plan.price:.2f} "
        + (f"per GPU-hour (ASSUMED default for {plan.gpu_key}: --price sets yours)" if plan.price_assumed
           else "per GPU-hour (--price)"),
        f"  memory per rank on {_plural(study.workers, 'worker')}: at most {largest.memory.total / 1e9:.1f} GB (trial "
        f"{largest.spec.name.split('-', 1)[0]}, d_model {largest.spec.config.model.d_model}); an estimate, against "
        f"{HEADROOM:.0%} of the card's {plan.gpu.memory_bytes / 1e9:g} GB",
        *_packing(plan),
        _l0_line(plan),
        f"  data preparation (CPU, once per corpus; not in the GPU-hours): about "
        f"{data_hours_per_tb(study):.1f} h per TB of text on the study's {data_cpus(study)} CPUs "
        f"(max_concurrent_trials x workers x cpus_per_worker), extrapolated from "
        f"{DATA_MB_PER_S_PER_CORE} MB/s per core measured on a 2-core CPU (benchmarks/data_build.py): "
        "the scan, dedup and encode tasks spread over the CPUs, the listing, the BPE sample and the shard "
        "writing run on the driver",
        "  not counted: pruning (tasks x prune.search_runs mask trainings per trial), evaluation, idle nodes",
    ]
    if study.gpus_per_worker != 1:
        lines.append(f"  note: the study asks {study.gpus_per_worker:g} GPUs per worker; priced as one GPU per worker")
    return lines


def _l0_line(plan: Plan) -> str:
    """The L0-following step's place in the estimate. No GPU crossover was measured (sparse_step_crossover),
    so on a GPU the dispatch rule keeps every trial on the exact path, and that is what the GPU-hours cost."""
    count, share = below_crossover(plan)
    cpu = round(1 / sparse_step_crossover("cpu"))
    return (f"  L0-following step (sparsity.compute=sparse): no GPU crossover measured, so the GPU-hours are the "
            f"exact recipe's, which every trial runs on a GPU; {count} of {len(plan.trials)} trials are at or "
            f"below the CPU's crossover (1/{cpu}) and hold {share:.0%} of the trials' FLOPs, the share a GPU "
            "crossover there could cut (on the CPU the sparse step took 0.12-0.5x the exact one: "
            "benchmarks/l0_step.py)")


def _packing(plan: Plan) -> list[str]:
    study, figures = plan.study, summary(plan)
    written = len(plan.trials) * study.workers
    by_size: dict[int, int] = {}
    for t in plan.trials:
        by_size[t.fit_gpus or study.workers] = by_size.get(t.fit_gpus or study.workers, 0) + 1
    sizes = ", ".join(f"{n} on {_plural(g, 'GPU')}"
                      + (f" ({GPUS_PER_NODE // g} per node)" if g < GPUS_PER_NODE else "")
                      for g, n in sorted(by_size.items()))
    nodes = pack_nodes([study.workers] * len(plan.trials))
    lines = [f"  packing (the study is not changed): as written {len(plan.trials)} trials x "
             f"{_plural(study.workers, 'GPU')} = {written} GPUs, {_plural(nodes, f'{GPUS_PER_NODE}-GPU node')} to "
             f"run all at once ({study.max_concurrent_trials} at a time by max_concurrent_trials)",
             f"  right-sized by memory: {sizes}; {figures['right_sized_gpus']} GPUs, "
             f"{_plural(figures['right_sized_nodes'], 'node')} for all at once. Same FLOPs, so the same GPU-hours "
             "at one MFU (fewer ranks: less communication, longer wall time)"
             + (f"; keep the global batch with train.grad_accum x {study.workers} / GPUs" if study.workers > 1 else "")]
    if any(t.fit_gpus is None for t in plan.trials):
        lines.append(f"  WARNING: {sum(t.fit_gpus is None for t in plan.trials)} trial(s) do not fit the card even "
                     f"on {study.workers} workers: raise workers or deepspeed.zero_stage, or lower train.batch_size")
    if any(t.fit_gpus == 1 and t.engine == "deepspeed" for t in plan.trials):
        lines.append("  (one GPU under DeepSpeed means trial.engine=deepspeed: auto would train on the fp32 torch "
                     "engine)")
    return lines


def _head(t: TrialPlan) -> str:
    s = t.spec.config.sparsity
    embedding = s.embedding_density if s.embedding_density is not None else s.density
    return (f"{t.spec.name.split('-', 1)[0]:>3s} {t.spec.config.model.d_model:7d} {_fraction(s.density):>8s} "
            f"{_fraction(embedding):>8s}")


def _engine(t: TrialPlan) -> str:
    if t.engine == "torch":
        return "torch/fp32"
    return f"zero{t.spec.config.deepspeed.zero_stage}/{t.precision}"


def _fraction(density: float) -> str:
    """1/8 rather than 0.125: the paper's densities are powers of two."""
    inverse = 1 / density
    if density == 1.0 or abs(inverse - round(inverse)) > 1e-9:
        return f"{density:.3g}"
    return f"1/{round(inverse)}"


def _count(n: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.0f}"


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' if n != 1 else ''}"


def _hours(hours: float) -> str:
    return f"{hours:,.0f}" if hours >= 100 else f"{hours:.3g}"


def _usd(usd: float) -> str:
    return f"${usd:,.0f}" if usd >= 100 else f"${usd:.2f}"
