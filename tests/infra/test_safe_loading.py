"""Nothing a user or a cluster peer can write is unpickled (issue 17): checkpoints are safetensors + JSON,
a worker's exception travels as JSON, and a pickle payload planted in either is rejected without running.
ruff bans `pickle` and `torch.load` outside the tests (pyproject.toml), so new code cannot regress."""

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from infra.checkpoint import CheckpointError, load_latest_checkpoint, read_checkpoint, save_checkpoint
from infra.distributed import _raised_in, _report
from pipeline.errors import ConfigError


class _Payload:
    """Unpickling this creates a marker file: the proof that a loader ran a pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mknod, (str(self.marker),))


def _plant(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"weight": _Payload(marker)}))


def test_a_checkpoint_holding_a_pickle_is_rejected_without_running_it(tmp_path):
    root, marker = tmp_path / "checkpoints", tmp_path / "ran"
    save_checkpoint(root, 1, {"w": torch.ones(2)}, {"note": "good"})
    bad = save_checkpoint(root, 2, {"w": torch.zeros(2)}, {"note": "replaced"})
    _plant(bad / "state.safetensors", marker)
    meta = json.loads((bad / "meta.json").read_text())
    from infra.checkpoint import file_sha256

    meta["sha256"] = file_sha256(bad / "state.safetensors")  # the checksum alone would not stop a forger
    (bad / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="unreadable"):
        read_checkpoint(bad)
    warnings = []
    loaded = load_latest_checkpoint(root, warn=warnings.append)
    assert loaded.step == 1 and torch.equal(loaded.tensors["w"], torch.ones(2))
    assert str(bad) in warnings[0]
    assert not marker.exists()


@pytest.mark.parametrize("meta", ["[1, 2]", '{"sha256": "x"}', '{"step": "2"}', "null"])
def test_a_meta_record_of_the_wrong_shape_is_a_checkpoint_error(tmp_path, meta):
    folder = save_checkpoint(tmp_path, 3, {"w": torch.ones(1)}, {})
    (folder / "meta.json").write_text(meta)
    with pytest.raises(CheckpointError):
        read_checkpoint(folder)


def test_a_worker_exception_travels_as_json_with_its_class(tmp_path):
    _report(str(tmp_path), 0, ConfigError("model.d_model: bad"))
    assert json.loads((tmp_path / "rank-0.json").read_text())["qualname"] == "ConfigError"
    raised = _raised_in(tmp_path, 0)
    assert type(raised) is ConfigError and str(raised) == "model.d_model: bad"


@pytest.mark.parametrize("record", [
    {"module": "os", "qualname": "system", "message": "touch {marker}"},  # a callable, not an exception class
    {"module": "not_imported_anywhere", "qualname": "Boom", "message": "x"},  # never imported on a name
    {"module": "builtins", "qualname": "__import__", "message": "antigravity"},
])
def test_a_worker_record_naming_anything_but_a_loaded_exception_class_is_ignored(tmp_path, record):
    marker = tmp_path / "ran"
    record = {k: v.format(marker=marker) for k, v in record.items()}
    (tmp_path / "rank-0.json").write_text(json.dumps(record))
    assert _raised_in(tmp_path, 0) is None
    assert not marker.exists() and "not_imported_anywhere" not in __import__("sys").modules


def test_a_pickle_in_the_workers_error_folder_is_never_read(tmp_path):
    marker = tmp_path / "ran"
    _plant(tmp_path / "rank-0.pickle", marker)  # the old file name
    (tmp_path / "rank-0.json").write_bytes(pickle.dumps(_Payload(marker)))  # and a pickle under the new one
    assert _raised_in(tmp_path, 0) is None
    assert not marker.exists()
