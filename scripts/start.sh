#!/usr/bin/env bash
# Install what the node needs to run (idempotent; no test tools, no Orthanc), then run it:
# `triage-node serve` with the given arguments (--config PATH, --port N, --ae-title T, --debug);
# the config is --config, else $TRIAGE_CONFIG, else ./config.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh node
exec .venv/bin/triage-node serve "$@"
