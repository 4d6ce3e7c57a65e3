#!/usr/bin/env bash
# Install AlphaPulse-RL from this checkout as a systemd service (issue 11 part 3).
#
#   sudo scripts/install.sh                 # production: user, directories, venv, units, env file, logrotate
#   scripts/install.sh --root /tmp/img ...  # everything under /tmp/img (an image, or a test)
#
# What it makes (every path below is prefixed with --root DIR when given):
#   /opt/alphapulse-rl/releases/<version>/venv   the package, pip-installed from a copy of the checkout
#   /opt/alphapulse-rl/current -> releases/<v>   the unit's ExecStart goes through it (deploy.sh switches it)
#   /opt/alphapulse-rl/bin/alphapulse            the CLI with the service's environment (alphapulse health ...)
#   /etc/alphapulse/{config,trading_params,monitoring}.yaml   0644, only when absent (never overwritten)
#   /etc/alphapulse/alphapulse.env               0600, only when absent (it holds the exchange keys)
#   /etc/systemd/system/alphapulse-*.{service,timer}   0644, always refreshed (units are code)
#   /etc/logrotate.d/alphapulse                  0644, from config/logrotate/alphapulse
#   /var/lib/alphapulse (0700), /var/log/alphapulse (0700, as the units keep it), owned by the service user
# Re-running is safe: an existing release of the same version is kept, files the operator owns are kept.
#
# Options:
#   --root DIR           install under DIR; creates no user and runs no systemctl (unless --create-user)
#   --user NAME          service user (default alphapulse; the unit's User= is rewritten when different)
#   --group NAME         service group (default: same as --user)
#   --create-user        create the system user even with --root (default: only without --root)
#   --no-create-user     never create the user (files are chowned to it only when it exists)
#   --python PY          interpreter for the venv (default python3; must be >= 3.11)
#   --venv-from VENV     build the venv on top of an existing venv's site-packages: no download, the checkout
#                        is pip-installed with --no-deps (tests and offline hosts)
#                        A venv names its own absolute path: under --root it works at ROOT/opt/... (tests run
#                        it there); to stage an image for another machine use --no-venv and build there.
#   --no-venv            make no venv (only directories, config, units, logrotate)
#   --version V          release name (default: setup.cfg version + git describe)
#   --release-only       only build releases/<version> and print its path (deploy.sh uses this)
#   --no-switch          build the release but leave `current` alone
#   --no-systemctl       do not run systemctl daemon-reload/enable even without --root
set -euo pipefail

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
unset PYTHONPATH PYTHONHOME  # a release is built from, and checked against, its own copy of the package
umask 022  # the service user must read the release (a root umask of 027 would make the venv unreadable to it)
ROOT=""
SVC_USER=alphapulse
SVC_GROUP=""
CREATE_USER=auto
PYTHON=python3
VENV_FROM=""
NO_VENV=no
VERSION=""
RELEASE_ONLY=no
SWITCH=yes
SYSTEMCTL=auto

die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }
say() { [ "$RELEASE_ONLY" = yes ] && printf 'install.sh: %s\n' "$*" >&2 || printf 'install.sh: %s\n' "$*"; }
need_arg() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --root) need_arg "$@"; ROOT=$2; shift 2 ;;
        --user) need_arg "$@"; SVC_USER=$2; shift 2 ;;
        --group) need_arg "$@"; SVC_GROUP=$2; shift 2 ;;
        --create-user) CREATE_USER=yes; shift ;;
        --no-create-user) CREATE_USER=no; shift ;;
        --python) need_arg "$@"; PYTHON=$2; shift 2 ;;
        --venv-from) need_arg "$@"; VENV_FROM=$2; shift 2 ;;
        --no-venv) NO_VENV=yes; shift ;;
        --version) need_arg "$@"; VERSION=$2; shift 2 ;;
        --release-only) RELEASE_ONLY=yes; shift ;;
        --no-switch) SWITCH=no; shift ;;
        --no-systemctl) SYSTEMCTL=no; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option: $1 (see --help)" ;;
    esac
done
SVC_GROUP=${SVC_GROUP:-$SVC_USER}
[[ "$SVC_USER" =~ ^[a-z_][a-z0-9_-]*$ ]] || die "--user: not a valid user name: $SVC_USER"
[[ "$SVC_GROUP" =~ ^[a-z_][a-z0-9_-]*$ ]] || die "--group: not a valid group name: $SVC_GROUP"
[[ -z "$VERSION" || "$VERSION" =~ ^[A-Za-z0-9][A-Za-z0-9._+-]*$ ]] || die "--version: use letters, digits and ._+- only: $VERSION"
if [ -n "$ROOT" ]; then
    mkdir -p "$ROOT"
    ROOT=$(cd "$ROOT" && pwd)
    [ "$ROOT" != / ] || ROOT=""
fi
[ -z "$VENV_FROM" ] || [ -x "$VENV_FROM/bin/python" ] || die "--venv-from: no $VENV_FROM/bin/python"

