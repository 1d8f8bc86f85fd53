#!/usr/bin/env bash
# The cluster's MLflow tracking server: PostgreSQL for runs, an object store for artifacts, and MLflow's
# basic-auth app in front of both (every API call and the UI need a user and password; only /health is
# open). It binds MLFLOW_HOST (default 127.0.0.1): on the VM head infra/mlflow/start-head.sh sets the
# head's private address (reachable only from the cluster's security group); inside Kubernetes the
# manifest sets 0.0.0.0 behind a ClusterIP Service, which is reachable only inside the cluster.
#   MLFLOW_BACKEND_URI          postgresql://mlflow:<password>@<host>:5432/mlflow   (required)
#   MLFLOW_ARTIFACTS            s3://<bucket>/mlflow                               (required)
#   MLFLOW_ALLOWED_HOSTS        the Host headers clients send, host:port, comma-separated (required):
#                               MLflow >= 3.5 answers 403 to any other Host on every API call while
#                               /health still passes, so a missing name looks like a healthy server
#   MLFLOW_AUTH_ADMIN_USERNAME  the admin user the auth app creates on its first start (required);
#   MLFLOW_AUTH_ADMIN_PASSWORD  at least 12 characters. Clients send the same pair as
#                               MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (docs/cluster.md).
# S3 credentials come the usual boto3 ways: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (mlflow-k8s.yaml sets
# them from the aws-credentials Secret) or the instance profile (the VM head, infra/cluster/iam/).
set -euo pipefail
: "${MLFLOW_BACKEND_URI:?set MLFLOW_BACKEND_URI to the PostgreSQL URI}"
: "${MLFLOW_ARTIFACTS:?set MLFLOW_ARTIFACTS to the object-store artifact root}"
: "${MLFLOW_ALLOWED_HOSTS:?set MLFLOW_ALLOWED_HOSTS to the host:port names clients use (e.g. mlflow.circuitscale.svc:5000)}"
: "${MLFLOW_AUTH_ADMIN_USERNAME:?set MLFLOW_AUTH_ADMIN_USERNAME (the MLflow admin user)}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?set MLFLOW_AUTH_ADMIN_PASSWORD (12 characters or more)}"
export MLFLOW_AUTH_ADMIN_USERNAME MLFLOW_AUTH_ADMIN_PASSWORD

# The auth app's tables (users, permissions, their own alembic_version_auth) go into the same database
# as the runs, so users survive a restart of the pod or the head. Its config file (MLFLOW_AUTH_CONFIG_PATH)
# has no environment interpolation, so it is written here, readable by this user only; '%' is doubled
# because configparser treats it as interpolation syntax.
auth_config=$(mktemp "${TMPDIR:-/tmp}/mlflow-auth-XXXXXX")
cat > "$auth_config" <<EOF
[mlflow]
# Any signed-in user may read every experiment; writing needs the admin or a grant.
default_permission = READ
database_uri = ${MLFLOW_BACKEND_URI//%/%%}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
export MLFLOW_AUTH_CONFIG_PATH="$auth_config"
# The auth app's CSRF key must be the same in every worker process; one server runs, so a fresh key per
# start (inherited by its workers) only invalidates UI forms left open across a restart.
MLFLOW_FLASK_SERVER_SECRET_KEY="${MLFLOW_FLASK_SERVER_SECRET_KEY:-$(python -c 'import secrets; print(secrets.token_hex(32))')}"
export MLFLOW_FLASK_SERVER_SECRET_KEY

exec mlflow server \
    --app-name basic-auth \
    --allowed-hosts "$MLFLOW_ALLOWED_HOSTS" \
    --backend-store-uri "$MLFLOW_BACKEND_URI" \
    --artifacts-destination "$MLFLOW_ARTIFACTS" \
    --serve-artifacts \
    --host "${MLFLOW_HOST:-127.0.0.1}" --port "${MLFLOW_PORT:-5000}" \
    --workers "${MLFLOW_WORKERS:-4}"
