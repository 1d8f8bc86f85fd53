"""What a cluster needs from the project's own dependencies (issue: the GPU-cluster path for real)."""

import importlib


def test_the_ray_dashboard_is_the_full_one():
    # ray[default]: without its packages (aiohttp_cors and the rest) Ray starts a minimal dashboard agent,
    # so `ray job submit` has no Jobs API to talk to and KubeRay's health probes never pass
    deps = importlib.import_module("ray.dashboard.optional_deps")
    for name in ("aiohttp", "aiohttp_cors", "prometheus_client", "opencensus"):
        assert getattr(deps, name, None) is not None, f"ray[default] is missing {name}"
    job_head = importlib.import_module("ray.dashboard.modules.job.job_head")
    assert hasattr(job_head, "JobHead"), "the dashboard has no Jobs API module"


def test_ray_processes_do_not_compile_the_iri_grammar():
    # every Ray process imports jsonschema; with rfc3987-syntax installed that compiles a Lark grammar in each
    # (the smoke study: 113-118 s with it, 68-72 s without); `make setup` and `make lab` remove it
    import subprocess
    import sys

    code = "import sys, ray.runtime_env; print('rfc3987_syntax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False", "rfc3987-syntax is installed: run `make setup` (it removes it)"
