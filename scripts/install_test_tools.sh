#!/usr/bin/env bash
# Install the system tools some tests need but pip cannot provide:
#   systemd-analyze  (Debian package "systemd")    for tests/test_systemd_unit.py and tests/test_install.py
#   logrotate        (Debian package "logrotate")  for tests/test_logrotate.py
#
# Idempotent, quiet and non-interactive. It always exits 0: on a machine where it cannot
# install (not root, no apt-get) the tests skip with a reason, except under CI=true where
# the tests turn a missing tool into a failure.
set -u

log() { printf 'install_test_tools: %s\n' "$*"; }

# command package
TOOLS="systemd-analyze:systemd logrotate:logrotate"

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }

missing=""
for pair in $TOOLS; do
    cmd=${pair%%:*}
    pkg=${pair#*:}
    if have "$cmd"; then
        log "$cmd present"
    else
        missing="$missing $pkg"
    fi
done

if [ -z "$missing" ]; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    log "missing packages:$missing; cannot install them (need root and apt-get); their tests will skip"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
# Installing the "systemd" package into a container does not start or replace PID 1; it only
# adds the binaries (systemd-analyze among them) and unit files. "logrotate" adds its binary and
# a daily timer that does nothing without systemd as PID 1.
apt-get update -qq >/dev/null 2>&1
# shellcheck disable=SC2086  # the package list is meant to split
if apt-get install -y -qq --no-install-recommends $missing >/dev/null 2>&1; then
    log "installed Debian packages:$missing"
else
    log "apt-get install$missing failed; their tests will skip (or fail under CI=true)"
fi
exit 0
