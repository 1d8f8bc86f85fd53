"""The cluster files, validated; and a rehearsal of a cluster run on this machine: a Ray head (with its
dashboard and Jobs API) and a second Ray node started with `ray start` on loopback (each with its own
custom resource), the MLflow server as the cluster runs it (login, host allow-list), and the smoke study
submitted with `ray job submit`, its folder a URI; its trials land on both nodes and its results equal
the single-node run's."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml
from jsonschema.exceptions import ValidationError

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CLUSTER = ROOT / "infra" / "cluster"
# KubeRay v1.7.0's RayJob CRD schema (source, commit and checksum in the file's header).
RAYJOB_CRD = Path(__file__).parent / "kuberay" / "ray.io_rayjobs.v1.yaml"


def load_yaml(path: Path):
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the vendored schema is 600 kB
    return yaml.load(path.read_text(), Loader=loader)  # noqa: S506 - a SafeLoader (libyaml's when present)


def load_yaml_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_ray_cluster_yaml_matches_rays_published_schema():
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cfg = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    jsonschema.validate(cfg, schema)
    gpu = cfg["available_node_types"]["gpu_worker"]
    assert cfg["head_node_type"] == "head" and gpu["min_workers"] <= gpu["max_workers"] <= cfg["max_workers"]
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head  # nothing on a public interface


def test_ray_cluster_yaml_turns_token_auth_on_in_every_container():
    # Ray 2.60's `ray start` runs unauthenticated unless RAY_AUTH_MODE=token: the mode goes into every
    # container's environment (run_options apply to head and workers) and the token file to every node.
    cfg = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    docker = cfg["docker"]
    assert not {"head_run_options", "worker_run_options"} & docker.keys()  # one environment for all nodes
    env = dict(option.split(None, 1)[1].split("=", 1) for option in docker["run_options"]
               if option.split(None, 1)[0] in ("-e", "--env"))
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_AUTH_TOKEN_PATH"] in cfg["file_mounts"], "the token file is not copied to the nodes"
    commands = [c for key, value in cfg.items() if key.endswith("_commands") for c in value]
    assert not any("RAY_AUTH_MODE" in c or "RAY_AUTH_TOKEN" in c for c in commands)  # nothing overrides it


def test_ray_cluster_nodes_get_scoped_instance_profiles_and_closed_security_groups():
    cfg = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    roles = {name: "head" if name == cfg["head_node_type"] else "worker" for name in cfg["available_node_types"]}
    for name, node in cfg["available_node_types"].items():
        config = node["node_config"]
        # Without these the launcher gives the head ray-autoscaler-v1 (EC2 and S3 full access) and
        # creates a security group that admits SSH from 0.0.0.0/0.
        assert config["IamInstanceProfile"]["Arn"].endswith(f":instance-profile/circuitscale-{roles[name]}")
        assert config["SecurityGroupIds"] and all(sg.strip() for sg in config["SecurityGroupIds"])
    assert "security_group" not in cfg["provider"]  # extra rules there still come with SSH open to the world


def test_instance_profile_policies_grant_only_what_the_nodes_use():
    cfg = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    head, worker = (json.loads((CLUSTER / "iam" / f"{role}-policy.json").read_text()) for role in ("head", "worker"))
    assert json.loads((CLUSTER / "iam" / "ec2-trust.json").read_text())["Statement"][0]["Principal"] == \
        {"Service": "ec2.amazonaws.com"}

    def statements(policy: dict) -> list[tuple[list[str], list[str], dict]]:
        out = []
        for s in policy["Statement"]:
            assert s["Effect"] == "Allow"
            actions, resources = ([v] if isinstance(v, str) else v for v in (s["Action"], s["Resource"]))
            assert not any(a == "*" or a.endswith(":*") for a in actions), s  # no service-wide grant
            out.append((actions, resources, s.get("Condition", {})))
        return out

    assert all(a.startswith("ecr:") for actions, _, _ in statements(worker) for a in actions)  # pull only
    for actions, resources, condition in statements(head):
        if any(a.startswith("s3:") for a in actions):  # the MLflow server's prefix of one bucket
            assert all(r == "arn:aws:s3:::<bucket>" or r.startswith("arn:aws:s3:::<bucket>/mlflow/") for r in resources)
        if "ec2:TerminateInstances" in actions:
            assert condition["StringEquals"]["ec2:ResourceTag/ray-cluster-name"] == cfg["cluster_name"]
        if "iam:PassRole" in actions:
            assert resources == ["arn:aws:iam::<account>:role/circuitscale-worker"]
        if any(a.startswith("ec2:") for a in actions) and "*" in resources:
            assert all(a.startswith("ec2:Describe") for a in actions) or condition, (actions, condition)


def kubernetes_schema(node: dict) -> dict:
    """A CRD's structural schema as plain JSON Schema (draft 4, which OpenAPI v3 schemas follow), as strict
    as `kubectl apply`'s default server-side field validation: an object with `properties` rejects unknown
    fields; `nullable` adds null to the type; `x-kubernetes-int-or-string` means integer or string (the
    generated CRD already spells this as anyOf); `x-kubernetes-list-type: set` means unique items. The
    keywords in `crd_validator` check list maps' keys and refuse fields that carry CEL rules; `format`
    (int32, date-time) and `default` are not checked."""
    out = dict(node)
    for key in ("properties", "patternProperties"):
        if key in node:
            out[key] = {name: kubernetes_schema(sub) for name, sub in node[key].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(node.get(key), dict):
            out[key] = kubernetes_schema(node[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in node:
            out[key] = [kubernetes_schema(sub) for sub in node[key]]
    if "properties" in node and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if node.get("nullable") and "type" in node:
        out["type"] = [node["type"], "null"]
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    return out


def crd_validator(crd: dict) -> jsonschema.protocols.Validator:
    def unique_list_map_keys(validator, keys, instance, schema):
        # x-kubernetes-list-type: map: no two entries share their key fields (containers by name, ...).
        if not validator.is_type(instance, "array"):
            return
        seen = set()
        for item in instance:
            key = tuple(json.dumps(item.get(k), sort_keys=True) for k in keys) if isinstance(item, dict) else None
            if key in seen:
                yield ValidationError(f"two entries with the same {keys}: {key}")
            seen.add(key)

    def cel_rules(validator, rules, instance, schema):
        # The API server evaluates these CEL rules; jsonschema cannot. A field that carries them fails here
        # so that using it means reading its rules and extending this test, never an unchecked pass.
        yield ValidationError(f"CEL rules not evaluated by this test: {[r['rule'] for r in rules]}")

    cls = jsonschema.validators.extend(jsonschema.Draft4Validator, {
        "x-kubernetes-list-map-keys": unique_list_map_keys, "x-kubernetes-validations": cel_rules})
    return cls(kubernetes_schema(crd["openAPIV3Schema"]))


@pytest.fixture(scope="module")
def rayjob_crd() -> dict:
    return load_yaml(RAYJOB_CRD)


def rayjob_documents() -> list[dict]:
    jobs = [d for d in load_yaml_documents(CLUSTER / "rayjob.yaml") if d["kind"] == "RayJob"]
    assert jobs, "infra/cluster/rayjob.yaml holds no RayJob"
    return jobs


def test_kuberay_rayjob_matches_the_vendored_rayjob_crd_schema(rayjob_crd):
    validator = crd_validator(rayjob_crd)
    for job in rayjob_documents():
        assert job["apiVersion"] == f"{rayjob_crd['group']}/{rayjob_crd['version']}"
        errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(job)]
        assert not errors, errors
        # KubeRay's controller (not the CRD) limits the name: a DNS-1035 label of at most 47 characters
        # (ray-operator/controllers/ray/utils/validation.go, ValidateRayJobMetadata, v1.7.0).
        name = job["metadata"]["name"]
        assert len(name) <= 47 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name)
    # The validator is not vacuous: a misspelt field, a number where rayStartParams wants a string, and a
    # duplicate container name each fail.
    job = rayjob_documents()[0]
    bad = [json.loads(json.dumps(job)) for _ in range(3)]
    bad[0]["spec"]["ttlSecondsAfterFinish"] = 60
    bad[1]["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    containers = bad[2]["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
    containers.append(dict(containers[0]))
    assert all(list(validator.iter_errors(b)) for b in bad)


def test_kuberay_rayjob_autoscales_reaches_its_dashboard_and_cleans_up():
    for job in rayjob_documents():
        spec = job["spec"]
        assert spec["entrypoint"].startswith("circuitscale study sweeps/")
        cluster = spec["rayClusterSpec"]
        # The submitter Job and the operator call the dashboard through the head Service on 8265: it must
        # listen on the pod IP (0.0.0.0, KubeRay's default), behind a ClusterIP Service and the token.
        head = cluster["headGroupSpec"]
        assert head["rayStartParams"].get("dashboard-host", "0.0.0.0") == "0.0.0.0"
        assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress")
        assert cluster["authOptions"]["mode"] == "token" and cluster["authOptions"]["secretName"]
        assert head["template"]["spec"]["containers"][0]["image"]
        # Without the in-tree autoscaler `replicas` is a fixed pool: the number of concurrent trials.
        assert cluster["enableInTreeAutoscaling"] is True
        for group in cluster["workerGroupSpecs"]:
            assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
            assert group["minReplicas"] == 0 and group["maxReplicas"] >= 8  # idle GPUs go; 8 trials at most
            container = group["template"]["spec"]["containers"][0]
            assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
        # The Ray cluster (GPU pods included) is deleted shortly after the study ends.
        assert spec["shutdownAfterJobFinishes"] is True and 0 <= spec["ttlSecondsAfterFinished"] <= 300
        study = yaml.safe_load((ROOT / spec["entrypoint"].split()[-1]).read_text())
        assert study["storage_path"].startswith("/mnt/cluster_storage")  # shared storage, as mounted


def test_kuberay_volumes_and_the_documented_service_exist():
    storage = load_yaml_documents(CLUSTER / "shared-storage.yaml")
    classes = {d["metadata"]["name"]: d for d in storage if d["kind"] == "StorageClass"}
    claims = {(d["metadata"]["namespace"], d["metadata"]["name"]): d for d in storage
              if d["kind"] == "PersistentVolumeClaim"}
    for claim in claims.values():
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every node writes checkpoints
        assert claim["spec"]["storageClassName"] in classes
    assert all(c["reclaimPolicy"] == "Retain" for c in classes.values())  # a deleted claim keeps the study
    docs = (ROOT / "docs" / "cluster.md").read_text()
    for job in rayjob_documents():
        namespace, cluster = job["metadata"]["namespace"], job["spec"]["rayClusterSpec"]
        templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
        for template in templates:
            for volume in template["spec"].get("volumes", []):
                if "persistentVolumeClaim" in volume:
                    assert (namespace, volume["persistentVolumeClaim"]["claimName"]) in claims, volume
        # KubeRay names a RayJob's head Service `<rayjob>-head-svc` (utils.GenerateHeadServiceName).
        forwarded = set(re.findall(r"port-forward svc/(\S+) 8265", docs))
        assert forwarded == {f"{job['metadata']['name']}-head-svc"}, forwarded


def test_mlflow_server_files_listen_inside_the_cluster_only():
    docs = load_yaml_documents(ROOT / "infra" / "mlflow" / "mlflow-k8s.yaml")
    services = [d for d in docs if d["kind"] == "Service"]
    assert services and all(s["spec"]["type"] == "ClusterIP" for s in services)
    serve = (ROOT / "infra" / "mlflow" / "serve.sh").read_text()
    assert '"${MLFLOW_HOST:-127.0.0.1}"' in serve and "postgresql" in serve


def test_mlflow_server_gets_its_s3_credentials_from_a_secret():
    docs = load_yaml_documents(ROOT / "infra" / "mlflow" / "mlflow-k8s.yaml")
    (server,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow"]
    env = {e["name"]: e for e in server["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MLFLOW_ARTIFACTS"]["value"].startswith("s3://")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "value" not in env[name] and env[name]["valueFrom"]["secretKeyRef"]["name"], name


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


def ray_cluster_commands(cfg: dict) -> dict[str, list[str]]:
    return {key: value for key, value in cfg.items() if key.endswith("_commands")}


def image_uid() -> int:
    match = re.search(r"useradd .*-u (\d+) ray", (ROOT / "infra" / "docker" / "Dockerfile").read_text())
    assert match, "the Dockerfile no longer makes the `ray` user"
    return int(match.group(1))


def test_container_has_rsync_for_the_cluster_launcher():
    # `ray up` copies its bootstrap files into the running container with `rsync -e 'docker exec -i'`
    # (DockerCommandRunner.run_init), so an image without rsync fails at the launcher's setup step.
    dockerfile = (ROOT / "infra" / "docker" / "Dockerfile").read_text().replace("\\\n", " ")
    assert re.search(r"^FROM nvidia/cuda:\S+-ubuntu", dockerfile, re.M)  # apt is its package manager
    installs = re.findall(r"apt-get install ([^&\n]+)", dockerfile)
    assert any("rsync" in line.split() for line in installs), installs


def test_ray_cluster_nodes_pin_an_ami_with_a_cuda_12_8_driver():
    # Without ImageId the launcher uses its default DLAMI (Ubuntu 18.04 V71.0, a CUDA 11-era driver),
    # which cannot run the image's CUDA 12.8.
    text = (CLUSTER / "ray-cluster.yaml").read_text()
    cfg = yaml.safe_load(text)
    images = {name: node["node_config"].get("ImageId", "") for name, node in cfg["available_node_types"].items()}
    assert all(image and image.lower() != "latest_dlami" for image in images.values()), images
    assert len(set(images.values())) == 1, images  # one host OS for the whole cluster
    assert re.search(r"FROM nvidia/cuda:12\.8", (ROOT / "infra" / "docker" / "Dockerfile").read_text())
    # The operator fills the region's id: the file names the AMI family and the driver it needs.
    assert "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04)" in text and "R570" in text


def test_ray_cluster_mounts_the_shared_storage_on_the_host_for_the_image_user():
    cfg = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    commands = ray_cluster_commands(cfg)
    # Every failure stops `ray up`: nothing swallows an exit status.
    for key, values in commands.items():
        for command in values:
            assert not re.search(r"\|\|\s*(true|:)\s*($|;|&|\))", command), (key, command)
    # The container bind-mounts the host's folder; only initialization_commands run on the host (the
    # setup commands run inside the container, where `mount` does not reach the host).
    assert "-v /mnt/cluster_storage:/mnt/cluster_storage" in cfg["docker"]["run_options"]
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert not any(re.search(r"\bmount\b", c) for c in commands.get(key, [])), key
    host = commands["initialization_commands"]
    (mount,) = [i for i, c in enumerate(host) if re.search(r"\bmount -t nfs4\b", c)]
    # The EFS address is in the file: the launcher passes no variable of the operator's shell to the nodes.
    region = cfg["provider"]["region"]
    efs = rf'"\S+\.efs\.{region}\.amazonaws\.com:/" /mnt/cluster_storage$'
    assert "$" not in host[mount] and re.search(efs, host[mount]), host[mount]
    # A fresh EFS file system's root belongs to root; the image's user writes the study.
    (chown,) = [i for i, c in enumerate(host) if "chown" in c and "/mnt/cluster_storage" in c]
    assert chown > mount and f"chown {image_uid()}:{image_uid()} /mnt/cluster_storage" in host[chown]


def test_vm_head_serves_mlflow_with_auth_on_the_address_the_gpu_nodes_use():
    cfg = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    head, workers = cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]
    # Started by a script in the image that reads its settings on the head and fails `ray up` when the
    # server does not answer; not a bare background serve.sh with the laptop's (unset) variables.
    (start,) = [c for c in head if "infra/mlflow/" in c]
    script = re.search(r"/opt/circuitscale/(infra/mlflow/\S+\.sh)", start).group(1)
    assert script != "infra/mlflow/serve.sh" and "&" not in start.replace("&&", "")
    text = (ROOT / script).read_text()
    assert "set -euo pipefail" in text
    # The settings files it reads are copied to the nodes; every `ray start` (so the driver and every
    # trial) gets the MLflow login from the first one.
    for name in ("mlflow.env", "mlflow-server.env"):
        assert f"/home/ray/.circuitscale/{name}" in cfg["file_mounts"] and name in text
    for command in [c for c in head + workers if "ray start" in c]:
        assert re.search(r"set -a && \. /home/ray/\.circuitscale/mlflow\.env && set \+a && .*ray start", command)
    # It binds Ray's node address (the one workers know as $RAY_HEAD_IP), lists it with the port in
    # --allowed-hosts, and makes the admin account from that login.
    node_ip = "address=$(python -c 'import ray.util; print(ray.util.get_node_ip_address())')"
    assert node_ip in text.splitlines()
    assert 'MLFLOW_HOST="$address"' in text and 'MLFLOW_ALLOWED_HOSTS="$address:$port,' in text
    assert 'MLFLOW_AUTH_ADMIN_PASSWORD="$MLFLOW_TRACKING_PASSWORD"' in text
    # The study is pointed at that address, never at the head's loopback (a GPU node's own loopback).
    docs = (ROOT / "docs" / "cluster.md").read_text()
    uris = re.findall(r"study\.tracking_uri=(\S+)", docs)
    assert uris and all("127.0.0.1" not in u and "localhost" not in u for u in uris), uris


def test_mlflow_server_script_turns_basic_auth_on_and_fails_without_its_settings(tmp_path, monkeypatch):
    """serve.sh run with `mlflow` stubbed out: the arguments it passes, and the auth config it writes read
    back by MLflow's own reader."""
    import importlib.util

    import mlflow

    # MLflow's reader of the auth config, loaded from its file: the package mlflow.server.auth imports
    # Flask-WTF, which the image installs (infra/mlflow/requirements.txt) and this environment need not.
    spec = importlib.util.spec_from_file_location(
        "mlflow_auth_config", Path(mlflow.__file__).parent / "server" / "auth" / "config.py")
    auth_config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(auth_config)
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "mlflow").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$OUT/args"\nenv > "$OUT/env"\n')
    (stub / "mlflow").chmod(0o755)
    uri = "postgresql://mlflow:p%40ss@db:5432/mlflow"  # a URL-encoded password: '%' is configparser syntax
    settings = {"MLFLOW_BACKEND_URI": uri, "MLFLOW_ARTIFACTS": "s3://bucket/mlflow",
                "MLFLOW_ALLOWED_HOSTS": "mlflow.circuitscale.svc:5000", "MLFLOW_AUTH_ADMIN_USERNAME": "circuitscale",
                "MLFLOW_AUTH_ADMIN_PASSWORD": "0123456789abcdef"}
    env = {"PATH": f"{stub}:{BIN}:/usr/bin:/bin", "OUT": str(tmp_path), "TMPDIR": str(tmp_path)}
    serve = str(ROOT / "infra" / "mlflow" / "serve.sh")
    subprocess.run(["bash", serve], env=env | settings, check=True, timeout=60)
    args = (tmp_path / "args").read_text().split("\n")
    assert args[:3] == ["server", "--app-name", "basic-auth"]
    assert args[args.index("--allowed-hosts") + 1] == "mlflow.circuitscale.svc:5000"
    served = dict(line.split("=", 1) for line in (tmp_path / "env").read_text().splitlines() if "=" in line)
    assert served["MLFLOW_AUTH_ADMIN_PASSWORD"] == "0123456789abcdef" and served["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", served["MLFLOW_AUTH_CONFIG_PATH"])
    # the users live in the runs' database, not in a file inside the pod
    assert auth_config.read_auth_config().database_uri == uri
    for name in settings:  # each one missing stops the script before the server starts
        (tmp_path / "args").unlink(missing_ok=True)
        missing = subprocess.run(["bash", serve], env=env | {k: v for k, v in settings.items() if k != name},
                                 capture_output=True, text=True, timeout=60)
        assert missing.returncode != 0 and name in missing.stderr and not (tmp_path / "args").exists(), name


