#!/usr/bin/env bash
# The README's demo PACS: a local Orthanc (DICOM ORTHANC@127.0.0.1:4242, web 8042) with the
# configuration and Lua script in deploy/orthanc/, forwarding every stable CT series to the node
# (TRIAGE@127.0.0.1:11112). Start the node first: Orthanc does not retry a failed forward.
#
#   scripts/demo-orthanc.sh [start]  start it in the background; returns once it answers HTTP,
#                                    else exits 1 with the reason and the end of its log
#   scripts/demo-orthanc.sh stop     stop the Orthanc this script started
#   scripts/demo-orthanc.sh status   exit 0 if it runs, 3 if not
#
# Installs DCMTK and Orthanc when missing (scripts/setup.sh demo). Never touches another Orthanc:
# if 4242 or 8042 is taken (e.g. Debian's own orthanc service) it says by whom and stops.
# As root, Orthanc runs as the unprivileged `orthanc` user, which cannot enter the node's
# owner-only var/ (0700) nor a clone under /root, so its storage, log and generated config live
# in /var/lib/triage-node-demo (owned by `orthanc`); otherwise in var/demo-orthanc.
# Environment: DEMO_ORTHANC_DIR, DEMO_ORTHANC_DICOM_PORT (4242), DEMO_ORTHANC_HTTP_PORT (8042),
# DEMO_NODE_PORT (11112: the node's node.port).
set -euo pipefail
cd "$(dirname "$0")/.."
umask 022
repo=$(pwd)
action=${1:-start}
dicom_port=${DEMO_ORTHANC_DICOM_PORT:-4242}
http_port=${DEMO_ORTHANC_HTTP_PORT:-8042}
node_port=${DEMO_NODE_PORT:-11112}
orthanc_exe=/usr/sbin/Orthanc
if [ "$(id -u)" -eq 0 ]; then
  dir=${DEMO_ORTHANC_DIR:-/var/lib/triage-node-demo}
  as_orthanc=(setpriv --reuid=orthanc --regid=orthanc --init-groups)
else
  dir=${DEMO_ORTHANC_DIR:-$repo/var/demo-orthanc}
  as_orthanc=()
fi
pidfile=$dir/orthanc.pid
log=$dir/orthanc.log

die() {
  echo "demo-orthanc: $*" >&2
  exit 1
}

running_pid() { # the pid of the Orthanc this script started, if it still runs
  local pid
  pid=$(cat "$pidfile" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = Orthanc ] && echo "$pid"
}

port_holder() { # "" when TCP port $1 is free on 127.0.0.1, else who holds it
  if python3 -c 'import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))' "$1" 2>/dev/null; then
    return 0
  fi
  local who
  who=$(ss -Hltnp "sport = :$1" 2>/dev/null \
    | sed -n 's/.*users:(("\([^"]*\)",pid=\([0-9]*\).*/\1 (pid \2)/p' | head -n 1) || true
  echo "${who:-another process}"
}

http_up() {
  python3 -c 'import sys, urllib.request
urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/system", timeout=2).read()' \
    "$http_port" >/dev/null 2>&1
}

show_log() {
  for f in "$log" "$dir/stdout.log"; do
    [ -s "$f" ] && { echo "--- last lines of $f:"; tail -n 20 "$f"; }
  done >&2
  return 0
}

where() {
  echo "demo Orthanc (pid $1): DICOM ORTHANC@127.0.0.1:$dicom_port, web http://127.0.0.1:$http_port/app/explorer.html"
  echo "  forwards stable CT series to TRIAGE@127.0.0.1:$node_port; files and log in $dir"
  echo "  stop it with: scripts/demo-orthanc.sh stop"
}

