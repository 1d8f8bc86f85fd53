"""Checkpoint IO: atomic, checksummed folders of safetensors + JSON; never unpickles.

A checkpoint is `step-XXXXXXXX/` holding `state.safetensors` (every tensor: weights, optimizer
moments, masks, RNG state) and `meta.json` (step, counters, the resolved config, and the sha256 of the
tensor file). It is written into a temporary folder that is renamed into place, so a crash mid-write
leaves the previous checkpoint as the latest. Reading verifies the checksum and falls back to an
older checkpoint, naming the bad one.

Fault injection: with CIRCUITSCALE_FAILPOINT_CHECKPOINT_PAUSE_S set (benchmarks/chaos.py sets it), a save
pauses that long between writing the tensors and publishing the folder, so that a harness can kill the
process mid-write (a failpoint, as databases test themselves); unset, it costs nothing.
"""

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATE_FILE, META_FILE, PREFIX = "state.safetensors", "meta.json", "step-"
PAUSE_FAILPOINT = "CIRCUITSCALE_FAILPOINT_CHECKPOINT_PAUSE_S"


class CheckpointError(Exception):
    """A checkpoint folder that cannot be trusted (missing file, bad checksum, unreadable)."""


@dataclass(frozen=True)
class Checkpoint:
    folder: Path
    step: int
    tensors: dict[str, torch.Tensor]
    meta: dict


def save_checkpoint(root: Path, step: int, tensors: dict[str, torch.Tensor], meta: dict, keep: int = 2) -> Path:
    """Write `step-XXXXXXXX/` atomically under `root`; keep the newest `keep` checkpoints."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    staging = root / f".tmp-{PREFIX}{step:08d}-{os.getpid()}"
    for stale in root.glob(f".tmp-{PREFIX}*"):  # one writer per run folder: these are a killed writer's
        shutil.rmtree(stale, ignore_errors=True)
    staging.mkdir()
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(staging / STATE_FILE))
        if os.environ.get(PAUSE_FAILPOINT):
            time.sleep(float(os.environ[PAUSE_FAILPOINT]))
        record = dict(meta, step=step, sha256=file_sha256(staging / STATE_FILE))
        _write_synced(staging / META_FILE, json.dumps(record, indent=1, sort_keys=True))
        shutil.rmtree(final, ignore_errors=True)  # a rerun of the same step replaces it
        os.rename(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def load_latest_checkpoint(root: Path, warn: Callable[[str], None] = print) -> Checkpoint | None:
    """The newest checkpoint that verifies; each bad one is reported with its path and skipped."""
    for folder in reversed(list_checkpoints(root)):
        try:
            return read_checkpoint(folder)
        except CheckpointError as err:
            warn(f"checkpoint {folder} is unusable ({err}); falling back to the previous one")
    return None


def read_checkpoint(folder: Path) -> Checkpoint:
    meta_path, state_path = folder / META_FILE, folder / STATE_FILE
    if not meta_path.is_file() or not state_path.is_file():
        raise CheckpointError("missing meta.json or state.safetensors")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"meta.json is not valid JSON: {err}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise CheckpointError("meta.json is not a checkpoint record (no integer step)")
    if file_sha256(state_path) != meta.get("sha256"):
        raise CheckpointError("state.safetensors does not match its checksum (truncated or corrupt)")
    try:
        tensors = load_file(str(state_path))
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"state.safetensors is unreadable: {err}") from None
    return Checkpoint(folder=folder, step=int(meta["step"]), tensors=tensors, meta=meta)


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def write_atomic(path: Path, text: str) -> None:
    """Write a small file whole or not at all (a full disk or a kill leaves the old one): a staging name in
    the same folder, synced, then renamed over `path`."""
    staging = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        _write_synced(staging, text)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
