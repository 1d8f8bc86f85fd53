"""The bridge run (METHOD.md 7, `circuitscale bridge DENSE_RUN`): a weight-sparse model trained beside a
finished dense run's frozen model, coupled through an encoder and a decoder at every residual site
(model/bridge.py), on the trial's stages: the dense run's dataset, the same engine (1..N workers,
DeepSpeed when several), checkpoints with exact resume, an MLflow run, and an export.

  run_bridge(dense_run, cfg)        # circuitscale bridge
    build_data(cfg.data)            # the dense run's data config unless overridden: its tokenizer
    bridge_rank(...) | spawn(bridge_rank, workers)
      load_dense -> build_bridge -> train (loss: model/bridge.py `bridge_loss`) -> [rank 0] export, figures

Figures (logged at every evaluation and at the end, on the first `train.eval_batches` validation
batches): per site the NMSE both ways, the KL of each hybrid and the dense model's loss with that site
replaced through the bridge (sparse prefix, decoder, dense suffix); their means; the sparse model's own
loss; the dense loss; the bridged loss (the sparse model read out through the final site's decoder and
the dense unembedding: every dense site replaced); and, at the end, the correlation of the per-token
losses of the dense and the bridged model (the paper reports about 0.93).

The export (`<run>/export/`): the sparse model as any run exports it (model.safetensors, config.yaml,
tokenizer.json, the paper's layout) plus `bridge.safetensors` (encoders.{i}.weight/bias,
decoders.{i}.weight/bias) and `bridge.json` (sites, widths, AbsTopK k, the dense run): `load_bridge`
reads it back.
"""

import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from infra.distributed import init_process_group, spawn
from infra.tracking import NullTracker, tracked_run
from model.bridge import (
    Bridge,
    BridgedPair,
    TermWeights,
    bridge_loss,
    kl_from,
    nmse,
    residuals,
    run_from,
    site_names,
)
from model.gpt import GPT
from model.sparsity import sparse_tensors
from pipeline.circuits import load_model, require_trained
from pipeline.config import (
    CONFIG_FILENAME,
    ExperimentConfig,
    config_to_yaml,
    engine_kind,
    resolve_config,
    save_config,
    token_loader,
)
from pipeline.data import Dataset, build_data
from pipeline.errors import UserError
from pipeline.export import export_model
from pipeline.train import TrainingSetup, bigram_log_probs, make_engine, train
from pipeline.trial import config_digest, finished, flat_params, silent, train_sample

SUMMARY = "final_metrics.json"
BRIDGE_FILE = "bridge.json"


def bridge_dir_for(cfg: ExperimentConfig) -> Path:
    """`bridge.run_dir`, or runs/bridge/<hash of the resolved config> so a rerun finds its checkpoints."""
    if cfg.bridge.run_dir:
        return Path(cfg.bridge.run_dir).expanduser()
    return Path("runs/bridge") / config_digest(dataclasses.replace(cfg, bridge=dataclasses.replace(cfg.bridge,
                                                                                                    run_dir=None)))


def dense_config(dense_run: Path) -> ExperimentConfig:
    """The dense run's resolved config; one-line errors for a folder that is not a finished dense run."""
    dense_run = Path(dense_run)
    if not (dense_run / CONFIG_FILENAME).is_file():
        raise UserError(f"{dense_run} is not a run folder (no {CONFIG_FILENAME}); give a run of `circuitscale train`")
    cfg = resolve_config(dense_run / CONFIG_FILENAME)
    if cfg.sparsity.density < 1.0:
        raise UserError(f"{dense_run} is a sparse run (sparsity.density={cfg.sparsity.density:g}); a bridge "
                        "explains a dense model: give a run trained with sparsity.density=1")
    require_trained(dense_run)
    return cfg


def load_dense(dense_run: Path, vocab_size: int, device: str) -> GPT:
    return load_model(Path(dense_run), dense_config(dense_run), vocab_size, device)