def test_mlflow_image_has_what_the_basic_auth_app_imports():
    from importlib.metadata import requires

    auth = [r.split(";")[0].strip() for r in requires("mlflow") if 'extra == "auth"' in r]
    assert auth, "the installed MLflow has no auth extra"
    pinned = {re.split(r"[=<>]", line)[0].lower().replace("_", "-")
              for path in (ROOT / "infra" / "mlflow" / "requirements.txt", ROOT / "requirements.lock")
              for line in path.read_text().splitlines() if line and not line.startswith("#")}
    for requirement in auth:  # e.g. Flask-WTF<2
        assert re.split(r"[=<>!~ ]", requirement)[0].lower().replace("_", "-") in pinned, requirement


def test_kubernetes_mlflow_accepts_its_service_names_and_every_ray_pod_logs_in():
    from mlflow.server.security_utils import is_allowed_host_header

    docs = load_yaml_documents(ROOT / "infra" / "mlflow" / "mlflow-k8s.yaml")
    (server,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow"]
    env = {e["name"]: e for e in server["spec"]["template"]["spec"]["containers"][0]["env"]}
    allowed = [h.strip() for h in env["MLFLOW_ALLOWED_HOSTS"]["value"].split(",")]
    # What the pods send (paper.yaml's URI; the RayJob runs that study) and the port-forward, checked with
    # MLflow's own Host-header matcher; a name it does not list gets 403 on every API call.
    (service,) = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "mlflow"]
    namespace, port = service["metadata"]["namespace"], service["spec"]["ports"][0]["port"]
    for job in rayjob_documents():
        study = yaml.safe_load((ROOT / job["spec"]["entrypoint"].split()[-1]).read_text())
        host = urlparse(study["tracking_uri"]).netloc
        assert host == f"mlflow.{namespace}.svc:{port}" and is_allowed_host_header(allowed, host), host
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"mlflow.{namespace}.svc.cluster.local:{port}"):
        assert is_allowed_host_header(allowed, host), host
    assert not is_allowed_host_header(allowed, f"mlflow.example.com:{port}")
    # The admin account comes from a Secret, and every Ray container sends the same pair as MLflow's
    # client variables (the driver runs on the head, the trials on the workers).
    login = {}
    for server_name, client_name in (("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_TRACKING_USERNAME"),
                                     ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_TRACKING_PASSWORD")):
        assert "value" not in env[server_name], server_name
        login[client_name] = env[server_name]["valueFrom"]["secretKeyRef"]
    for job in rayjob_documents():
        cluster = job["spec"]["rayClusterSpec"]
        templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
        for template in templates:
            for container in template["spec"]["containers"]:
                sent = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef") for e in container.get("env", [])}
                assert all(sent.get(name) == ref for name, ref in login.items()), container["name"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not check():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


MLFLOW_USER, MLFLOW_PASSWORD = "circuitscale", "rehearsal-0123456789"  # the server's admin, as the Secret holds


@pytest.fixture
def local_cluster(tmp_path):
    """A two-node Ray cluster on loopback (1 CPU each, custom resources node_a / node_b), the head with the
    full dashboard (its Jobs API), token auth on; and the MLflow server as the cluster runs it
    (infra/mlflow/serve.sh: the basic-auth app and a host allow-list) on 127.0.0.1. Every Ray process gets
    the MLflow login as the cluster's containers do. Only this cluster's processes are stopped afterwards.
    Yields (environment for Ray clients, dashboard address, MLflow URI)."""
    import secrets

    port, mlflow_port, dashboard = free_port(), free_port(), free_port()
    token = tmp_path / "ray_auth_token"  # Ray 2.60 clusters authenticate every client with a token
    token.write_text(secrets.token_hex(32))
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    login = {"MLFLOW_TRACKING_USERNAME": MLFLOW_USER, "MLFLOW_TRACKING_PASSWORD": MLFLOW_PASSWORD}
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{BIN}:{os.environ.get('PATH', '')}"} | auth | login
    env.pop("RAY_ADDRESS", None)
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]

    def agent_ports() -> list[str]:  # two nodes on one machine: each node's agents on ports of their own
        return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]

    ray = str(BIN / "ray")
    # The second node gets a temp dir of its own, as a real node has its own disk: sharing the head's, its
    # runtime-env agent unpacks the job's working directory into the very folder the driver runs in, and
    # the driver's working directory can vanish under it. (Short: Ray's sockets live below it.)
    node_b = tempfile.mkdtemp(prefix="rb", dir="/tmp")
    server = None
    try:
        subprocess.run([ray, "start", "--head", f"--port={port}", "--include-dashboard=true",
                        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", '--resources={"node_a": 1}',
                        *common, *agent_ports()], check=True, env=env, capture_output=True, timeout=180)
        subprocess.run([ray, "start", f"--address=127.0.0.1:{port}", '--resources={"node_b": 1}', *common,
                        *agent_ports(), f"--temp-dir={node_b}"], check=True, env=env, capture_output=True,
                       timeout=180)
        settings = {"MLFLOW_BACKEND_URI": f"sqlite:///{tmp_path / 'server.db'}",
                    "MLFLOW_ARTIFACTS": (tmp_path / "artifacts").as_uri(),
                    "MLFLOW_ALLOWED_HOSTS": f"127.0.0.1:{mlflow_port}", "MLFLOW_AUTH_ADMIN_USERNAME": MLFLOW_USER,
                    "MLFLOW_AUTH_ADMIN_PASSWORD": MLFLOW_PASSWORD, "MLFLOW_PORT": str(mlflow_port),
                    "MLFLOW_WORKERS": "1", "TMPDIR": str(tmp_path)}
        server = subprocess.Popen(["bash", str(ROOT / "infra" / "mlflow" / "serve.sh")], env=env | settings,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def up() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", mlflow_port)) == 0

        wait_for(up, "the MLflow server")
        yield auth | login | {"PATH": env["PATH"]}, f"http://127.0.0.1:{dashboard}", f"http://127.0.0.1:{mlflow_port}"
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        stop_ray_processes(port)
        shutil.rmtree(node_b, ignore_errors=True)


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
def test_job_submit_rehearsal_two_nodes_mlflow_with_auth_and_uri_storage_match_a_single_node_run(
        local_cluster, smoke_study, smoke_args, small_corpus, smoke_cache, tmp_path, monkeypatch):
    """`ray job submit` of the smoke study to the head's Jobs API, as a user submits to a cluster: the
    study folder given as a URI (mirrored through pyarrow.fs from a local working folder), MLflow behind
    its login and host allow-list. The job SUCCEEDS, trials ran on both nodes, the results equal the
    single-node run's, 3 child runs are FINISHED on the server and the mirror holds the whole study."""
    import requests
    from mlflow.tracking import MlflowClient

    ray_env, dashboard, uri = local_cluster
    mirror, local = tmp_path / "mirror", tmp_path / "work"
    args = [a for a in smoke_args(small_corpus, smoke_cache, tmp_path / "unused")
            if not a.startswith("study.storage_path=")]
    args[0] = "sweeps/smoke.yaml"  # inside the job's copy of the working directory
    args += [f"study.storage_path={mirror.as_uri()}", f"study.local_dir={local}", f"study.tracking_uri={uri}"]
    job = f"rehearsal-{os.getpid()}"
    env = os.environ | ray_env
    env.pop("RAY_ADDRESS", None)
    submit = subprocess.run([str(BIN / "ray"), "job", "submit", f"--address={dashboard}", f"--submission-id={job}",
                             "--working-dir", str(ROOT), "--", "circuitscale", "study", *args],
                            env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    status = subprocess.run([str(BIN / "ray"), "job", "status", f"--address={dashboard}", job], env=env,
                            capture_output=True, text=True, timeout=120)
    # `ray job status` prints "Job '<id>' succeeded" for JobStatus.SUCCEEDED only (ray/dashboard/modules/job/cli.py)
    assert f"Job '{job}' succeeded" in status.stdout, (status.stdout + submit.stdout[-5000:] + submit.stderr[-3000:])
    assert submit.returncode == 0

    # the mirror holds the study: records, checkpoints and circuits of every trial, the report, the spec
    single, _, _ = smoke_study
    names = sorted(p.parent.name for p in (single / "trials").glob("*/trial.json"))
    remote = mirror / "smoke"
    assert sorted(p.parent.name for p in (remote / "trials").glob("*/trial.json")) == names
    assert all(any((remote / "trials" / n / "checkpoints").glob("step-*/state.safetensors")) for n in names)
    assert (remote / "report" / "report.html").is_file() and (remote / "study.yaml").is_file()
    assert any((remote / "ray" / "smoke").iterdir())  # Ray wrote its experiment state to the URI itself
    nodes = {json.loads((remote / "trials" / n / "placement.json").read_text())["node_id"] for n in names}
    assert len(nodes) == 2, nodes  # two trials at a time, one CPU per node: both nodes ran trials
    for name in names:
        there = json.loads((single / "trials" / name / "trial.json").read_text())
        here = json.loads((remote / "trials" / name / "trial.json").read_text())
        assert here["val_loss"] == there["val_loss"], name  # bit-identical training
        assert {t: (c["status"], c["edges"]) for t, c in here["circuits"].items()} == \
            {t: (c["status"], c["edges"]) for t, c in there["circuits"].items()}

    # MLflow: nothing without the login or under another Host name; with it, the study's runs
    api = f"{uri}/api/2.0/mlflow/experiments/get-by-name"
    assert requests.get(api, params={"experiment_name": "smoke"}, timeout=30).status_code == 401
    spoofed = requests.get(api, params={"experiment_name": "smoke"}, auth=(MLFLOW_USER, MLFLOW_PASSWORD),
                           headers={"Host": "mlflow.example.com"}, timeout=30)
    assert spoofed.status_code == 403
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", MLFLOW_USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", MLFLOW_PASSWORD)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("smoke")
    runs = client.search_runs([experiment.experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags and r.data.tags["kind"] != "lr_search"]
    assert len(children) == 3 and all(r.info.status == "FINISHED" for r in children)
    assert any(a.path == "trial.json" for a in client.list_artifacts(children[0].info.run_id))
