#!/usr/bin/env bash
# Readiness check for TensorFlow Serving: succeeds when every model named in models.config has a
# version in state AVAILABLE. TF Serving's REST model status answers 200 even while a model is still
# loading, so the state itself is checked. Pure bash (/dev/tcp): the official image has no curl.
#
#   readiness.sh [models.config] [rest port]     (defaults: /config/models.config, 8501)
set -euo pipefail
config=${1:-/config/models.config}
port=${2:-8501}
# comments dropped first (a commented-out model is not served); names in double or single quotes
names=$( (sed -E 's/#.*$//' "$config" | grep -oE "(^|[[:space:]{])name:[[:space:]]*(\"[^\"]+\"|'[^']+')" || true) \
  | sed -E "s/.*[\"']([^\"']+)[\"']\$/\1/")
if [ -z "$names" ]; then
  echo "readiness: no model names in $config" >&2
  exit 1
fi
for name in $names; do
  exec 3<>"/dev/tcp/127.0.0.1/$port"
  printf 'GET /v1/models/%s HTTP/1.0\r\nHost: localhost\r\n\r\n' "$name" >&3
  if ! grep -q '"AVAILABLE"' <&3; then
    exec 3>&-
    echo "readiness: model $name has no AVAILABLE version" >&2
    exit 1
  fi
  exec 3>&-
done
