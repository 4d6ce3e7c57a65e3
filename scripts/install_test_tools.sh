#!/usr/bin/env bash
# Install the system tools some tests need but pip cannot provide:
#   systemd-analyze  (Debian package "systemd")    for tests/test_systemd_unit.py and tests/test_install.py;
#   logrotate        (Debian package "logrotate")  for tests/test_logrotate.py;
#   chromium         (Debian package "chromium")   for tests/test_dashboard.py (headless, driven over DevTools);
#   promtool and prometheus  (binaries from Debian package "prometheus") for tests/test_prometheus.py;
#   curl, jq, sqlite3, ps  (Debian packages "curl", "jq", "sqlite3", "procps") for tests/test_operations_doc.py
#                    (docs/OPERATIONS.md's commands use them as an operator does).
#
# Idempotent, quiet and non-interactive. It always exits 0: on a machine where it cannot
# install (not root, no apt-get) the tests skip with a reason, except under CI=true where
# the tests turn a missing tool into a failure.
set -u

log() { printf 'install_test_tools: %s\n' "$*"; }

can_install() { [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; }

updated=0
apt_update_once() {
    [ "$updated" -eq 1 ] && return 0
    apt-get update -qq >/dev/null 2>&1 && updated=1
}

export DEBIAN_FRONTEND=noninteractive

install_systemd_analyze() {
    if command -v systemd-analyze >/dev/null 2>&1; then
        log "systemd-analyze present ($(systemd-analyze --version | head -n1))"
        return 0
    fi
    if ! can_install; then
        log "systemd-analyze missing and cannot install it (need root and apt-get); its tests will skip"
        return 0
    fi
    # Installing the "systemd" package into a container does not start or replace PID 1; it only
    # adds the binaries (systemd-analyze among them) and unit files.
    if apt_update_once \
        && apt-get install -y -qq --no-install-recommends systemd >/dev/null 2>&1 \
        && command -v systemd-analyze >/dev/null 2>&1; then
        log "installed Debian package systemd ($(systemd-analyze --version | head -n1))"
    else
        log "apt-get install systemd failed; systemd-analyze tests will skip (or fail under CI=true)"
    fi
}

# The tool's path: on PATH, or in /usr/sbin (logrotate lives there, outside a normal user's PATH).
tool_path() {
    command -v "$1" 2>/dev/null && return 0
    [ -x "/usr/sbin/$1" ] && { echo "/usr/sbin/$1"; return 0; }
    return 1
}

# install_apt_tool COMMAND DEBIAN-PACKAGE: install the package when the command is missing and we can.
# "logrotate" adds its binary and a timer; "chromium" is Debian's own build (the tests never download a
# browser) and pulls in fontconfig and a font.
install_apt_tool() {
    local cmd=$1 pkg=$2
    if tool_path "$cmd" >/dev/null; then
        log "$cmd present ($("$(tool_path "$cmd")" --version 2>/dev/null | head -n1))"
        return 0
    fi
    if ! can_install; then
        log "$cmd missing and cannot install it (need root and apt-get); its tests will skip"
        return 0
    fi
    if apt_update_once \
        && apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null 2>&1 && tool_path "$cmd" >/dev/null; then
        log "installed Debian package $pkg ($("$(tool_path "$cmd")" --version 2>/dev/null | head -n1))"
    else
        log "apt-get install $pkg failed; $cmd tests will skip (or fail under CI=true)"
    fi
}

install_prometheus_binaries() {
    if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
        log "promtool and prometheus present ($(promtool --version 2>&1 | head -n1))"
        return 0
    fi
    if ! can_install; then
        log "promtool/prometheus missing and cannot install them (need root and apt-get); their tests will skip"
        return 0
    fi
    # Only the two binaries (Go, they need nothing but libc) out of Debian's "prometheus" package, into
    # /usr/local/bin (or $PROMETHEUS_INSTALL_DIR): installing the package would also enable and start a
    # Prometheus server on a machine that runs systemd.  The tests start their own on 127.0.0.1.
    local tmp dest="${PROMETHEUS_INSTALL_DIR:-/usr/local/bin}"
    if ! tmp=$(mktemp -d); then
        log "mktemp failed; promtool/prometheus tests will skip (or fail under CI=true)"
        return 0
    fi
    if apt_update_once \
        && (cd "$tmp" && apt-get download -qq prometheus >/dev/null 2>&1) \
        && dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/x" \
        && install -m 0755 "$tmp/x/usr/bin/promtool" "$tmp/x/usr/bin/prometheus" "$dest/" \
        && command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
        log "installed promtool and prometheus from Debian package prometheus ($(promtool --version 2>&1 | head -n1))"
    else
        log "promtool/prometheus download from Debian package prometheus failed; their tests will skip" \
            "(or fail under CI=true)"
    fi
    rm -rf "$tmp"
}

install_systemd_analyze
install_apt_tool logrotate logrotate
install_apt_tool chromium chromium
install_prometheus_binaries
install_apt_tool curl curl
install_apt_tool jq jq
install_apt_tool sqlite3 sqlite3
install_apt_tool ps procps
exit 0
