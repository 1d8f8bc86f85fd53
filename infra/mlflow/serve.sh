#!/usr/bin/env bash
# The cluster's MLflow tracking server: PostgreSQL for runs, an object store for artifacts. It binds
# MLFLOW_HOST (default 127.0.0.1: reach it through port forwarding, docs/cluster.md); inside Kubernetes
# the manifest sets 0.0.0.0 behind a ClusterIP Service, which is reachable only inside the cluster.
#   MLFLOW_BACKEND_URI   postgresql://mlflow:<password>@<host>:5432/mlflow   (required)
#   MLFLOW_ARTIFACTS     s3://<bucket>/mlflow                               (required)
# S3 credentials come the usual boto3 ways: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (mlflow-k8s.yaml sets
# them from the aws-credentials Secret) or the instance profile (the VM head, infra/cluster/iam/).
set -euo pipefail
: "${MLFLOW_BACKEND_URI:?set MLFLOW_BACKEND_URI to the PostgreSQL URI}"
: "${MLFLOW_ARTIFACTS:?set MLFLOW_ARTIFACTS to the object-store artifact root}"
exec mlflow server \
    --backend-store-uri "$MLFLOW_BACKEND_URI" \
    --artifacts-destination "$MLFLOW_ARTIFACTS" \
    --serve-artifacts \
    --host "${MLFLOW_HOST:-127.0.0.1}" --port "${MLFLOW_PORT:-5000}" \
    --workers "${MLFLOW_WORKERS:-4}"
