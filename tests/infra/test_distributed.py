"""spawn() hands the parent a failed worker's own exception (its type and message), so callers match on
types, never on text."""

import pytest
from torch.multiprocessing import ProcessRaisedException

from infra.distributed import spawn
from tests.infra import ds_worker


def test_a_failed_worker_raises_its_own_exception_in_the_parent():
    with pytest.raises(ds_worker.WorkerError, match="broken on rank 0") as info:
        spawn(ds_worker.fail, 1, "broken")
    assert isinstance(info.value.__cause__, ProcessRaisedException)  # torch's report, with the traceback
    assert "Traceback" in str(info.value.__cause__)
