#!/usr/bin/env bash
# The README's first command: install the SDK + trainer into .venv, then fine-tune a tiny CLIP on the bundled
# example data on this machine's CPU (no cluster, no S3). About 1-3 minutes after the install.
#   scripts/quickstart.sh [extra kubetune-run args, e.g. --output-dir DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh sdk,trainer
exec .venv/bin/kubetune run --local examples/quickstart.yaml "$@"
