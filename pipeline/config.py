"""The experiment config: stage configs composed into one, resolved and validated before compute.

Resolution order: dataclass defaults <- `--config FILE.yaml` <- dotlist overrides
(`model.d_model=128 sparsity.density=0.0625`). OmegaConf structured configs check keys and types
(Literal fields included, OmegaConf >= 2.4); the `check_*` functions next to each stage config check
ranges. Every failure becomes one `ConfigError` line that names the key.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from infra.engine import DeepSpeedConfig
from infra.engine_base import check_deepspeed_config
from infra.tracking import TrackingConfig, check_tracking_config
from model.config import (
    ModelConfig,
    SparsityConfig,
    check_model_config,
    check_sparsity_config,
    check_sparsity_fits,
)
from pipeline.data import DataConfig, Dataset, check_data_config
from pipeline.errors import ConfigError
from pipeline.loader import TokenLoader
from pipeline.prune import PruneConfig, check_prune_config

CONFIG_FILENAME = "config.yaml"


@dataclass(kw_only=True, frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32  # sequences per optimizer step per worker
    grad_accum: int = 1
    lr: float = 1e-2  # peak LR at the final L0; scaled by the sharkfin factor (METHOD.md 3)
    warmup_frac: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 0.1  # METHOD.md 3: Adam eps 0.1 for the sparse weights
    weight_decay: float = 0.1
    # rescale: always divide the global gradient by its RMS (released code); clip: only when RMS > 1
    # (the paper's wording); none: neither. (Not 'off': YAML reads that as false.)
    grad_rms: Literal["rescale", "clip", "none"] = "rescale"
    # METHOD.md 8: with eps 0.1 and RMS normalization the dense bigram table barely trains; its own
    # optimizer group with a small eps fixed that.
    bigram_eps: float = 1e-8
    seed: int = 0
    eval_every: int = 100
    eval_batches: int = 10  # validation batches per evaluation (a fixed, unshuffled set)
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    run_dir: str | None = None  # None: runs/train/<hash of the resolved config>


@dataclass(kw_only=True, frozen=True)
class TrialConfig:
    workers: int = 1  # data-parallel training processes per trial
    engine: Literal["auto", "torch", "deepspeed"] = "auto"  # auto: DeepSpeed when workers > 1


@dataclass(kw_only=True, frozen=True)
class BridgeConfig:
    """`circuitscale bridge` (pipeline/bridge.py, METHOD.md 7): the sparse model is `model.*` / `sparsity.*`
    (defaults: the dense run's own), trained with `train.*` for `steps`; the loss weights its terms."""
    steps: int = 600
    run_dir: str | None = None  # None: runs/bridge/<hash of the resolved config>
    afrac: float = 0.25  # each encoder's AbsTopK keeps int(afrac x the sparse width) channels
    ce: float = 1.0  # the sparse model's next-token cross-entropy
    nmse_encode: float = 1.0  # mean over sites of NMSE(encode(dense), sparse)
    nmse_decode: float = 1.0  # mean over sites of NMSE(decode(sparse), dense)
    kl_dense_prefix: float = 1.0  # KL(dense || dense prefix, then sparse suffix), at a site drawn per step
    kl_sparse_prefix: float = 1.0  # KL(dense || sparse prefix, then dense suffix), same site


def check_bridge_config(cfg: BridgeConfig) -> None:
    if cfg.steps < 1:
        raise ValueError(f"bridge.steps: must be a positive integer, got {cfg.steps}")
    if not 0.0 < cfg.afrac <= 1.0:
        raise ValueError(f"bridge.afrac: must lie in (0, 1], got {cfg.afrac}")
    for key in ("ce", "nmse_encode", "nmse_decode", "kl_dense_prefix", "kl_sparse_prefix"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"bridge.{key}: must be >= 0, got {getattr(cfg, key)}")


def check_train_config(cfg: TrainConfig) -> None:
    for key in ("steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "checkpoint_every",
                "keep_checkpoints"):
        value = getattr(cfg, key)
        if value < 1:
            raise ValueError(f"train.{key}: must be a positive integer, got {value}")
    for key in ("lr", "eps", "bigram_eps"):
        value = getattr(cfg, key)
        if value <= 0:
            raise ValueError(f"train.{key}: must be > 0, got {value}")
    for key in ("beta1", "beta2"):
        value = getattr(cfg, key)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"train.{key}: must lie in [0, 1), got {value}")
    if not 0.0 <= cfg.warmup_frac <= 1.0:
        raise ValueError(f"train.warmup_frac: must lie in [0, 1], got {cfg.warmup_frac}")
    if cfg.weight_decay < 0:
        raise ValueError(f"train.weight_decay: must be >= 0, got {cfg.weight_decay}")
    if cfg.seed < 0:
        raise ValueError(f"train.seed: must be >= 0, got {cfg.seed}")


def check_trial_config(cfg: TrialConfig) -> None:
    if cfg.workers < 1:
        raise ValueError(f"trial.workers: must be a positive integer, got {cfg.workers}")
    if cfg.engine == "torch" and cfg.workers > 1:
        raise ValueError(f"trial.engine: torch trains in one process; {cfg.workers} workers need deepspeed (or auto)")


