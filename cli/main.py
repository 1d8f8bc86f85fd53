"""The `circuitscale` command line: one verb per stage, and the study with its report.

Every verb takes `--config FILE` and dotlist overrides, prints where its outputs are, and exits 2
with one line on a user error (bad config, bad input); bugs keep their traceback. This is the one
module that sees every layer: the study (sweeps/) and the report (analysis/) meet only here.
"""

import argparse
import json
import signal
import subprocess
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from infra.tracking import tracked_run
from pipeline.circuits import prune_run, require_trained
from pipeline.config import ExperimentConfig, check_overrides, config_to_yaml, resolve_config
from pipeline.data import DataResult, build_data
from pipeline.errors import UserError
from pipeline.tasks import TASKS, check_task
from pipeline.train import NonFiniteLoss
from pipeline.trial import run_trial

# sweeps/ (Ray, ~2 s) and analysis/ (matplotlib, scipy.stats, ~1.5 s) are imported by the verbs that use
# them, so `data`, `train`, `--help` and the rest start without paying for them


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if hasattr(args, "run_raw"):  # verbs about a study, not one experiment config
            return args.run_raw(args)
        config = args.config
        if getattr(args, "takes_run", False):
            # the run folder: the one argument without '=', or an existing folder (a study's trial folders
            # are named like `000-d_model=64-density=0.25-...-seed=0`)
            runs = [x for x in args.overrides if "=" not in x or Path(x).is_dir()]
            if len(runs) != 1:
                raise UserError(f"{args.verb}: name exactly one run folder (written by `circuitscale train`)")
            args.run_dir, args.overrides = runs[0], [x for x in args.overrides if x != runs[0]]
            if not (Path(args.run_dir) / "config.yaml").is_file():
                raise UserError(f"{args.verb}: {args.run_dir} is not a run folder (no config.yaml)")
            config = config or str(Path(args.run_dir) / "config.yaml")  # the run's own resolved config
        check_overrides(args.overrides)
        cfg = resolve_config(config, args.overrides)
        if cfg.data.engine == "ray":  # a verb that builds data with Ray needs its runner, which lives in sweeps/
            import sweeps.data_engine  # noqa: F401
        return args.run(cfg, args)
    except UserError as err:
        print(f"circuitscale: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("circuitscale: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="circuitscale", description="Scaling studies of weight-sparse transformers and their circuits."
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    data = verbs.add_parser("data", help="build (or reuse) the tokenized corpus: BPE + token shards")
    _common(data)
    data.set_defaults(run=run_data)
    tasks = verbs.add_parser("tasks", help="check the task suite's generators under the corpus's tokenizer")
    _common(tasks)
    tasks.add_argument("--pairs", type=int, default=256, help="pairs drawn per task and split (default 256)")
    tasks.set_defaults(run=run_tasks)
    train = verbs.add_parser("train", help="train one model (resuming from its last checkpoint) and export it")
    _common(train)
    train.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    train.set_defaults(run=run_train)
    prune = verbs.add_parser("prune", help="prune a trained run's model to a circuit per task",
                             usage="circuitscale prune [--config FILE] [--no-progress] RUN [KEY=VALUE ...]")
    _common(prune)  # RUN (a folder written by `circuitscale train`) is the one argument without '='
    prune.set_defaults(takes_run=True)
    prune.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    prune.set_defaults(run=run_prune)
    bridge = verbs.add_parser("bridge", help="train a weight-sparse twin of a dense run, coupled to it by a bridge",
                              usage="circuitscale bridge [--config FILE] [--no-progress] DENSE_RUN [KEY=VALUE ...]")
    _common(bridge)  # DENSE_RUN: a finished dense run; its config is the default (model.*, sparsity.* override)
    bridge.set_defaults(takes_run=True)
    bridge.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    bridge.set_defaults(run=run_bridge_verb)
    steer = verbs.add_parser("steer", help="steer a bridged dense model through a task's sparse circuit",
                             usage="circuitscale steer --task TASK [--nodes N] [--max-strength S] [--no-progress] "
                                   "BRIDGE_RUN [KEY=VALUE ...]")
    _common(steer)  # BRIDGE_RUN: a finished `circuitscale bridge` run; prune.* overrides set the circuit search
    steer.set_defaults(takes_run=True)
    steer.add_argument("--task", required=True, help="the task whose cue to steer (e.g. single_double_quote)")
    steer.add_argument("--nodes", type=int, default=4, help="cue nodes edited together (default 4)")
    steer.add_argument("--max-strength", type=float, default=3.0,
                       help="the largest edit strength (1: the partner prompt's activations; default 3)")
    steer.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    steer.set_defaults(run=run_steer)
    study = verbs.add_parser("study", help="run (or resume) a study: a Ray Tune grid of trials, then its report",
                             usage="circuitscale study [-v] SWEEP.yaml [KEY=VALUE ...]")
    study.add_argument("sweep", metavar="SWEEP.yaml", help="the study file (e.g. sweeps/cpu.yaml)")
    study.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotlist overrides for every trial")
    study.add_argument("-v", "--verbose", action="count", default=1, help="more of Ray's output (-vv: worker logs)")
    study.set_defaults(run_raw=run_study)
    plan = verbs.add_parser("plan", help="price a study before it runs: FLOPs, memory per rank, GPU-hours, cost",
                            usage="circuitscale plan [--gpu a100|h100] [--price USD] [--mfu F] SWEEP.yaml "
                                  "[KEY=VALUE ...]")
    plan.add_argument("sweep", metavar="SWEEP.yaml", help="the study file (e.g. sweeps/paper.yaml)")
    plan.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotlist overrides, as `study` takes them")
    plan.add_argument("--gpu", default="h100", help="a100 or h100 (80 GB SXM cards; default h100)")
    plan.add_argument("--price", metavar="USD", help="USD per GPU-hour (default: an assumed $2 for a100, $3 for "
                                                     "h100, labelled as such)")
    plan.add_argument("--mfu", metavar="F", help="model FLOPs utilization in (0, 1], e.g. measured (default: an "
                                                 "assumed 0.3, labelled as such)")
    plan.set_defaults(run_raw=run_plan)
    report = verbs.add_parser("report", help="(re)write a study's report and figures from its trial records")
    report.add_argument("study", metavar="STUDY", help="a study folder (runs/studies/<name>)")
    report.set_defaults(run_raw=run_report)
    ui = verbs.add_parser("ui", help="serve the MLflow UI for a study's store on 127.0.0.1")
    ui.add_argument("study", metavar="STUDY", help="a study folder, or a tracking URI")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(run_raw=run_ui)
    return parser


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML experiment config (defaults <- FILE <- overrides)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotlist overrides, e.g. data.vocab_size=1024"
    )


