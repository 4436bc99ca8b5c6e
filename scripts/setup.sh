#!/usr/bin/env bash
# Idempotent machine setup, by purpose:
#   setup.sh [node]  what the node needs to run: .venv with the project (start.sh); no TensorFlow:
#                    the model runs in LiteRT from its model.tflite (the `tensorflow` group, which
#                    `test` includes, is only needed for training or a model without one)
#   setup.sh demo    + DCMTK and Orthanc, for the README's demo (demo-orthanc.sh)
#   setup.sh test    + what the tests need: dicom3tools, openssl, Chromium and its driver,
#                    tcmalloc (bench), PostgreSQL (tests/pg.py), and the test dependency group
#                    incl. Playwright (test.sh)
# Services: installing the `orthanc` package starts Debian's own Orthanc on 4242/8042 (and
# `postgresql` a cluster on 5432). Only when this run installed that package (so the service is
# one we started) is it stopped and disabled; an Orthanc or PostgreSQL that was already
# installed, maybe the hospital's, is never touched.
set -euo pipefail
cd "$(dirname "$0")/.."
purpose=${1:-node}
case "$purpose" in
  node) apt_pkgs=() ;;
  demo) apt_pkgs=(dcmtk orthanc) ;;
  test) apt_pkgs=(dcmtk orthanc dicom3tools openssl chromium chromium-driver libtcmalloc-minimal4
                  postgresql) ;;
  *) echo "usage: $0 [node|demo|test]" >&2; exit 2 ;;
esac

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
# Debian's python3 makes venvs only with python3-venv (ensurepip) installed.
if [ ! -x .venv/bin/python ] && ! "$PY" -c 'import ensurepip' >/dev/null 2>&1; then
  apt_pkgs+=(python3-venv)
fi

missing=()
for p in "${apt_pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "setup: installing ${missing[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
  if [[ " ${missing[*]} " == *" orthanc "* ]]; then
    # We just installed it, so its service is ours: the demo and the tests run their own Orthanc.
    echo "setup: stopping and disabling the orthanc service this install started" >&2
    $SUDO systemctl disable --now orthanc >/dev/null 2>&1 \
      || $SUDO service orthanc stop >/dev/null 2>&1 || true
  fi
  if [[ " ${missing[*]} " == *" postgresql "* ]]; then
    # Likewise Debian's own cluster: the tests start a throwaway one of their own (tests/pg.py).
    echo "setup: stopping and disabling the postgresql service this install started" >&2
    $SUDO systemctl disable --now postgresql >/dev/null 2>&1 \
      || $SUDO service postgresql stop >/dev/null 2>&1 || true
  fi
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
hash=$(sha256sum pyproject.toml | cut -c1-16)
full=.venv/.installed-$hash        # the project with the test group (a superset of the node's)
node_only=.venv/.installed-$hash-node
if [ "$purpose" = test ]; then
  if [ ! -f "$full" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e . --group test
    rm -f .venv/.installed-*; touch "$full"
  fi
elif [ ! -f "$full" ] && [ ! -f "$node_only" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e .
  rm -f .venv/.installed-*; touch "$node_only"
fi
