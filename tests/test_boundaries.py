"""DESIGN.md's import boundaries are enforced by ruff (TID251); prove the rule fires where it should."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUFF = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")

SNIPPETS = {
    "ray": "import ray.tune\n",
    "deepspeed": "from deepspeed.utils import safe_get_full_fp32_param\n",
    "mlflow": "import mlflow\n",
    "torch.distributed": "import torch.distributed as dist\n",
}
ALLOWED = {"sweeps": {"ray"}, "infra": {"deepspeed", "mlflow", "torch.distributed"}}


def banned(folder: str, snippet: str) -> bool:
    proc = subprocess.run(
        [RUFF, "check", "--no-cache", "--select", "TID251", "--stdin-filename", f"{folder}/probe.py", "-"],
        input=snippet, capture_output=True, text=True, cwd=ROOT,
    )
    return "TID251" in proc.stdout


@pytest.mark.parametrize("folder", ["pipeline", "model", "kernels", "sweeps", "analysis", "infra"])
@pytest.mark.parametrize("module", sorted(SNIPPETS))
def test_heavy_imports_only_where_design_allows(folder, module):
    assert RUFF, "ruff is installed by `make setup`"
    assert banned(folder, SNIPPETS[module]) == (module not in ALLOWED.get(folder, set()))
