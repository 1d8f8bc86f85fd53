"""Checkpoint and small-file IO under faults: what a killed writer leaves is cleared by the next one, and a
small record is written whole or not at all."""

import os
import subprocess
import sys

import pytest
import torch

from infra.checkpoint import PAUSE_FAILPOINT, list_checkpoints, load_latest_checkpoint, save_checkpoint, write_atomic


def test_a_writer_killed_mid_checkpoint_leaves_the_previous_one_and_its_staging_is_cleared(tmp_path):
    """SIGKILL inside a save (the failpoint holds it open): the folder keeps the previous checkpoint as the
    latest, and the next save removes the dead writer's staging folder."""
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 1, {"w": torch.ones(4)}, {})
    code = (f"import torch; from pathlib import Path; from infra.checkpoint import save_checkpoint; "
            f"save_checkpoint(Path({str(root)!r}), 2, {{'w': torch.zeros(4)}}, {{}})")
    proc = subprocess.Popen([sys.executable, "-c", code], env=os.environ | {PAUSE_FAILPOINT: "30"})
    for _ in range(600):
        if list(root.glob(".tmp-step-*")):
            break
        assert proc.poll() is None
        subprocess.run(["sleep", "0.05"], check=True)
    proc.kill()
    proc.wait()
    assert [p.name for p in list_checkpoints(root)] == ["step-00000001"]
    assert torch.equal(load_latest_checkpoint(root).tensors["w"], torch.ones(4))
    assert list(root.glob(".tmp-step-*"))  # the dead writer's staging folder, until the next save
    save_checkpoint(root, 2, {"w": torch.zeros(4)}, {})
    assert not list(root.glob(".tmp-*")) and [p.name for p in list_checkpoints(root)] == ["step-00000001",
                                                                                        "step-00000002"]


def test_write_atomic_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "record.json"
    write_atomic(path, '{"run_id": "a"}')
    real_fsync = os.fsync

    def full(fd):  # the disk fills while the new text is synced
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        write_atomic(path, '{"run_id": "b"}')
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert path.read_text() == '{"run_id": "a"}' and [p.name for p in tmp_path.iterdir()] == ["record.json"]
