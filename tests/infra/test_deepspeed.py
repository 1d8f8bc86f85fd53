"""DeepSpeed on CPU (gloo): the sparse projection survives every ZeRO stage, and DeepSpeed on one
worker trains like the plain-torch engine."""

import json

import pytest
import torch

from infra.distributed import spawn
from tests.infra import ds_worker


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zeros_survive_every_zero_stage_on_two_workers(stage, tmp_path):
    out = tmp_path / "report.json"
    spawn(ds_worker.check_zeros_survive, 2, stage, str(out))
    assert json.loads(out.read_text()) == {"stage": stage, "steps": [1, 2, 3, 4], "world": 2}


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2])
def test_deepspeed_on_one_worker_matches_the_torch_engine(stage, tmp_path):
    spawn(ds_worker.final_weights, 1, "torch", 0, str(tmp_path / "torch.pt"))
    spawn(ds_worker.final_weights, 1, "deepspeed", stage, str(tmp_path / "ds.pt"))
    a = torch.load(tmp_path / "torch.pt", weights_only=True)
    b = torch.load(tmp_path / "ds.pt", weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_sparse_compute_under_zero_on_two_workers_trains_as_one_process(stage, tmp_path):
    """sparsity.compute=sparse under ZeRO 1-2 on two workers: exact k, the floor and active-only Adam state
    after every step (checked in the workers), both ranks hold the same weights, and they match one process
    of the plain-torch engine on the same global batches."""
    spawn(ds_worker.sparse_compute_run, 2, "deepspeed", stage, str(tmp_path / "ds"))
    spawn(ds_worker.sparse_compute_run, 1, "torch", 0, str(tmp_path / "torch"))
    report = json.loads((tmp_path / "ds.json").read_text())
    assert report["world"] == 2 and report["sparse_matrix_steps"] > 0 and report["regrow_steps"] > 0, report
    ranks = [torch.load(tmp_path / f"ds.{r}", weights_only=True) for r in (0, 1)]
    single = torch.load(tmp_path / "torch.0", weights_only=True)
    assert ranks[0].keys() == ranks[1].keys() == single.keys()
    for key in single:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        torch.testing.assert_close(ranks[0][key], single[key], atol=1e-5, rtol=1e-4, msg=key)


@pytest.mark.slow
def test_sparse_compute_under_zero_resumes_bit_identically(tmp_path):
    spawn(ds_worker.sparse_compute_run, 2, "deepspeed", 2, str(tmp_path / "straight"))
    spawn(ds_worker.sparse_compute_run, 2, "deepspeed", 2, str(tmp_path / "resumed"), 7)
    straight = torch.load(tmp_path / "straight.0", weights_only=True)
    resumed = torch.load(tmp_path / "resumed.0", weights_only=True)
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key
