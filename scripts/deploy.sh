#!/usr/bin/env bash
# Upgrade an installed AlphaPulse-RL to this checkout, health-gated, with automatic rollback (issue 11 part 3).
#
#   sudo scripts/deploy.sh
#
# Steps, each stopping the upgrade when it fails:
#   1. backup      `alphapulse backup create --type full` with the running release (nothing changed yet)
#   2. install     the new release side by side: /opt/alphapulse-rl/releases/<version> (scripts/install.sh
#                  --release-only); the running release is untouched
#   3. switch      /opt/alphapulse-rl/current -> the new release, atomically (a symlink renamed over the old)
#   4. restart     systemctl restart alphapulse-trading (and try-restart alphapulse-monitor: same release)
#   5. health      `alphapulse health` must exit 0 within --health-timeout seconds
#   6. rollback    when it does not: current -> the previous release, restart, health again; exit 1
# Exit: 0 upgraded; 1 not upgraded (backup or install failed, or rolled back and healthy again);
# 2 rolled back but the old release is not healthy either (page a human); 64 bad usage.
#
# Options (every path is prefixed with --root DIR when given, like install.sh):
#   --root DIR             the installation under DIR (tests)
#   --version V            release name (default: install.sh's, from setup.cfg and git describe)
#   --venv-from VENV       passed to install.sh (offline build on an existing venv's packages)
#   --no-venv              passed to install.sh (releases without a venv: staging, and tests of this script)
#   --health-timeout S     seconds for the new release to become healthy (default 120)
#   --backup-cmd CMD       default: <current>/bin/alphapulse backup create --type full  (via the env wrapper)
#   --restart-cmd CMD      default: systemctl restart alphapulse-trading, try-restart alphapulse-monitor
#   --health-cmd CMD       default: <opt>/bin/alphapulse health   (the service's environment, the new release)
#   --keep N               releases kept after a successful upgrade (default 5; current and previous always)
# The commands run with `sh -c`; the environment variables DEPLOY_ROOT, DEPLOY_OPT (ROOT-prefixed
# /opt/alphapulse-rl), DEPLOY_RELEASE and DEPLOY_PREVIOUS are set for them.
set -euo pipefail

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOT=""
VERSION=""
VENV_FROM=""
NO_VENV=no
HEALTH_TIMEOUT=120
BACKUP_CMD=""
RESTART_CMD=""
HEALTH_CMD=""
KEEP=5

usage() { printf 'deploy.sh: %s\n' "$*" >&2; exit 64; }
say() { printf 'deploy.sh: %s\n' "$*"; }
need_arg() { [ $# -ge 2 ] && [ -n "$2" ] || usage "$1 needs a value"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --root) need_arg "$@"; ROOT=$2; shift 2 ;;
        --version) need_arg "$@"; VERSION=$2; shift 2 ;;
        --venv-from) need_arg "$@"; VENV_FROM=$2; shift 2 ;;
        --no-venv) NO_VENV=yes; shift ;;
        --health-timeout) need_arg "$@"; HEALTH_TIMEOUT=$2; shift 2 ;;
        --backup-cmd) need_arg "$@"; BACKUP_CMD=$2; shift 2 ;;
        --restart-cmd) need_arg "$@"; RESTART_CMD=$2; shift 2 ;;
        --health-cmd) need_arg "$@"; HEALTH_CMD=$2; shift 2 ;;
        --keep) need_arg "$@"; KEEP=$2; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) usage "unknown option: $1 (see --help)" ;;
    esac
done
[[ "$HEALTH_TIMEOUT" =~ ^[0-9]+$ ]] && [ "$HEALTH_TIMEOUT" -ge 1 ] || usage "--health-timeout: whole seconds >= 1"
[[ "$KEEP" =~ ^[0-9]+$ ]] && [ "$KEEP" -ge 2 ] || usage "--keep: a whole number >= 2"
if [ -n "$ROOT" ]; then
    [ -d "$ROOT" ] || usage "--root: no directory $ROOT"
    ROOT=$(cd "$ROOT" && pwd)
    [ "$ROOT" != / ] || ROOT=""
fi