# Runtime paths (what the installed files name) and where they are written (ROOT-prefixed).
OPT=/opt/alphapulse-rl
ETC=/etc/alphapulse
UNITS=/etc/systemd/system
STATE=/var/lib/alphapulse
LOGS=/var/log/alphapulse
BACKUPS=/var/lib/alphapulse-backups  # alphapulse-backup@.service's StateDirectory
LOGROTATE_D=/etc/logrotate.d

# ---- the service user -----------------------------------------------------------------------------
user_exists() { getent passwd "$SVC_USER" >/dev/null 2>&1; }
if [ "$CREATE_USER" = auto ]; then
    if [ -z "$ROOT" ] && [ "$RELEASE_ONLY" = no ]; then CREATE_USER=yes; else CREATE_USER=no; fi
fi
if [ "$CREATE_USER" = yes ] && ! user_exists; then
    [ "$(id -u)" -eq 0 ] || die "creating the system user $SVC_USER needs root (or pass --no-create-user)"
    getent group "$SVC_GROUP" >/dev/null 2>&1 || groupadd --system "$SVC_GROUP"
    useradd --system --gid "$SVC_GROUP" --home-dir "$STATE" --no-create-home --shell /usr/sbin/nologin \
        --comment "AlphaPulse-RL trading daemon" "$SVC_USER"
    say "created system user $SVC_USER"
fi
CHOWN=no
if user_exists && [ "$(id -u)" -eq 0 ]; then
    CHOWN=yes
elif [ "$RELEASE_ONLY" = no ]; then
    say "user $SVC_USER does not exist (or not root): leaving file owners as they are"
fi

# ---- the release: a venv with the package, built from a clean copy of the checkout ----------------------
if [ -z "$VERSION" ]; then
    base=$(sed -n 's/^version *= *//p' "$SRC/setup.cfg" | head -n1)
    rev=$(git -C "$SRC" describe --always --dirty --abbrev=10 2>/dev/null || date -u +%Y%m%d%H%M%S)
    VERSION="${base:-0}-${rev}"
fi
RELEASE=$OPT/releases/$VERSION
DEST=$ROOT$RELEASE