def run_data(cfg: ExperimentConfig, args: argparse.Namespace) -> int:
    result = build_data(cfg.data, config_yaml=config_to_yaml(cfg), progress=not args.no_progress)
    print(describe_data(result))
    return 0


def run_tasks(cfg: ExperimentConfig, args: argparse.Namespace) -> int:
    """One row per task (prune.tasks, or the whole suite), then a JSON line of the figures."""
    if args.pairs < 1:
        raise UserError(f"tasks: --pairs must be a positive integer, got {args.pairs}")
    tokenizer = build_data(cfg.data, progress=not args.no_progress).dataset.tokenizer()
    names = list(cfg.prune.tasks) or list(TASKS)
    checks = [check_task(TASKS[name], tokenizer, pairs=args.pairs, seed=cfg.train.seed)
              for name in tqdm(names, desc="checking tasks", disable=args.no_progress)]
    print(f"{'task':28s} {'train':>6s} {'test':>6s} {'shared':>6s} {'same last':>9s} {'direct':>6s}  candidates"
          f"   ({args.pairs} pairs per split; distinct prompts)")
    for c in checks:
        print(f"{c.name:28s} {c.distinct_train:6d} {c.distinct_test:6d} {c.overlap:6d} {c.same_last_token:9.2f} "
              f"{'yes' if c.direct_path else 'no':>6s}  {c.candidates}")
    print(json.dumps({"tasks": {c.name: {"distinct_train": c.distinct_train, "distinct_test": c.distinct_test,
                                         "overlap": c.overlap, "same_last_token": c.same_last_token,
                                         "direct_path": c.direct_path} for c in checks}}))
    return 0