OPT=$ROOT/opt/alphapulse-rl
CURRENT=$OPT/current
[ -L "$CURRENT" ] || { say "no installation at $CURRENT: run scripts/install.sh first"; exit 1; }
BACKUP_CMD=${BACKUP_CMD:-"$OPT/bin/alphapulse backup create --type full"}
# the monitor too when it runs (try-restart): it imports the same release; its health is checked next anyway
RESTART_CMD=${RESTART_CMD:-"systemctl restart alphapulse-trading && { systemctl try-restart alphapulse-monitor || true; }"}
HEALTH_CMD=${HEALTH_CMD:-"$OPT/bin/alphapulse health"}

# One deploy at a time.
exec 9>"$OPT/.deploy.lock"
flock -n 9 || { say "another deploy is running (lock $OPT/.deploy.lock)"; exit 1; }

PREVIOUS=$(readlink "$CURRENT")  # releases/<version>
export DEPLOY_ROOT=$ROOT DEPLOY_OPT=$OPT DEPLOY_PREVIOUS=$PREVIOUS DEPLOY_RELEASE=""

run() {  # run a step's command; its output goes through, its status is returned
    sh -c "$1"
}

switch_to() {  # atomically point current at releases/<v>
    ln -sfn "$1" "$OPT/.current.deploy"
    mv -T "$OPT/.current.deploy" "$CURRENT"
    say "current -> $1"
}

healthy_within() {  # poll the health command until it exits 0 or the timeout passes
    local deadline=$((SECONDS + $1)) rc=1
    while :; do
        if run "$HEALTH_CMD" >"$OPT/.deploy-health.out" 2>&1; then
            return 0
        else
            rc=$?
        fi
        if [ $SECONDS -ge $deadline ]; then
            say "health did not pass within $1 s (last exit $rc):"
            sed 's/^/    /' "$OPT/.deploy-health.out"
            return 1
        fi
        sleep 2
    done
}

# 1. backup, with the release that made the data
say "backup: $BACKUP_CMD"
if ! run "$BACKUP_CMD"; then
    say "backup failed: nothing changed, not upgrading"
    exit 1
fi

# 2. the new release next to the running one
install_args=(--release-only)
[ -z "$ROOT" ] || install_args+=(--root "$ROOT")
[ -z "$VERSION" ] || install_args+=(--version "$VERSION")
[ -z "$VENV_FROM" ] || install_args+=(--venv-from "$VENV_FROM")
[ "$NO_VENV" = no ] || install_args+=(--no-venv)
if ! RELEASE_PATH=$(bash "$SRC/scripts/install.sh" "${install_args[@]}"); then
    say "install of the new release failed: nothing changed, not upgrading"
    exit 1
fi
NEW=releases/$(basename "$RELEASE_PATH")
export DEPLOY_RELEASE=$NEW
if [ "$NEW" = "$PREVIOUS" ]; then
    say "$NEW is already current; restarting it and checking health"
fi

# 3.-5. switch, restart, health gate
switch_to "$NEW"
say "restart: $RESTART_CMD"
if run "$RESTART_CMD" && healthy_within "$HEALTH_TIMEOUT"; then
    say "upgraded: $PREVIOUS -> $NEW, healthy"
    # keep the newest releases (by modification time); never current or previous
    ls -1dt "$OPT"/releases/*/ 2>/dev/null | tail -n +$((KEEP + 1)) | while read -r old; do
        old=releases/$(basename "$old")
        if [ "$old" != "$NEW" ] && [ "$old" != "$PREVIOUS" ]; then
            rm -rf "${OPT:?}/$old"
            say "removed old release $old"
        fi
    done
    exit 0
fi

# 6. rollback
say "ROLLBACK: $NEW is not healthy; back to $PREVIOUS"
switch_to "$PREVIOUS"
if run "$RESTART_CMD" && healthy_within "$HEALTH_TIMEOUT"; then
    say "rolled back to $PREVIOUS, healthy; $NEW is kept for inspection, not current"
    exit 1
fi
say "rolled back to $PREVIOUS but it is not healthy either: investigate now (journalctl -u alphapulse-trading)"
exit 2
