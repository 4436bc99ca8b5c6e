#!/usr/bin/env bash
# Idempotent machine setup: Debian packages the node and its tests need, then a venv with the project.
set -euo pipefail
cd "$(dirname "$0")/.."
APT_PKGS=(orthanc dcmtk dicom3tools libtcmalloc-minimal4 openssl chromium chromium-driver)
missing=()
for p in "${APT_PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
  # The package starts a system Orthanc on 4242/8042; the node and tests run their own.
  $SUDO systemctl disable --now orthanc >/dev/null 2>&1 || $SUDO service orthanc stop >/dev/null 2>&1 || true
fi
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.installed-$(cat pyproject.toml | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e . --group test
  rm -f .venv/.installed-*; touch "$stamp"
fi