def run_train(cfg: ExperimentConfig, args: argparse.Namespace) -> int:
    device = _device(args)
    signal.signal(signal.SIGTERM, _raise_interrupt)  # a terminated run is KILLED, not left RUNNING
    try:
        result = run_trial(cfg, device=device, progress=not args.no_progress)
    except NonFiniteLoss as err:
        print(f"circuitscale: training failed: {err} (run marked FAILED)", file=sys.stderr)
        return 1
    final = result.final
    if result.reused:
        print(f"already trained: {result.run_dir.resolve()} holds this config's finished trial (nothing rerun)")
    else:
        print(f"trained {cfg.train.steps} steps in {result.run_dir.resolve()}"
              + (f" (resumed from step {result.resumed_from})" if result.resumed_from else ""))
    print(f"  val_loss {final['val_loss']:.4f}  L0 {final['l0_total']:.0f}  dead neurons {final['dead_neurons']:.0f}"
          f"  residual kurtosis {final['residual_kurtosis']:.2f}")
    if "task_accuracy_mean" in final:
        tasks = sum(1 for k in final if k.endswith("/accuracy"))
        print(f"  tasks: mean accuracy {final['task_accuracy_mean']:.3f} over {tasks} tasks (chance 0.5)")
    print(f"  export: {result.export_dir.resolve()} (safetensors) and {result.export_dir.resolve() / 'paper'}")
    print(f"  MLflow: run {result.mlflow_run_id} at {result.mlflow_uri}")
    return 0


def _device(args: argparse.Namespace) -> str:
    """--device, or cuda when available."""
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def run_bridge_verb(cfg: ExperimentConfig, args: argparse.Namespace) -> int:
    """Train (or resume) the bridge; prints its folder, then a JSON line of its figures."""
    from pipeline.bridge import run_bridge, summary_line

    device = _device(args)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        folder, final = run_bridge(Path(args.run_dir), cfg, device=device, progress=not args.no_progress)
    except NonFiniteLoss as err:
        raise UserError(f"bridge: {err}; lower train.lr or check the data") from None
    print(f"bridge run in {folder.resolve()}")
    print(json.dumps(summary_line(final)))
    return 0


def run_steer(cfg: ExperimentConfig, args: argparse.Namespace) -> int:
    """Steer; writes steering.json, .png and .svg under <run>/steer/<task>/, logs them on the bridge's MLflow
    run, and ends with a JSON line."""
    from analysis.plots import save, steering_figure
    from pipeline.bridge import log_to_bridge_run
    from pipeline.steer import steer_run

    if args.nodes < 1 or not args.max_strength > 0:
        raise UserError("steer: --nodes must be >= 1 and --max-strength > 0")
    device = _device(args)
    run_dir = Path(args.run_dir)
    result, folder = steer_run(run_dir, cfg, args.task, count=args.nodes, max_strength=args.max_strength,
                               device=device)
    save(steering_figure(result), folder, "steering")
    circuit = result["circuit"]
    figures = {k: result[k] for k in ("flip_strength", "random_flip_strength")} | {
        k: circuit.get(k) for k in ("recovered", "circuit_task_loss", "dense_task_loss")}
    metrics = {f"steer/{args.task}/{k}": float(v) for k, v in figures.items() if v is not None}
    log_to_bridge_run(run_dir, cfg, metrics, folder, f"steer/{args.task}")
    print(f"steering of {args.task}: {folder.resolve()} (circuit {circuit['status']}, {circuit['nodes']} nodes; "
          f"cue nodes {result['nodes']} enter at {result['site']})")
    print(json.dumps({"task": result["task"], "flip_strength": result["flip_strength"],
                      "random_flip_strength": result["random_flip_strength"], "circuit": circuit,
                      "curve": result["curve"]}))
    return 0