build_release() {
    # Built at its final path (a venv is not relocatable); ".complete" is written last, so a release
    # without it (an interrupted build) is removed and built again, and deploy.sh never switches to one.
    trap 'rm -rf "$DEST"' ERR
    mkdir -p "$DEST/src"
    # A copy, so pip's in-tree build leaves the checkout clean and the release keeps the source it ran.
    tar -C "$SRC" --exclude=./.git --exclude=./.venv --exclude=./var --exclude=./build --exclude='*.egg-info' \
        --exclude=__pycache__ --exclude=.pytest_cache --exclude=.mypy_cache --exclude=.ruff_cache \
        --exclude=./.bench -cf - . | tar -C "$DEST/src" -xf -
    git -C "$SRC" rev-parse HEAD >"$DEST/REVISION" 2>/dev/null || echo unknown >"$DEST/REVISION"
    if [ "$NO_VENV" = no ]; then
        if [ -n "$VENV_FROM" ]; then
            "$VENV_FROM/bin/python" -m venv --without-pip "$DEST/venv"
            local site dep_site
            site=$("$DEST/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
            dep_site=$("$VENV_FROM/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
            printf '%s\n' "$dep_site" >"$site/_alphapulse_deps_from.pth"
            "$DEST/venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
                --no-build-isolation --no-index "$DEST/src" >"$DEST/pip.log" 2>&1 \
                || { cat "$DEST/pip.log" >&2; die "pip install of the checkout failed"; }
        else
            "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "$PYTHON is older than 3.11"
            "$PYTHON" -m venv "$DEST/venv"
            "$DEST/venv/bin/pip" install --quiet --disable-pip-version-check --upgrade pip
            "$DEST/venv/bin/pip" install --quiet --disable-pip-version-check "$DEST/src" >"$DEST/pip.log" 2>&1 \
                || { cat "$DEST/pip.log" >&2; die "pip install of the checkout failed"; }
        fi
        rm -rf "$DEST/src/build" "$DEST"/src/*.egg-info
        local v
        v=$(cd / && "$DEST/venv/bin/python" -c 'import alphapulse; print(alphapulse.__version__)')
        say "built $RELEASE (alphapulse $v)"
    fi
    : >"$DEST/.complete"
    trap - ERR
}

mkdir -p "$ROOT$OPT/releases"
if [ -f "$DEST/.complete" ]; then
    say "release $RELEASE exists; kept"
else
    rm -rf "$DEST"
    build_release
fi

if [ "$RELEASE_ONLY" = yes ]; then
    printf '%s\n' "$RELEASE"
    exit 0
fi

# ---- directories, config, env file -------------------------------------------------------------------
install -d -m 0755 "$ROOT$OPT" "$ROOT$OPT/bin" "$ROOT$ETC" "$ROOT$UNITS" "$ROOT$LOGROTATE_D"
install -d -m 0700 "$ROOT$STATE"
install -d -m 0700 "$ROOT$LOGS"
install -d -m 0700 "$ROOT$BACKUPS"  # root's: the backup unit runs as root (it reads the 0600 env file)
chmod 0700 "$ROOT$STATE"
chmod 0700 "$ROOT$LOGS"
if [ "$CHOWN" = yes ]; then
    chown "$SVC_USER:$SVC_GROUP" "$ROOT$STATE" "$ROOT$LOGS"
fi

for f in config.yaml trading_params.yaml monitoring.yaml; do
    if [ -f "$SRC/config/$f" ] && [ ! -e "$ROOT$ETC/$f" ]; then
        install -m 0644 "$SRC/config/$f" "$ROOT$ETC/$f"
        say "installed $ETC/$f"
    fi
done
if [ -e "$ROOT$ETC/alphapulse.env" ]; then
    chmod 0600 "$ROOT$ETC/alphapulse.env"  # kept as it is, only its mode enforced: it holds the keys
    say "kept $ETC/alphapulse.env"
else
    # The daemon runs with the unit's paths; the env file sets only what the operator chooses.
    install -m 0600 "$SRC/config/alphapulse.env.example" "$ROOT$ETC/alphapulse.env"
    say "installed $ETC/alphapulse.env (mode 0600; put the exchange keys here)"
fi
[ "$(id -u)" -ne 0 ] || chown root:root "$ROOT$ETC/alphapulse.env"

# ---- units and logrotate -------------------------------------------------------------------------------
for unit in "$SRC"/systemd/alphapulse-*.service "$SRC"/systemd/alphapulse-*.timer; do
    [ -e "$unit" ] || continue
    sed -e "s|^User=alphapulse$|User=$SVC_USER|" -e "s|^Group=alphapulse$|Group=$SVC_GROUP|" "$unit" \
        >"$ROOT$UNITS/$(basename "$unit").tmp"
    chmod 0644 "$ROOT$UNITS/$(basename "$unit").tmp"
    mv -f "$ROOT$UNITS/$(basename "$unit").tmp" "$ROOT$UNITS/$(basename "$unit")"
    say "installed $UNITS/$(basename "$unit")"
done
sed -e "s|@LOG_DIR@|$LOGS|g" -e "s|@USER@|$SVC_USER|g" -e "s|@GROUP@|$SVC_GROUP|g" \
    "$SRC/config/logrotate/alphapulse" >"$ROOT$LOGROTATE_D/alphapulse.tmp"
chmod 0644 "$ROOT$LOGROTATE_D/alphapulse.tmp"
mv -f "$ROOT$LOGROTATE_D/alphapulse.tmp" "$ROOT$LOGROTATE_D/alphapulse"
say "installed $LOGROTATE_D/alphapulse"

# The operator's CLI with the service's environment: `alphapulse health`, `alphapulse ctl metrics`, backups.
cat >"$ROOT$OPT/bin/alphapulse.tmp" <<EOF
#!/bin/sh
# alphapulse with the environment of the alphapulse-trading unit (written by scripts/install.sh).
ALPHAPULSE_DATA_DIR=$STATE
ALPHAPULSE_LOG_DIR=$LOGS
ALPHAPULSE_CONFIG_DIR=$ETC
ALPHAPULSE_BACKUP_DIR=$BACKUPS
export ALPHAPULSE_DATA_DIR ALPHAPULSE_LOG_DIR ALPHAPULSE_CONFIG_DIR ALPHAPULSE_BACKUP_DIR
unset PYTHONPATH PYTHONHOME
if [ -r $ETC/alphapulse.env ]; then
    set -a
    . $ETC/alphapulse.env
    set +a
fi
exec $OPT/current/venv/bin/alphapulse "\$@"
EOF
chmod 0755 "$ROOT$OPT/bin/alphapulse.tmp"
mv -f "$ROOT$OPT/bin/alphapulse.tmp" "$ROOT$OPT/bin/alphapulse"

# ---- switch `current` atomically (a new symlink renamed over the old one) ------------------------------
if [ "$SWITCH" = yes ]; then
    ln -sfn "releases/$VERSION" "$ROOT$OPT/.current.tmp"
    mv -T "$ROOT$OPT/.current.tmp" "$ROOT$OPT/current"
    say "current -> releases/$VERSION"
fi

# ---- systemd -------------------------------------------------------------------------------------------
if [ "$SYSTEMCTL" = auto ]; then
    if [ -z "$ROOT" ] && [ -d /run/systemd/system ]; then SYSTEMCTL=yes; else SYSTEMCTL=no; fi
fi
if [ "$SYSTEMCTL" = yes ]; then
    systemctl daemon-reload
    # services (not templates such as alphapulse-backup@.service, which their timers start) and timers
    for unit in "$SRC"/systemd/alphapulse-*.service "$SRC"/systemd/alphapulse-*.timer; do
        name=$(basename "$unit")
        [ -e "$unit" ] && [[ "$name" != *@.service ]] || continue
        systemctl enable "$name"
        say "enabled $name; start it with: systemctl start $name"
    done
else
    say "systemctl not run (--root, --no-systemctl or no systemd as PID 1)"
fi
say "done: $OPT/bin/alphapulse health  checks the installation"
