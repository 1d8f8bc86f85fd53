"""A study folder mirrored to a storage URI through pyarrow.fs (infra/storage.py), with file:// standing
in for s3:// (the same pyarrow calls)."""

import os
import time

import pytest

from infra.storage import Mirror, StorageError, is_uri


def tree(root) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def write(path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_push_and_pull_round_trip_a_run_folder(tmp_path):
    run = tmp_path / "run"
    write(run / "trial.json", b"{}")
    write(run / "checkpoints" / "step-00000010" / "state.safetensors", b"w" * 100)
    write(run / "checkpoints" / ".tmp-step-00000020-7" / "state.safetensors", b"half")  # being written
    mirror = Mirror.open((tmp_path / "bucket").as_uri()).child("study", "trials", "run")
    assert mirror.push(run) == 2
    remote = tmp_path / "bucket" / "study" / "trials" / "run"
    assert tree(remote) == {k: v for k, v in tree(run).items() if ".tmp-" not in k}
    assert mirror.push(run) == 0  # nothing changed: nothing copied
    assert mirror.pull(tmp_path / "elsewhere") == 2
    assert tree(tmp_path / "elsewhere") == tree(remote)
    assert mirror.pull(tmp_path / "elsewhere") == 0


def test_a_changed_file_is_copied_again_and_pruned_checkpoints_leave_the_mirror(tmp_path):
    run = tmp_path / "run"
    write(run / "metrics.jsonl", b"a\n")
    write(run / "checkpoints" / "step-00000010" / "state.safetensors", b"old")
    mirror = Mirror.open((tmp_path / "bucket").as_uri())
    mirror.push(run)
    time.sleep(0.01)
    write(run / "metrics.jsonl", b"b\n")  # same size, newer
    (run / "checkpoints" / "step-00000010" / "state.safetensors").unlink()  # keep_checkpoints pruned it
    (run / "checkpoints" / "step-00000010").rmdir()
    write(run / "checkpoints" / "step-00000020" / "state.safetensors", b"new")
    assert mirror.push(run) == 2
    remote = tmp_path / "bucket"
    assert tree(remote) == tree(run)
    assert not (remote / "checkpoints" / "step-00000010").exists()


def test_pull_skips_excluded_folders_and_keeps_newer_local_files(tmp_path):
    remote = tmp_path / "bucket"
    write(remote / "trials" / "a" / "trial.json", b"1")
    write(remote / "trials" / "a" / "checkpoints" / "step-1" / "s", b"w")
    write(remote / "ray" / "state", b"r")
    local = tmp_path / "local"
    mirror = Mirror.open(remote.as_uri())
    assert mirror.pull(local, exclude=("checkpoints", "ray")) == 1
    assert tree(local) == {"trials/a/trial.json": b"1"}
    future = time.time() + 60
    write(local / "trials" / "a" / "trial.json", b"2")
    os.utime(local / "trials" / "a" / "trial.json", (future, future))
    assert mirror.pull(local, exclude=("checkpoints", "ray")) == 0  # the local file is newer


def test_a_uri_pyarrow_cannot_open_is_a_clear_error():
    assert is_uri("s3://bucket/studies") and is_uri("file:///tmp/x") and not is_uri("runs/studies")
    with pytest.raises(StorageError, match="nope://bucket"):
        Mirror.open("nope://bucket/studies")
