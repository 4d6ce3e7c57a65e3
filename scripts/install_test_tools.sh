#!/usr/bin/env bash
# Install the system tools some tests need but pip cannot provide:
#   systemd-analyze  (Debian package "systemd") for tests/test_systemd_unit.py.
#
# Idempotent, quiet and non-interactive. It always exits 0: on a machine where it cannot
# install (not root, no apt-get) the tests skip with a reason, except under CI=true where
# tests/test_systemd_unit.py turns a missing tool into a failure.
set -u

log() { printf 'install_test_tools: %s\n' "$*"; }

if command -v systemd-analyze >/dev/null 2>&1; then
    log "systemd-analyze present ($(systemd-analyze --version | head -n1))"
    exit 0
fi

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    log "systemd-analyze missing and cannot install it (need root and apt-get); its tests will skip"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
# Installing the "systemd" package into a container does not start or replace PID 1; it only
# adds the binaries (systemd-analyze among them) and unit files.
if apt-get update -qq >/dev/null 2>&1 \
    && apt-get install -y -qq --no-install-recommends systemd >/dev/null 2>&1 \
    && command -v systemd-analyze >/dev/null 2>&1; then
    log "installed Debian package systemd ($(systemd-analyze --version | head -n1))"
else
    log "apt-get install systemd failed; systemd-analyze tests will skip (or fail under CI=true)"
fi
exit 0
