"""The study spec: a sweep YAML's schema, and its expansion into validated trial configs.

A study names a base experiment config (a YAML path relative to the study file), dotlist overrides
applied to every trial, a grid of dotted keys whose cross product gives the points, and extra points
(dense baselines, say). Each point is trained with `seeds` seeds (train.seed + 0, 1, ...; a point may
set its own `seeds`), one trial per (point, seed). Every trial's config is resolved and validated
before any compute, so a bad grid value fails at once with the trial and key it belongs to.

`lr_search` (optional) chooses each point's learning rate before the trials (sweeps/lr_search.py):
successive halving over `lrs` at a fraction of the training budget.
"""

import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.config import ExperimentConfig, check_overrides, config_to_yaml, read_yaml, resolve_config
from pipeline.errors import ConfigError

_NAME = re.compile(r"[\w.-]+")


@dataclass(kw_only=True, frozen=True)
class LrSearchConfig:
    """Successive halving over a log grid of learning rates, per point (sweeps/lr_search.py)."""

    lrs: list[float] = field(default_factory=list)  # empty: no search, every trial trains at train.lr
    budget: float = 0.25  # the first rung trains every LR for this fraction of train.steps
    eta: int = 2  # each rung keeps the best 1/eta of the LRs (by validation loss) and trains them eta x longer


@dataclass(kw_only=True, frozen=True)
class StudyConfig:
    name: str
    base: str | None = None  # experiment YAML, relative to the study file
    overrides: list[str] = field(default_factory=list)  # dotlist applied to every trial
    grid: dict[str, list[Any]] = field(default_factory=dict)  # dotted key -> values (cross product)
    points: list[dict[str, Any]] = field(default_factory=list)  # extra points: dotted key -> value (and `seeds`)
    seeds: int = 1  # trials per point: train.seed + 0 .. seeds - 1
    lr_search: LrSearchConfig = field(default_factory=LrSearchConfig)
    max_concurrent_trials: int = 1
    workers: int = 1  # Ray Train workers per trial (DeepSpeed data parallel when > 1)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    worker_resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per worker
    max_failures: int = 2  # worker failures a trial survives (it resumes from its last checkpoint)
    prune: bool = True  # prune the tasks (prune.* overrides set the budget) after training
    tracking_uri: str | None = None  # None: sqlite:///<study folder>/mlflow.db
    # the study folder is <storage_path>/<name>; a URI (s3://bucket/studies, gs://, file://, any filesystem
    # pyarrow opens) is mirrored from the local working folder <local_dir>/<name> (infra/storage.py)
    storage_path: str = "runs/studies"
    local_dir: str = "runs/studies"


@dataclass(frozen=True)
class TrialSpec:
    name: str
    point: dict[str, Any]  # the point's dotted keys (without the seed)
    config: ExperimentConfig
    point_name: str = ""  # the trial's name without its seed: what the seeds of one point share


def load_study(path: str | Path, overrides: list[str] | None = None) -> tuple[StudyConfig, list[TrialSpec]]:
    """Read a sweep YAML and expand it; `overrides` (dotlist) apply to every trial, except those
    starting with `study.`, which set the study's own keys (`study.storage_path=/tmp/s`)."""
    path = Path(path)
    bad = [x for x in overrides or [] if "=" not in x]
    if bad:  # `circuitscale study` and `plan` take the sweep, then only KEY=VALUE
        raise ConfigError(f"{path}: overrides must be KEY=VALUE, got {bad}")
    if not path.is_file():
        raise ConfigError(f"study file {path} does not exist" if not path.exists() else f"{path} is not a file")
    check_overrides(overrides or [])
    raw = read_yaml(path, "study file") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"study file {path} must hold a mapping (name, base, grid, points, ...), "
                          f"got {type(raw).__name__}")
    points = raw.get("points", [])
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
        raise ConfigError(f"{path}: points: must be a list of mappings (dotted key: value), got {points!r:.60}")
    try:
        own = [o.removeprefix("study.") for o in overrides or [] if o.startswith("study.")]
        study = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(StudyConfig), OmegaConf.create(raw),
                                                    OmegaConf.from_dotlist(own)))
    except yaml.YAMLError:  # a tag or an undefined alias in a `study.` override's value
        raise ConfigError(f"{path}: a study.* override's value is not plain YAML") from None
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", "")
        raise ConfigError(f"{path}: {key}: {str(err).splitlines()[0]}") from None
    _check_study(study, path)
    check_overrides(study.overrides, f"{path}: override")
    base = (path.parent / study.base) if study.base else None
    trial_overrides = [o for o in overrides or [] if not o.startswith("study.")]
    trials = expand_trials(study, base, list(study.overrides) + trial_overrides)
    _check_distinct(trials, path)
    return study, trials


