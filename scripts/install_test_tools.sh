#!/usr/bin/env bash
# Install the system tools some tests need but pip cannot provide:
#   systemd-analyze  (Debian package "systemd")    for tests/test_systemd_unit.py and tests/test_install.py
#   logrotate        (Debian package "logrotate")  for tests/test_logrotate.py
#   chromium         (Debian package "chromium")   for tests/test_dashboard.py (headless, driven over DevTools)
#   curl, jq, sqlite3, ps  (Debian packages "curl", "jq", "sqlite3", "procps")  for tests/test_operations_doc.py
#                    (the operations manual's commands use them as an operator would)
#
# Idempotent, quiet and non-interactive. It always exits 0: on a machine where it cannot
# install (not root, no apt-get) the tests skip with a reason, except under CI=true where
# the tests turn a missing tool into a failure.
set -u

log() { printf 'install_test_tools: %s\n' "$*"; }

# The tool's path: on PATH, or in /usr/sbin (logrotate lives there, outside a normal user's PATH).
tool_path() {
    command -v "$1" 2>/dev/null && return 0
    [ -x "/usr/sbin/$1" ] && { echo "/usr/sbin/$1"; return 0; }
    return 1
}

version() { "$(tool_path "$1")" --version 2>&1 | head -n1; }

updated=no

# ensure COMMAND DEBIAN-PACKAGE: install the package when the command is missing and we can.
ensure() {
    local cmd=$1 pkg=$2
    if tool_path "$cmd" >/dev/null; then
        log "$cmd present ($(version "$cmd"))"
        return 0
    fi
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        log "$cmd missing and cannot install it (need root and apt-get); its tests will skip"
        return 0
    fi
    export DEBIAN_FRONTEND=noninteractive
    if [ "$updated" = no ]; then
        apt-get update -qq >/dev/null 2>&1
        updated=yes
    fi
    # Installing the "systemd" package into a container does not start or replace PID 1; it only adds
    # the binaries (systemd-analyze among them) and unit files. "logrotate" adds its binary and a timer.
    # "chromium" is Debian's own build (the tests never download a browser); it pulls in fontconfig and a font.
    if apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null 2>&1 && tool_path "$cmd" >/dev/null; then
        log "installed Debian package $pkg ($(version "$cmd"))"
    else
        log "apt-get install $pkg failed; $cmd tests will skip (or fail under CI=true)"
    fi
}

ensure systemd-analyze systemd
ensure logrotate logrotate
ensure chromium chromium
ensure curl curl
ensure jq jq
ensure sqlite3 sqlite3
ensure ps procps
exit 0
