#!/usr/bin/env bash
# A local Orthanc as the PACS for trying the node: DICOM 4242 (AE ORTHANC), web 8042, forwarding
# every stable CT series to the node (deploy/orthanc/). Runs as the unprivileged `orthanc` user.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p var/orthanc
if [ "$(id -u)" -eq 0 ] && id orthanc >/dev/null 2>&1; then
  chown -R orthanc:orthanc var/orthanc
  exec setpriv --reuid=orthanc --regid=orthanc --init-groups /usr/sbin/Orthanc deploy/orthanc/orthanc.json
fi
exec /usr/sbin/Orthanc deploy/orthanc/orthanc.json
