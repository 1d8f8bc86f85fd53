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