def run_prune(cfg: ExperimentConfig, args: argparse.Namespace) -> int:
    device = _device(args)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    run_dir = Path(args.run_dir)
    require_trained(run_dir)  # first: a folder without a model leaves its run as it was
    dataset = build_data(cfg.data, progress=False).dataset
    search = None
    if cfg.prune.search_runs > 1:  # a Ray Tune search over the pruning settings (sweeps/prune_search.py)
        from sweeps.prune_search import search_prune  # on use: see the imports

        def search(task: str):
            return search_prune(run_dir, cfg, task, cfg.prune.search_runs, storage=run_dir / "prune_search",
                                data=dataset.location, device=args.device).best  # --device as given: the search picks

    with tracked_run(cfg.tracking, run_dir) as tracker:  # the run's own MLflow run, continued
        result = prune_run(run_dir, cfg, dataset, tracker, device=device, progress=not args.no_progress,
                           search=search)
    print(f"circuits in {result.folder.resolve()} (target loss {cfg.prune.target_loss})")
    print(f"  {'task':28s} {'unpruned':>8s} {'nodes':>6s} {'edges':>6s} {'suff':>6s} {'nec':>6s} {'random':>6s} "
          f"{'attr.edges':>10s} {'s':>5s}")
    for name, r in result.records.items():
        if r.status == "found":
            attr = "-" if r.attribution_edges is None else str(r.attribution_edges)
            print(f"  {name:28s} {r.unpruned_loss:8.3f} {len(r.nodes):6d} {r.edges:6d} {r.sufficiency_loss:6.3f} "
                  f"{r.necessity_loss:6.3f} {r.random_loss:6.3f} {attr:>10s} {r.seconds:5.0f}")
        elif r.status == "direct":
            print(f"  {name:28s} {r.unpruned_loss:8.3f}  direct path: the empty circuit reaches the target "
                  f"({r.empty_loss:.3f}) {r.seconds:4.0f}")
        else:
            print(f"  {name:28s} {r.unpruned_loss:8.3f}  target unreachable by the whole model {r.seconds:14.0f}")
    for name, message in result.failures.items():
        print(f"  {name:28s} not expressible: {message}")
    if result.edges_geomean is not None:
        print(f"  geometric mean of circuit edges: {result.edges_geomean:.1f}")
    return 0


def run_study(args: argparse.Namespace) -> int:
    from sweeps.study import run_study as study  # on use: see the imports

    signal.signal(signal.SIGTERM, _raise_interrupt)  # a terminated study is KILLED in MLflow, and resumable
    result = study(args.sweep, args.overrides, verbose=args.verbose, report=_study_report)
    headline = json.loads((result.folder / "report" / "headline.json").read_text())
    print(json.dumps({k: headline[k] for k in ("wall_s", "overhead_ratio", "sparse_dense_edge_ratio")}))
    return 0


def run_plan(args: argparse.Namespace) -> int:
    from sweeps.plan import format_plan, plan_study, summary  # on use: see the imports

    plan = plan_study(args.sweep, args.overrides, gpu=args.gpu, mfu=args.mfu, price=args.price)
    print(format_plan(plan))
    print(json.dumps(summary(plan)))
    return 0


def _study_report(folder: Path, wall_s: float) -> tuple[Path, dict]:
    """The study's report (analysis/), written when its trials are done; the study logs it to its run."""
    from analysis.report import write_report  # on use: see the imports

    report = write_report(folder, wall_s=wall_s)
    return report.folder, report.headline


def run_report(args: argparse.Namespace) -> int:
    from analysis.report import write_report  # on use: see the imports

    folder = Path(args.study)
    if not (folder / "trials").is_dir():
        raise UserError(f"report: {folder} is not a study folder (no trials/ in it)")
    report = write_report(folder)
    print(f"report: {(report.folder / 'report.html').resolve()}")
    print(f"  {report.headline['trials']} trials, {report.headline['frontier_points']} on the frontier, "
          f"sparse/dense edges at matched loss {report.headline['sparse_dense_edge_ratio']}")
    return 0


def run_ui(args: argparse.Namespace) -> int:
    uri = args.study
    if "://" not in uri:
        store = Path(args.study) / "mlflow.db"
        if not store.is_file():
            raise UserError(f"ui: {args.study} holds no MLflow store (mlflow.db); pass a study folder or a URI")
        uri = f"sqlite:///{store.resolve()}"
    print(f"MLflow UI for {uri} on http://127.0.0.1:{args.port} (Ctrl-C stops it)")
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
               "--port", str(args.port)]
    return subprocess.call(command)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def describe_data(result: DataResult) -> str:
    m = result.dataset.manifest
    files = m["files"]
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(files["skipped"].items())) or "none"
    lines = [
        f"{'reused cached' if result.reused else 'built'} dataset in {result.seconds:.1f}s: {result.dataset.location}",
        f"  sources: {', '.join(m['sources'])}",
        f"  files read: {files['read']}  skipped: {skipped}  documents: {m['documents']}",
    ]
    for name, split in m["splits"].items():
        per_byte = split["bytes"] / max(split["tokens"], 1)
        lines.append(
            f"  {name:5s}: {split['documents']:6d} docs  {split['bytes'] / 1e6:8.2f} MB  "
            f"{split['tokens']:>11,d} tokens  ({per_byte:.2f} bytes/token)"
        )
    tok = m["tokenizer"]
    lines.append(f"  tokenizer: vocab {tok['vocab_size']}, end-of-text id {tok['eot_id']}, {m['dtype']} shards")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