def encoder_k(cfg: ExperimentConfig) -> int:
    return max(1, int(cfg.bridge.afrac * cfg.model.d_model))


def build_bridge(cfg: ExperimentConfig, dense: GPT, dataset: Dataset, device: str) -> TrainingSetup:
    """The sparse model (seeded), the bridge, the engine over both (the dense model stays frozen outside it)
    and this rank's loaders; the loss is model/bridge.py's with the config's term weights."""
    torch.manual_seed(cfg.train.seed)
    pair = new_pair(cfg, dense)
    sparse = pair.sparse
    if cfg.model.bigram_table == "fixed":
        sparse.bigram_table.copy_(bigram_log_probs(train_sample(dataset), sparse.vocab_size))
    tensors = sparse_tensors(sparse, cfg.sparsity)
    t = dataclasses.replace(cfg.train, steps=cfg.bridge.steps)
    engine = make_engine(pair, tensors, t, cfg.sparsity, kind=engine_kind(cfg), deepspeed=cfg.deepspeed)
    loader = token_loader(cfg, dataset, "train", batch_size=t.batch_size * t.grad_accum, rank=engine.rank,
                          world_size=engine.world_size)
    val = token_loader(cfg, dataset, "val", shuffle=False)
    weights = TermWeights(**{f.name: getattr(cfg.bridge, f.name) for f in dataclasses.fields(TermWeights)})
    batches = [val.batch(i).to(device) for i in range(cfg.train.eval_batches)]
    return TrainingSetup(model=pair, tensors=tensors, engine=engine, loader=loader, val=val,
                         loss_fn=functools.partial(bridge_loss, weights=weights), lm=sparse,
                         evaluate=lambda: bridge_figures(pair, batches))


def new_pair(cfg: ExperimentConfig, dense: GPT, sparse: GPT | None = None) -> BridgedPair:
    """The config's sparse model (or `sparse`) and a fresh bridge to `dense`, on `dense`'s device."""
    device = next(dense.parameters()).device
    sparse = sparse if sparse is not None else GPT(cfg.model, dense.vocab_size, device=device)
    bridge = Bridge(dense.cfg.d_model, cfg.model.d_model, len(site_names(cfg.model.num_layers)), encoder_k(cfg))
    return BridgedPair(sparse, bridge.to(device), dense)


@torch.no_grad()
def bridge_figures(pair: BridgedPair, batches: list[torch.Tensor], *, correlation: bool = False
                   ) -> dict[str, float]:
    """The bridge's figures on window batches (B, T + 1), averaged over them (see the module docstring)."""
    was_training = pair.training
    pair.eval()
    names = site_names(pair.sparse.cfg.num_layers)
    sums: dict[str, float] = {}
    dense_tokens, bridged_tokens = [], []

    def add(key: str, value: torch.Tensor) -> None:
        sums[key] = sums.get(key, 0.0) + float(value)

    def ce(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction=reduction)

    for batch in batches:
        idx, targets = batch[:, :-1], batch[:, 1:]
        dense_res, sparse_res = residuals(pair.dense, idx), residuals(pair.sparse, idx)
        dense_logits = pair.dense.unembed(dense_res[-1], idx)
        add("dense_loss", ce(dense_logits, targets))
        add("sparse_loss", ce(pair.sparse.unembed(sparse_res[-1], idx), targets))
        for i, name in enumerate(names):
            encoded, decoded = pair.bridge.encode(i, dense_res[i]), pair.bridge.decode(i, sparse_res[i])
            add(f"nmse_encode/{name}", nmse(encoded, sparse_res[i]))
            add(f"nmse_decode/{name}", nmse(decoded, dense_res[i]))
            add(f"kl_dense_prefix/{name}", kl_from(dense_logits, run_from(pair.sparse, i, encoded, idx)))
            substituted = run_from(pair.dense, i, decoded, idx)
            add(f"kl_sparse_prefix/{name}", kl_from(dense_logits, substituted))
            add(f"substituted_loss/{name}", ce(substituted, targets))
            if name == "final":  # every dense site replaced: the sparse model read out through the bridge
                add("bridged_loss", ce(substituted, targets))
                if correlation:
                    dense_tokens.append(ce(dense_logits, targets, "none"))
                    bridged_tokens.append(ce(substituted, targets, "none"))
    pair.train(was_training)
    out = {key: value / len(batches) for key, value in sums.items()}
    for term in ("nmse_encode", "nmse_decode", "kl_dense_prefix", "kl_sparse_prefix"):
        out[f"{term}_mean" if term.startswith("nmse") else term] = sum(out[f"{term}/{n}"] for n in names) / len(names)
    if correlation:
        stacked = torch.stack([torch.cat(dense_tokens), torch.cat(bridged_tokens)])
        out["loss_correlation"] = float(torch.corrcoef(stacked)[0, 1])
    return out


