#!/usr/bin/env bash
# Starts the MLflow server (serve.sh) on the VM head, from head_start_ray_commands in
# infra/cluster/ray-cluster.yaml, and fails `ray up` loudly if it does not serve. It binds the head's
# private address, the one the GPU nodes reach the head by (Ray's node address, $RAY_HEAD_IP on the
# workers): the cluster security group admits only its own members, so no other host reaches it, and
# basic auth guards it inside the cluster. The settings come from two files the launcher copies from the
# operator's ~/.circuitscale/ (docs/cluster.md 3a), read here rather than at `ray up` time on the laptop:
#   mlflow.env         MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD (every node's Ray processes
#                      read these too; here they also make the server's admin account)
#   mlflow-server.env  MLFLOW_BACKEND_URI, MLFLOW_ARTIFACTS (the head only reads them)
set -euo pipefail
settings=${CIRCUITSCALE_SETTINGS:-/home/ray/.circuitscale}   # where file_mounts puts them
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
for file in mlflow.env mlflow-server.env; do
    [[ -r "$settings/$file" ]] || { echo "start-head.sh: $settings/$file is missing (docs/cluster.md 3a)" >&2; exit 1; }
done
set -a
# shellcheck source=/dev/null
. "$settings/mlflow.env"
# shellcheck source=/dev/null
. "$settings/mlflow-server.env"
set +a
: "${MLFLOW_TRACKING_USERNAME:?not set in $settings/mlflow.env}"
: "${MLFLOW_TRACKING_PASSWORD:?not set in $settings/mlflow.env}"
: "${MLFLOW_BACKEND_URI:?not set in $settings/mlflow-server.env}"
: "${MLFLOW_ARTIFACTS:?not set in $settings/mlflow-server.env}"

port=${MLFLOW_PORT:-5000}
address=$(python -c 'import ray.util; print(ray.util.get_node_ip_address())')
export MLFLOW_HOST="$address" MLFLOW_PORT="$port"
# The Host headers clients send: the trials and the driver use http://<private address>:5000; the UI
# comes through an SSH tunnel to localhost:5000 on the operator's machine.
export MLFLOW_ALLOWED_HOSTS="$address:$port,localhost:$port,127.0.0.1:$port"
export MLFLOW_AUTH_ADMIN_USERNAME="$MLFLOW_TRACKING_USERNAME" MLFLOW_AUTH_ADMIN_PASSWORD="$MLFLOW_TRACKING_PASSWORD"

# A second `ray up` reruns this: stop the server this script started last time. It runs in a session of
# its own (setsid), so the recorded id is its process group: mlflow and its uvicorn workers.
state=${TMPDIR:-/tmp}
pidfile=$state/mlflow-server.pgid log=$state/mlflow.log
if [[ -f "$pidfile" ]] && kill -0 -- "-$(cat "$pidfile")" 2>/dev/null; then
    group=$(cat "$pidfile")
    kill -- "-$group"
    for _ in $(seq 30); do
        kill -0 -- "-$group" 2>/dev/null || break
        sleep 1
    done
    if kill -0 -- "-$group" 2>/dev/null; then kill -KILL -- "-$group"; fi
fi
setsid nohup bash "$here/serve.sh" > "$log" 2>&1 < /dev/null &
echo $! > "$pidfile"

# /health answers whatever the Host header and without credentials, so also make one authenticated API
# call by the address the nodes use: it fails on a wrong --allowed-hosts (403) or account (401).
url="http://$address:$port"
for _ in $(seq 90); do
    # the credentials go to curl on stdin (-K -), not on its command line
    if printf 'user = "%s:%s"\n' "$MLFLOW_TRACKING_USERNAME" "$MLFLOW_TRACKING_PASSWORD" |
            curl -fs --max-time 60 -o /dev/null -K - "$url/api/2.0/mlflow/experiments/search?max_results=1"; then
        echo "MLflow at $url (log: $log)"
        exit 0
    fi
    kill -0 -- "-$(cat "$pidfile")" 2>/dev/null || break
    sleep 2
done
echo "start-head.sh: MLflow did not serve at $url; the end of $log:" >&2
tail -n 40 "$log" >&2
exit 1