start() {
  local pid holder
  if pid=$(running_pid); then
    where "$pid"
    return 0
  fi
  if [ ! -x "$orthanc_exe" ] || [ ! -x /usr/bin/storescu ]; then
    echo "demo-orthanc: installing Orthanc and DCMTK (scripts/setup.sh demo)" >&2
    bash scripts/setup.sh demo || die "scripts/setup.sh demo failed: cannot install Orthanc/DCMTK"
  fi
  [ -x "$orthanc_exe" ] || die "$orthanc_exe not found (apt-get install orthanc)"
  for spec in "$dicom_port:DICOM:DEMO_ORTHANC_DICOM_PORT" "$http_port:HTTP:DEMO_ORTHANC_HTTP_PORT"; do
    IFS=: read -r port kind var <<<"$spec"
    holder=$(port_holder "$port")
    [ -z "$holder" ] || die "port $port ($kind) is already in use by $holder. This demo runs its" \
      "own Orthanc and leaves others alone: stop that process if it is yours and not needed," \
      "or set $var to a free port (and the node's peers: port to match)."
  done
  if [ ${#as_orthanc[@]} -gt 0 ]; then
    id orthanc >/dev/null 2>&1 || die "no user 'orthanc' (the orthanc package creates it)"
    install -d -o orthanc -g orthanc -m 0700 "$dir"
    "${as_orthanc[@]}" test -w "$dir" -a -x "$dir" \
      || die "the orthanc user cannot write $dir (a parent folder is closed to it, e.g. 0700);" \
        "set DEMO_ORTHANC_DIR to a folder under one it can enter"
  else
    mkdir -p "$dir"
  fi
  cp deploy/orthanc/forward-to-triage.lua "$dir/forward-to-triage.lua"
  DIR=$dir DICOM_PORT=$dicom_port HTTP_PORT=$http_port NODE_PORT=$node_port python3 - <<'EOF'
import json, os
from pathlib import Path

d = Path(os.environ["DIR"])
config = json.loads(Path("deploy/orthanc/orthanc.json").read_text())
config.pop("_comment", None)
config.update(
    StorageDirectory=str(d / "storage"),
    IndexDirectory=str(d / "index"),
    LuaScripts=[str(d / "forward-to-triage.lua")],
    DicomPort=int(os.environ["DICOM_PORT"]),
    HttpPort=int(os.environ["HTTP_PORT"]),
)
config["DicomModalities"]["triage"]["Port"] = int(os.environ["NODE_PORT"])
(d / "orthanc.json").write_text(json.dumps(config, indent=2) + "\n")
EOF
  [ ${#as_orthanc[@]} -eq 0 ] || chown orthanc:orthanc "$dir/orthanc.json" "$dir/forward-to-triage.lua"
  rm -f "$pidfile"
  # TCP_NODELAY: Orthanc is built on DCMTK, ~10x slower on loopback without it (PEERS.md).
  TCP_NODELAY=1 nohup "${as_orthanc[@]}" "$orthanc_exe" --logfile="$log" "$dir/orthanc.json" \
    </dev/null >"$dir/stdout.log" 2>&1 &
  pid=$!
  echo "$pid" >"$pidfile"
  for _ in $(seq 60); do
    if ! kill -0 "$pid" 2>/dev/null; then
      wait "$pid" && code=0 || code=$?
      show_log
      die "Orthanc exited during start-up (exit code $code); see above and $log"
    fi
    if http_up; then
      where "$pid"
      if [ -z "$(port_holder "$node_port")" ]; then
        echo "  note: nothing listens on 127.0.0.1:$node_port yet: start the node" \
          "(scripts/start.sh) before sending, Orthanc does not retry a failed forward" >&2
      fi
      return 0
    fi
    sleep 0.5
  done
  kill "$pid" 2>/dev/null || true
  show_log
  die "Orthanc did not answer on http://127.0.0.1:$http_port/system within 30 s (stopped it)"
}

stop() {
  local pid
  if ! pid=$(running_pid); then
    echo "demo Orthanc is not running"
    rm -f "$pidfile"
    return 0
  fi
  kill -TERM "$pid"
  for _ in $(seq 60); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$pidfile"; echo "demo Orthanc stopped"; return 0; }
    sleep 0.5
  done
  die "Orthanc (pid $pid) did not stop within 30 s"
}

case "$action" in
  start) start ;;
  stop) stop ;;
  status) if pid=$(running_pid); then where "$pid"; else echo "demo Orthanc is not running"; exit 3; fi ;;
  *) echo "usage: $0 [start|stop|status]" >&2; exit 2 ;;
esac
