#!/usr/bin/env bash
# Stop the single-node SLURM that slurm_up.sh started, by the PIDs it recorded (never by name: a
# machine's own SLURM or MariaDB is left alone).
set -uo pipefail
STATE=${DDIL_SLURM_STATE:-/var/lib/ddil-slurm}
[ -f "$STATE/pids" ] || { echo "slurm_down: nothing recorded in $STATE/pids"; exit 0; }
scancel --user="$(id -un)" >/dev/null 2>&1 || true
tac "$STATE/pids" | while read -r name pid; do      # the reverse order of start-up
  kill "$pid" 2>/dev/null || continue
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  echo "slurm_down: stopped $name ($pid)"
done
rm -f "$STATE/pids"