@dataclass(kw_only=True, frozen=True)
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    trial: TrialConfig = field(default_factory=TrialConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    bridge: BridgeConfig = field(default_factory=BridgeConfig)


def resolve_config(
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    point: Mapping[str, Any] | None = None,
) -> ExperimentConfig:
    """Defaults <- YAML file <- dotlist overrides <- `point` (dotted key -> value, a study's grid point),
    validated; raises ConfigError on any problem."""
    layers = [OmegaConf.structured(ExperimentConfig)]
    if config_file is not None:
        layers.append(_load_yaml_layer(Path(config_file)))
    layers.append(_dotlist_layer(overrides or []))
    if point:
        layers.append(_point_layer(point))
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(*layers))
    except OmegaConfBaseException as err:
        raise ConfigError(_describe(err)) from None
    validate_config(cfg)
    return cfg


def validate_config(cfg: ExperimentConfig) -> None:
    """Range and cross-field rules of every stage; types were checked by the schema."""
    checks = [
        (check_data_config, cfg.data),
        (check_model_config, cfg.model),
        (check_sparsity_config, cfg.sparsity),
        (check_train_config, cfg.train),
        (check_trial_config, cfg.trial),
        (check_prune_config, cfg.prune),
        (check_tracking_config, cfg.tracking),
        (check_deepspeed_config, cfg.deepspeed),
        (check_bridge_config, cfg.bridge),
    ]
    try:
        for item in fields(cfg):
            _check_numbers(getattr(cfg, item.name), item.name)
        for check, section in checks:
            check(section)
        check_sparsity_fits(cfg.model, cfg.sparsity)
        stage = cfg.deepspeed.zero_stage
        if cfg.sparsity.compute == "sparse" and engine_kind(cfg) == "deepspeed" and stage not in (1, 2):
            raise ValueError(f"sparsity.compute: sparse runs under DeepSpeed ZeRO stage 1 or 2, got "
                             f"deepspeed.zero_stage={stage} (stage 0 would average the sparse matrices' "
                             "gradients twice, stage 3 shards their weights)")
    except ValueError as err:
        raise ConfigError(str(err)) from None


def engine_kind(cfg: ExperimentConfig) -> str:
    """trial.engine, with auto = DeepSpeed for several workers, plain torch for one."""
    if cfg.trial.engine != "auto":
        return cfg.trial.engine
    return "deepspeed" if cfg.trial.workers > 1 else "torch"


def config_to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: ExperimentConfig, folder: str | Path) -> Path:
    """Write the resolved config beside a stage's outputs; `resolve_config(path)` reads it back."""
    path = Path(folder) / CONFIG_FILENAME
    path.write_text(config_to_yaml(cfg), encoding="utf-8")
    return path


def token_loader(cfg: ExperimentConfig, dataset: Dataset, split: str, *, batch_size: int | None = None,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1) -> TokenLoader:
    """A loader over `split` of `dataset` with the experiment's batch size (unless given), context length
    and seed: the one place a stage turns its config into token batches."""
    return TokenLoader(dataset, split=split, batch_size=batch_size or cfg.train.batch_size,
                       context_length=cfg.model.context_length, seed=cfg.train.seed, shuffle=shuffle, rank=rank,
                       world_size=world_size)


def read_yaml(path: Path, what: str):
    """The YAML document in `path` (None when empty), or a ConfigError naming `what`, the file and the line."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not UTF-8 text") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigError(f"{what} {path} is not valid YAML{line}") from None


def _load_yaml_layer(path: Path):
    if not path.exists():
        raise ConfigError(f"--config: file {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"--config: {path} is not a file")
    data = read_yaml(path, "--config:")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of config sections, got {type(data).__name__}")
    return OmegaConf.create(data)


def check_overrides(overrides: list[str], where: str = "override") -> None:
    """Each override looks like `key=value` and sets its key once: a list that sets one key twice is a
    mistake (which value was meant?), not a layering."""
    seen = {}
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{where} {item!r}: must look like section.key=value")
        if key.strip() in seen:
            raise ConfigError(f"{where}s {seen[key.strip()]!r} and {item!r} set {key.strip()} twice; keep one")
        seen[key.strip()] = item


def _dotlist_layer(overrides: list[str]):
    layer = OmegaConf.create()
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: must look like section.key=value")
        try:  # one at a time, so an error names its override; later ones win, as in from_dotlist
            layer = OmegaConf.merge(layer, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise ConfigError(_describe(err)) from None
        except yaml.YAMLError as err:  # a tag (!!python/...), an undefined alias (*a): YAML the value rejects
            raise ConfigError(f"override {item!r}: the value is not plain YAML ({_yaml_problem(err)})") from None
    return layer


def _yaml_problem(err: yaml.YAMLError) -> str:
    return str(getattr(err, "problem", None) or str(err).splitlines()[0])


def _check_numbers(section: Any, prefix: str) -> None:
    """No NaN or infinite float and no integer beyond int64 anywhere in the config (nan > 0 is False, so a
    range check alone lets NaN through)."""
    for item in fields(section):
        value, key = getattr(section, item.name), f"{prefix}.{item.name}"
        if is_dataclass(value):
            _check_numbers(value, key)
            continue
        for x in value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]:
            if isinstance(x, float) and not math.isfinite(x):
                raise ValueError(f"{key}: must be a finite number, got {x}")
            if isinstance(x, int) and not -(2**63) <= x < 2**63:
                raise ValueError(f"{key}: {x} is out of range (at most 2**63 - 1)")


def _point_layer(point: Mapping[str, Any]):
    layer = OmegaConf.create()
    for key, value in point.items():
        OmegaConf.update(layer, key, value, force_add=True)
    return layer


def _describe(err: OmegaConfBaseException) -> str:
    """OmegaConf's multi-line message -> '<full key>: <first line>'."""
    message = str(err).splitlines()[0] if str(err) else type(err).__name__
    key = getattr(err, "full_key", None)
    return f"{key}: {message}" if key else message
