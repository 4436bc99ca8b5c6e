#!/usr/bin/env bash
# Install everything the tests need (idempotent: DCMTK, Orthanc, dicom3tools, Chromium, the test
# dependency group), then run the whole test suite; arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec .venv/bin/python -m pytest "$@"
