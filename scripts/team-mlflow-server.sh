#!/usr/bin/env bash
# The team's MLflow tracking server and model registry: PostgreSQL as backend store, a shared
# artifact root served through the server (clients need no access to the artifact directory).
#
#   MLFLOW_PG_URL        postgresql+psycopg2://USER@HOST:5432/DB (psycopg2 is the driver memkfac installs)
#                        default postgresql+psycopg2://postgres@127.0.0.1:5432/mlflow
#   MLFLOW_ARTIFACTS     shared artifact directory or object-store URI (default $MEMKFAC_HOME/mlflow/team-artifacts)
#   MLFLOW_HOST/PORT     where it listens (default 0.0.0.0:5000)
#
# Every user then sets MLFLOW_TRACKING_URI=http://<host>:<port> (it overrides mlflow.tracking_uri of the
# pipeline config). The database must exist: `createdb -h HOST -U USER DB` once.
set -euo pipefail
: "${MLFLOW_PG_URL:=postgresql+psycopg2://postgres@127.0.0.1:5432/mlflow}"
: "${MLFLOW_ARTIFACTS:=${MEMKFAC_HOME:-.memkfac}/mlflow/team-artifacts}"
: "${MLFLOW_HOST:=0.0.0.0}"
: "${MLFLOW_PORT:=5000}"
PYTHON="${PYTHON:-$(dirname "$0")/../.venv/bin/python}"
case "$MLFLOW_ARTIFACTS" in *://*) ;; *) mkdir -p "$MLFLOW_ARTIFACTS" ;; esac
exec "$PYTHON" -m mlflow server \
  --backend-store-uri "$MLFLOW_PG_URL" \
  --artifacts-destination "$MLFLOW_ARTIFACTS" \
  --serve-artifacts \
  --host "$MLFLOW_HOST" --port "$MLFLOW_PORT"
