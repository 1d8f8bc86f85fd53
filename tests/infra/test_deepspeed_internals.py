"""The DeepSpeed internals infra/deepspeed_engine.py relies on still exist in the installed DeepSpeed, and
the installed version lies in the range pyproject.toml pins (so an upgrade that moves them fails here,
not mid-study)."""

import importlib
import inspect
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from infra.deepspeed_engine import DEEPSPEED_INTERNALS
from infra.distributed import accelerator_env

ROOT = Path(__file__).resolve().parents[2]


def test_installed_deepspeed_is_in_the_pinned_range():
    accelerator_env()  # DeepSpeed picks its accelerator when first imported
    import deepspeed

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [Requirement(d) for d in deps if Requirement(d).name == "deepspeed"]
    assert pin.specifier.contains(deepspeed.__version__), (pin, deepspeed.__version__)
    assert any(spec.operator == "<" for spec in pin.specifier), "the pin needs an upper bound"


@pytest.mark.parametrize("path", sorted(DEEPSPEED_INTERNALS))
def test_every_internal_the_engine_uses_exists(path):
    accelerator_env()
    module, name = path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    source = inspect.getsource(cls)
    for member in DEEPSPEED_INTERNALS[path]:
        # methods are class attributes; instance attributes are assigned in the class's code
        assert hasattr(cls, member) or f"self.{member} =" in source, f"{path}.{member} is gone"