def _check_distinct(trials: list[TrialSpec], path: Path) -> None:
    """Two trials with one resolved config would train the same model twice (and share a run folder)."""
    seen: dict[str, str] = {}
    for trial in trials:
        key = config_to_yaml(trial.config)
        if key in seen:
            raise ConfigError(f"{path}: trials {seen[key]} and {trial.name} have the same config (a duplicate "
                              "point or grid value); remove one (a point's `seeds: N` trains it with N seeds)")
        seen[key] = trial.name


def expand_trials(study: StudyConfig, base: Path | None, overrides: list[str]) -> list[TrialSpec]:
    keys = list(study.grid)
    points = [dict(zip(keys, values, strict=True)) for values in itertools.product(*study.grid.values())
              ] if keys else []  # (the product of no lists is one empty point: not a trial)
    points += [dict(p) for p in study.points]
    trials, names = [], set()
    for index, raw in enumerate(points):
        point = {k: v for k, v in raw.items() if k != "seeds"}
        seeds = raw.get("seeds", study.seeds)
        if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
            raise ConfigError(f"study {study.name!r}, point {trial_name(index, point)}: seeds: must be a positive "
                              f"integer, got {seeds!r}")
        named, name = study_seeds(study), trial_name(index, point)
        try:
            first = resolve_config(base, overrides, point=point)
            # train.seed (the base's, an override's or the point's) + 0, 1, ...: one resolution per extra seed
            configs = [first] + [resolve_config(base, overrides, point=point | {"train.seed": first.train.seed + k})
                                 for k in range(1, seeds)]
        except ConfigError as err:
            raise ConfigError(f"study {study.name!r}, trial {name}: {err}") from None
        for config in configs:
            seeded = trial_name(index, point, config.train.seed) if named else name
            assert seeded not in names
            names.add(seeded)
            trials.append(TrialSpec(name=seeded, point=point, config=config, point_name=name))
    return trials


def study_seeds(study: StudyConfig) -> bool:
    """Whether trial names carry their seed: when any point trains more than one."""
    return study.seeds > 1 or any(p.get("seeds", 1) > 1 for p in study.points if isinstance(p.get("seeds", 1), int))


def trial_name(index: int, point: Mapping[str, Any], seed: int | None = None) -> str:
    """`003-d_model=128-density=0.0625` (`-seed=1` appended when the study has seeds): sortable, readable,
    unique by its index and seed."""
    parts = [f"{key.rsplit('.', 1)[-1]}={value}" for key, value in point.items()]
    return "-".join([f"{index:03d}", *parts, *([f"seed={seed}"] if seed is not None else [])])


def _check_study(study: StudyConfig, path: Path) -> None:
    if not study.name.strip():
        raise ConfigError(f"{path}: name: must not be empty")
    if not _NAME.fullmatch(study.name) or study.name in (".", ".."):
        raise ConfigError(f"{path}: name: {study.name!r} must be a plain folder name (letters, digits, '.', '-', "
                          "'_'): the study folder is <storage_path>/<name>")
    for key, values in study.grid.items():
        if not values:
            raise ConfigError(f"{path}: grid.{key}: must list at least one value")
    if not study.grid and not study.points:
        raise ConfigError(f"{path}: a study needs a grid or points")
    if study.max_concurrent_trials < 1:
        raise ConfigError(f"{path}: max_concurrent_trials: must be a positive integer")
    if study.workers < 1 or study.max_failures < 0:
        raise ConfigError(f"{path}: workers must be >= 1 and max_failures >= 0")
    if study.tracking_uri is not None and "://" not in study.tracking_uri:
        raise ConfigError(f"{path}: tracking_uri: must be a URI such as http://127.0.0.1:5000, "
                          f"got {study.tracking_uri!r}")
    if study.seeds < 1:
        raise ConfigError(f"{path}: seeds: must be a positive integer, got {study.seeds}")
    search = study.lr_search
    if any(lr <= 0 for lr in search.lrs) or len(set(search.lrs)) != len(search.lrs):
        raise ConfigError(f"{path}: lr_search.lrs: must be distinct positive learning rates, got {search.lrs}")
    if not 0.0 < search.budget <= 1.0 or search.eta < 2:
        raise ConfigError(f"{path}: lr_search: budget must lie in (0, 1] and eta be >= 2, got "
                          f"{search.budget} and {search.eta}")
    if study.cpus_per_worker <= 0 or study.gpus_per_worker < 0:
        raise ConfigError(f"{path}: cpus_per_worker must be > 0 and gpus_per_worker >= 0")
