#!/usr/bin/env bash
# Install everything this node needs (idempotent), then run it on ./config.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/triage-node --config "${TRIAGE_CONFIG:-config.yaml}" serve "$@"
