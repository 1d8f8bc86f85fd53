"""What a cluster needs from the project's own dependencies (issue: the GPU-cluster path for real)."""

import importlib


def test_the_ray_dashboard_is_the_full_one():
    # ray[default]: without its packages (aiohttp_cors and the rest) Ray starts a minimal dashboard agent,
    # so `ray job submit` has no Jobs API to talk to and KubeRay's health probes never pass
    importlib.import_module("ray.dashboard.optional_deps")
    importlib.import_module("ray.dashboard.modules.job.job_head")