def run_bridge(dense_run: Path, cfg: ExperimentConfig, *, device: str = "cpu", progress: bool = True,
               log: Callable[[str], None] = print) -> tuple[Path, dict[str, float]]:
    """Train (or resume, or reuse when finished) the bridge of `dense_run`; returns its folder and figures."""
    dense = dense_config(dense_run)  # first: a bad input leaves nothing behind
    if cfg.model.num_layers != dense.model.num_layers:
        raise UserError(f"model.num_layers={cfg.model.num_layers}: a bridge needs the dense model's layer count "
                        f"({dense.model.num_layers})")
    run_dir, dense_run = bridge_dir_for(cfg), Path(dense_run).resolve()
    if finished(run_dir, cfg, SUMMARY):
        return run_dir, json.loads((run_dir / SUMMARY).read_text())["final"]
    dataset = build_data(cfg.data, progress=progress).dataset
    rank = functools.partial(bridge_rank, dense_run, cfg, dataset.location, device=device, progress=progress)
    if cfg.trial.workers == 1:
        rank(log=log)
    else:
        with tracked_run(_tracking(cfg, dense_run), run_dir, params=flat_params(cfg)):
            spawn(functools.partial(rank, log=print if log is print else silent), cfg.trial.workers)
    return run_dir, json.loads((run_dir / SUMMARY).read_text())["final"]


def bridge_rank(dense_run: Path, cfg: ExperimentConfig, data: str | Path, *, device: str = "cpu",
                progress: bool = False, log: Callable[[str], None] = print) -> None:
    """One rank of the bridge run: every rank trains; rank 0 owns the MLflow run, exports and writes the
    figures (final_metrics.json last)."""
    run_dir = bridge_dir_for(cfg)
    tick = time.perf_counter()
    rank = init_process_group(cfg.deepspeed.backend)[0] if engine_kind(cfg) == "deepspeed" else 0
    lead = rank == 0
    say = log if lead else silent
    run = tracked_run(_tracking(cfg, dense_run), run_dir, params=flat_params(cfg)) if lead else \
        nullcontext(NullTracker())
    with run as tracker:
        if lead:
            say(f"bridge folder {run_dir.resolve()}; MLflow run {tracker.run_id} at {tracker.uri}")
            (run_dir / SUMMARY).unlink(missing_ok=True)
            config_path = save_config(cfg, run_dir)
        dataset = Dataset.open(data)
        dense = load_dense(dense_run, dataset.manifest["tokenizer"]["vocab_size"], device)
        setup = build_bridge(cfg, dense, dataset, device)
        t = dataclasses.replace(cfg.train, steps=cfg.bridge.steps)
        result = train(setup, t, cfg.sparsity, run_dir, tracker, checkpoint_meta={"config": config_to_yaml(cfg)},
                       device=device, progress=progress and lead, log=say)
        if not lead:
            return
        pair = new_pair(cfg, dense)
        pair.load_state_dict({k[len("model/"):]: v for k, v in result.state.items() if k.startswith("model/")})
        pair.eval()
        folder = export_bridge(pair, cfg, dataset, dense_run, run_dir / "export")
        batches = [setup.val.batch(i).to(device) for i in range(cfg.train.eval_batches)]
        final = result.final | bridge_figures(pair, batches, correlation=True)
        final["train_seconds"] = time.perf_counter() - tick
        tracker.log_metrics(final, t.steps)
        for artifact in (config_path, folder / BRIDGE_FILE):
            tracker.log_artifact(artifact)
        staging = run_dir / f".{SUMMARY}"
        staging.write_text(json.dumps({"final": final, "resumed_from": result.resumed_from}, indent=1,
                                      sort_keys=True))
        tracker.log_artifact(staging)
    staging.replace(run_dir / SUMMARY)  # written last, after the run is FINISHED: the run is finished


