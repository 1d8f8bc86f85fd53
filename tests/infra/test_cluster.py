"""The cluster files, validated; and a rehearsal of a cluster run on this machine: a Ray head and a
second Ray node started with `ray start` on loopback (each with its own custom resource), an MLflow
tracking server process, and the smoke study submitted to them; its trials land on both nodes and its
results equal the single-node run's."""

import json
import os
import re
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def test_ray_cluster_yaml_matches_rays_published_schema():
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cfg = yaml.safe_load((ROOT / "infra" / "cluster" / "ray-cluster.yaml").read_text())
    jsonschema.validate(cfg, schema)
    gpu = cfg["available_node_types"]["gpu_worker"]
    assert cfg["head_node_type"] == "head" and gpu["min_workers"] <= gpu["max_workers"] <= cfg["max_workers"]
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head  # nothing on a public interface


def test_kuberay_rayjob_has_the_fields_the_crd_requires():
    # KubeRay's CRD schema is not shipped in a Python package here: check the fields ray.io/v1 requires.
    job = yaml.safe_load((ROOT / "infra" / "cluster" / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    assert spec["entrypoint"].startswith("circuitscale study sweeps/")
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert head["template"]["spec"]["containers"][0]["image"]
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        container = group["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    study = yaml.safe_load((ROOT / spec["entrypoint"].split()[-1]).read_text())
    assert study["storage_path"].startswith("/mnt/cluster_storage")  # shared storage, as mounted above


def test_mlflow_server_files_listen_inside_the_cluster_only():
    docs = list(yaml.safe_load_all((ROOT / "infra" / "mlflow" / "mlflow-k8s.yaml").read_text()))
    services = [d for d in docs if d["kind"] == "Service"]
    assert services and all(s["spec"]["type"] == "ClusterIP" for s in services)
    serve = (ROOT / "infra" / "mlflow" / "serve.sh").read_text()
    assert '"${MLFLOW_HOST:-127.0.0.1}"' in serve and "postgresql" in serve


def test_container_installs_the_projects_own_lock():
    dockerfile = (ROOT / "infra" / "docker" / "Dockerfile").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert "-c requirements.lock" in dockerfile and "-c requirements.lock" in makefile
    pins = {re.split(r"[=<>@ ]", line)[0].lower().replace("_", "-")
            for line in (ROOT / "requirements.lock").read_text().splitlines() if line and not line.startswith("#")}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + project["optional-dependencies"]["dev"]
    names = {re.split(r"[\[=<>;! ]", d)[0].lower().replace("_", "-") for d in deps} - {"torch"}
    assert names <= pins, f"not pinned in requirements.lock: {sorted(names - pins)}"
    assert "torch==" not in (ROOT / "requirements.lock").read_text()  # per platform: CPU here, CUDA in the image
    match = re.search(r"ARG TORCH_VERSION=(\S+)", dockerfile)
    assert match and f"torch=={match.group(1)}" in makefile  # the same torch version in both


def test_container_copies_every_package_and_its_package_data():
    dockerfile = (ROOT / "infra" / "docker" / "Dockerfile").read_text()
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = [p.rstrip("*") for p in setuptools["packages"]["find"]["include"]]
    import_check = re.search(r'python -c "import ([^"]+)"', dockerfile)
    assert import_check, "the image no longer checks that its packages import"
    imported = {name.strip() for name in import_check.group(1).split(",")}
    for pkg in packages:
        assert re.search(rf"^COPY {pkg}/ {pkg}/$", dockerfile, re.M), f"the Dockerfile does not copy {pkg}/"
        assert pkg in imported, f"the Dockerfile's import check leaves out {pkg}"
    # Package data (templates, sweep configs) lives inside the copied package folders: each glob must match
    # a file, and no .dockerignore may drop it from the build context.
    for pkg, globs in setuptools["package-data"].items():
        assert pkg in packages
        for pattern in globs:
            assert list((ROOT / pkg).glob(pattern)), f"{pkg}/{pattern} matches no file"
    for ignore in (ROOT / ".dockerignore", ROOT / "infra" / "docker" / "Dockerfile.dockerignore"):
        if ignore.exists():
            rules = [r.strip() for r in ignore.read_text().splitlines() if r.strip() and not r.startswith("#")]
            assert not any(r.lstrip("/").split("/")[0] in packages or "templates" in r or r.endswith(".j2")
                           for r in rules if not r.startswith("!")), f"{ignore.name} excludes package files"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not check():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.fixture
def local_cluster(tmp_path):
    """A two-node Ray cluster on loopback (1 CPU each, custom resources node_a / node_b) and an MLflow
    tracking server process; everything is stopped afterwards."""
    import secrets

    port, mlflow_port = free_port(), free_port()
    token = tmp_path / "ray_auth_token"  # Ray 2.60 clusters authenticate every client with a token
    token.write_text(secrets.token_hex(32))
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0"} | auth
    env.pop("RAY_ADDRESS", None)
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
    ray = str(BIN / "ray")
    server = None
    try:
        subprocess.run([ray, "start", "--head", f"--port={port}", "--include-dashboard=false",
                        '--resources={"node_a": 1}', *common], check=True, env=env, capture_output=True, timeout=180)
        subprocess.run([ray, "start", f"--address=127.0.0.1:{port}", '--resources={"node_b": 1}', *common],
                       check=True, env=env, capture_output=True, timeout=180)
        server = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                                   "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                                   "--artifacts-destination", (tmp_path / "artifacts").as_uri(), "--workers", "1"],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def up() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", mlflow_port)) == 0

        wait_for(up, "the MLflow server")
        yield {"RAY_ADDRESS": f"127.0.0.1:{port}", **auth}, f"http://127.0.0.1:{mlflow_port}"
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        stop_ray_processes(port)


def stop_ray_processes(port: int) -> None:
    """Kill the processes of the cluster on `port` only (`ray stop` would kill every Ray on the machine)."""
    import psutil

    mine = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if re.search(rf"[:=]{port}\b", cmdline) and "ray" in cmdline:  # GCS address or port in its arguments
            mine.append(proc)
    for proc in mine:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(mine, timeout=30)
    current = Path("/tmp/ray/ray_current_cluster")  # what `ray stop` would also remove
    if current.is_file() and current.read_text().strip().endswith(f":{port}"):
        current.unlink()


@pytest.mark.slow
def test_rehearsal_two_nodes_and_an_mlflow_server_match_a_single_node_run(
        local_cluster, smoke_study, smoke_args, study_cli, small_corpus, smoke_cache, tmp_path):
    from mlflow.tracking import MlflowClient

    ray_env, uri = local_cluster
    storage = tmp_path / "studies"
    args = smoke_args(small_corpus, smoke_cache, storage) + [f"study.tracking_uri={uri}"]
    proc = study_cli(args, env=ray_env)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-5000:]
    folder = storage / "smoke"
    assert not (folder / "mlflow.db").exists()  # everything went to the server
    nodes = {json.loads(p.read_text())["node_id"] for p in (folder / "trials").glob("*/placement.json")}
    assert len(nodes) == 2, nodes  # two trials at a time, one CPU per node: both nodes ran trials
    single, _, _ = smoke_study
    for record in sorted((single / "trials").glob("*/trial.json")):
        there = json.loads(record.read_text())
        here = json.loads((folder / "trials" / record.parent.name / "trial.json").read_text())
        assert here["val_loss"] == there["val_loss"], record.parent.name  # bit-identical training
        assert {t: (c["status"], c["edges"]) for t, c in here["circuits"].items()} == \
            {t: (c["status"], c["edges"]) for t, c in there["circuits"].items()}
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("smoke")
    runs = client.search_runs([experiment.experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags and r.data.tags["kind"] != "lr_search"]
    assert len(children) == 3 and all(r.info.status == "FINISHED" for r in children)
    assert any(a.path == "trial.json" for a in client.list_artifacts(children[0].info.run_id))
