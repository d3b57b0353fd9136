#!/usr/bin/env bash
# The whole test suite from a fresh machine: install everything, lint, start the real infrastructure
# (one-machine Kubernetes, S3, Prometheus: built and cached on first use), run every test.
# A cluster this script started is stopped at the end unless KUBETUNE_KEEP_CLUSTER=1.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh operator,sdk,trainer,onnx,dev
.venv/bin/ruff check .
.venv/bin/mypy -p kubetune -p kubetune_trainer -p tests.cluster
was_up=0
if .venv/bin/python -m tests.cluster is-up; then was_up=1; fi
.venv/bin/python -m tests.cluster up
if [ "$was_up" = 0 ] && [ "${KUBETUNE_KEEP_CLUSTER:-0}" != 1 ]; then
  trap '.venv/bin/python -m tests.cluster down' EXIT
fi
.venv/bin/python -m pytest "$@"