def log_to_bridge_run(run_dir: Path, cfg: ExperimentConfig, metrics: dict[str, float], folder: Path, under: str
                      ) -> None:
    """Add figures and a folder's files to a finished bridge run's MLflow run (resumed, then FINISHED again)."""
    dense_run = Path(json.loads((Path(run_dir) / "export" / BRIDGE_FILE).read_text())["dense_run"])
    with tracked_run(_tracking(cfg, dense_run), Path(run_dir)) as tracker:
        tracker.log_metrics(metrics, cfg.bridge.steps)
        tracker.log_artifacts(folder, under)


def _tracking(cfg: ExperimentConfig, dense_run: Path):
    """The bridge's own MLflow run (the dense run's config may carry a study's parent run and trial tags)."""
    return dataclasses.replace(cfg.tracking, parent_run_id=None, tags={"kind": "bridge", "dense_run": str(dense_run)})


def export_bridge(pair: BridgedPair, cfg: ExperimentConfig, dataset: Dataset, dense_run: Path, folder: Path) -> Path:
    """The sparse model's export (pipeline/export.py) plus bridge.safetensors and bridge.json."""
    export_model(pair.sparse, config_to_yaml(cfg), dataset, folder)
    save_file({k: v.detach().contiguous().cpu() for k, v in pair.bridge.state_dict().items()},
              str(folder / "bridge.safetensors"))
    meta = {"dense_run": str(dense_run), "sites": site_names(cfg.model.num_layers), "d_dense": pair.dense.cfg.d_model,
            "d_sparse": cfg.model.d_model, "encoder_k": encoder_k(cfg)}
    (folder / BRIDGE_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return folder


def load_bridge(run_dir: Path, device: str = "cpu") -> BridgedPair:
    """A finished bridge run's pair (eval mode), from its export and its dense run's."""
    folder = Path(run_dir) / "export"
    if not (folder / BRIDGE_FILE).is_file():
        raise UserError(f"{run_dir} holds no trained bridge ({folder / BRIDGE_FILE} is missing); "
                        "run `circuitscale bridge` first")
    meta = json.loads((folder / BRIDGE_FILE).read_text())
    cfg = resolve_config(folder / "config.yaml")
    with safe_open(str(folder / "model.safetensors"), "pt") as weights:  # the header only
        vocab_size = weights.get_slice("lm_head.weight").get_shape()[0]
    pair = new_pair(cfg, load_dense(Path(meta["dense_run"]), vocab_size, device),
                    sparse=load_model(Path(run_dir), cfg, vocab_size, device))
    pair.bridge.load_state_dict(load_file(str(folder / "bridge.safetensors"), device=device))
    return pair.eval()


def summary_line(final: dict[str, float]) -> dict[str, float | None]:
    """The figures `circuitscale bridge` ends with (its last line, JSON)."""
    keys = ("dense_loss", "bridged_loss", "sparse_loss", "nmse_encode_mean", "nmse_decode_mean", "kl_dense_prefix",
            "kl_sparse_prefix", "loss_correlation")
    return {k: (float(final[k]) if k in final and math.isfinite(final[k]) else None) for k in keys}
