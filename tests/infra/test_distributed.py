"""spawn() hands the parent a failed worker's own exception (its type and message), so callers match on
types, never on text."""

import time

import pytest
import torch
from torch.multiprocessing import ProcessRaisedException

from infra.distributed import spawn
from tests.infra import ds_worker


def test_a_failed_worker_raises_its_own_exception_in_the_parent():
    with pytest.raises(ds_worker.WorkerError, match="broken on rank 0") as info:
        spawn(ds_worker.fail, 1, "broken")
    assert isinstance(info.value.__cause__, ProcessRaisedException)  # torch's report, with the traceback
    assert "Traceback" in str(info.value.__cause__)


@pytest.mark.slow
def test_the_failed_rank_is_reported_and_a_stuck_peer_is_stopped():
    start = time.monotonic()
    with pytest.raises(ds_worker.WorkerError, match="broken on rank 1"):  # the failed rank's, not a peer's
        spawn(ds_worker.fail_on_rank_one, 2, "broken")
    assert time.monotonic() - start < 120  # rank 0 was interrupted after the settle time, not waited for


@pytest.mark.parametrize(("backend", "kind"), [("nccl", "cuda"), ("gloo", "cpu")])
def test_collectives_reduce_on_the_backends_device(monkeypatch, backend, kind):
    """NCCL takes only CUDA tensors, so what all_reduce_mean reduces must live on the backend's device (a
    gloo run cannot show it: the device of the reduced tensor is checked instead)."""
    import torch.distributed as dist

    import infra.distributed as distributed

    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert distributed.collective_device().type == kind
    reduced = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(distributed, "collective_device", lambda: torch.device("meta") if backend == "nccl"
                        else torch.device("cpu"))  # no GPU here: the meta device stands in for the CUDA one

    def all_reduce(tensor, op=None, group=None):
        reduced.append(tensor.device.type)
        if tensor.device.type == "meta":
            raise _Reduced
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    if backend == "nccl":
        with pytest.raises(_Reduced):
            distributed.all_reduce_mean(1.0)
        assert reduced == ["meta"]  # built on collective_device(), not on the CPU
    else:
        assert distributed.all_reduce_mean(3.0) == 1.5 and reduced == ["cpu"]


class _Reduced(Exception):
    """Stops all_reduce_mean after the reduction (a meta tensor has no value to read back)."""


def test_workers_leave_no_process_group_up_at_exit(tmp_path):
    """A worker that exits with its gloo group up can abort in a C++ destructor after its work is done
    (SIGABRT: CI saw it fail a passing DeepSpeed run), so spawn() destroys the group when fn returns."""
    spawn(ds_worker.group_at_exit, 2, str(tmp_path / "up"))
    assert [(tmp_path / f"up.{rank}").read_text() for rank in (0, 1)] == ["False", "False"]
