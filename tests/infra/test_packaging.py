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
