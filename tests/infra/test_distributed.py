"""spawn() hands the parent a failed worker's own exception (its type and message), so callers match on
types, never on text."""

import time

import pytest
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
