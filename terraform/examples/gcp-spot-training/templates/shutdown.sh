#!/bin/bash
# GCE shutdown script (metadata "shutdown-script"). Compute Engine runs it
# when the VM is stopped, deleted or - for Spot VMs - preempted, about 30 s
# before power-off. It forwards the stop to the trainer as SIGTERM (which
# cloudckpt's preemption="auto" treats as a preemption: commit a final
# checkpoint, then exit) and waits up to 25 s for it to finish.
#
# Plain file, not a Terraform template: shell syntax is used as is. The
# CLOUDCKPT_* environment overrides exist for tests; GCE sets none of them.

UNIT="${CLOUDCKPT_UNIT:-cloudckpt-train.service}"
PID_FILE="${CLOUDCKPT_PID_FILE:-/run/cloudckpt/trainer.pid}"
GRACE_SECONDS="${CLOUDCKPT_GRACE_SECONDS:-25}"

log() {
  logger -t cloudckpt-shutdown "$*" 2>/dev/null || true
  echo "cloudckpt-shutdown: $*"
}

# Preferred path: let systemd stop the unit. It sends KillSignal (SIGTERM) to
# the trainer, waits TimeoutStopSec (25 s) and does not restart it.
if systemctl is-active --quiet "$UNIT" 2>/dev/null; then
  log "stopping $UNIT (SIGTERM to the trainer, up to $GRACE_SECONDS s)"
  timeout "$((GRACE_SECONDS + 3))" systemctl stop "$UNIT"
  log "$UNIT stopped (exit status $?)"
  exit 0
fi

# Fallback: a trainer started outside the unit that wrote its PID file.
pid="$(cat "$PID_FILE" 2>/dev/null || true)"
if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then
  log "trainer is not running; nothing to forward"
  exit 0
fi

log "forwarding SIGTERM to trainer (pid $pid)"
kill -TERM "$pid"

for _ in $(seq "$GRACE_SECONDS"); do
  if ! kill -0 "$pid" 2>/dev/null; then
    log "trainer exited"
    exit 0
  fi
  sleep 1
done

log "trainer still running after $GRACE_SECONDS s; the last committed checkpoint stays the restore point"
exit 0
