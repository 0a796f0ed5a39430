#!/usr/bin/env bash
# Install vastd as a systemd service, or remove it.
#
#   scripts/install-service.sh [--root DIR] [--prefix DIR] [--wheel FILE] [--no-enable]
#   scripts/install-service.sh --uninstall [--purge] [--root DIR] [--prefix DIR]
#
# Install: the system user and group `vastd` (a sysusers.d entry; created now unless
# --root), a venv under PREFIX (default /opt/vastd; vastd installed into it from this
# checkout or --wheel, runtime dependencies only), /etc/vastd (0750 root:vastd) with
# config.toml from config.example.toml (never overwritten), the unit in
# /etc/systemd/system, a tmpfiles.d entry for /var/lib/vastd, the docs under
# PREFIX/share/doc, and `systemctl enable vastd` (not started: the keys come first;
# with --root, `systemctl --root DIR enable`; without systemd, a line saying how).
#
# --root DIR installs everything under DIR instead of / (like DESTDIR: for packaging
# and tests); nothing outside DIR is touched: no user, no chown, and systemctl only as
# `systemctl --root DIR enable` (a link inside DIR).
# Uninstall removes the unit, the venv and the sysusers/tmpfiles entries; the config
# (/etc/vastd) and the state (/var/lib/vastd: queue, results, snapshot) stay unless
# --purge, which also removes the user.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROOT=""
PREFIX=/opt/vastd
WHEEL=""
ENABLE=1
UNINSTALL=0
PURGE=0
PYTHON="${PYTHON:-python3}"

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case "$1" in
        --root) ROOT="${2:?--root needs a folder}"; shift 2 ;;
        --prefix) PREFIX="${2:?--prefix needs a folder}"; shift 2 ;;
        --wheel) WHEEL="${2:?--wheel needs a file}"; shift 2 ;;
        --no-enable) ENABLE=0; shift ;;
        --uninstall) UNINSTALL=1; shift ;;
        --purge) PURGE=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install-service: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$PREFIX" in /*) ;; *) echo "install-service: --prefix must be absolute" >&2; exit 2 ;; esac
if [ -n "$ROOT" ]; then
    mkdir -p "$ROOT"
    ROOT="$(cd "$ROOT" && pwd)"
elif [ "$(id -u)" -ne 0 ]; then
    echo "install-service: run as root, or use --root DIR to install into a folder" >&2
    exit 2
fi

USER_NAME=vastd
ETC="$ROOT/etc/vastd"
STATE="$ROOT/var/lib/vastd"
UNIT="$ROOT/etc/systemd/system/vastd.service"
SYSUSERS="$ROOT/usr/lib/sysusers.d/vastd.conf"
TMPFILES="$ROOT/usr/lib/tmpfiles.d/vastd.conf"
VENV="$ROOT$PREFIX/.venv"
DOC="$ROOT$PREFIX/share/doc"

systemd_running() { [ -z "$ROOT" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; }
say() { echo "install-service: $*"; }

if [ "$UNINSTALL" -eq 1 ]; then
    if systemd_running; then
        systemctl disable --now vastd.service 2>/dev/null || true
    fi
    # the wants/ link too (systemctl disable removed it where systemd runs)
    rm -f "$UNIT" "$SYSUSERS" "$TMPFILES" "$ROOT/etc/systemd/system/multi-user.target.wants/vastd.service"
    rm -rf "$ROOT$PREFIX"
    if systemd_running; then systemctl daemon-reload; fi
    if [ "$PURGE" -eq 1 ]; then
        rm -rf "$ETC" "$STATE"
        if [ -z "$ROOT" ] && id "$USER_NAME" >/dev/null 2>&1; then
            userdel "$USER_NAME" 2>/dev/null || true
            getent group "$USER_NAME" >/dev/null && groupdel "$USER_NAME" 2>/dev/null || true
        fi
        say "removed vastd, its config and its state"
    else
        say "removed vastd; kept $ETC (config) and $STATE (state; --purge removes them)"
    fi
    exit 0
fi

# --- the user and group -----------------------------------------------------------------------
install -d -m 0755 "$(dirname "$SYSUSERS")" "$(dirname "$TMPFILES")"
cat > "$SYSUSERS" <<'EOF'
# vastd: the daemon's system user; its group may be given to researchers ([paths] group)
u vastd - "vastd daemon" /var/lib/vastd /usr/sbin/nologin
EOF
cat > "$TMPFILES" <<'EOF'
# vastd: its state ([paths] root) and its config folder (readable by the group only)
d /var/lib/vastd 0750 vastd vastd -
d /etc/vastd 0750 root vastd -
EOF
chmod 0644 "$SYSUSERS" "$TMPFILES"
if [ -z "$ROOT" ] && ! id "$USER_NAME" >/dev/null 2>&1; then
    if command -v systemd-sysusers >/dev/null; then
        systemd-sysusers "$SYSUSERS"
    else
        useradd --system --user-group --home-dir /var/lib/vastd --shell /usr/sbin/nologin \
            --comment "vastd daemon" "$USER_NAME"
    fi
    say "created user and group $USER_NAME"
fi

# --- the venv ---------------------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade \
    "${WHEEL:-$HERE}"
say "installed $("$VENV/bin/vastd" --version) into $VENV"

# --- config, unit, docs -----------------------------------------------------------------------
install -d -m 0750 "$ETC"
if [ ! -e "$ETC/config.toml" ]; then
    install -m 0640 "$HERE/config.example.toml" "$ETC/config.toml"
    say "wrote $ETC/config.toml (from config.example.toml): edit it"
else
    say "kept $ETC/config.toml"
fi
install -d -m 0750 "$STATE"
install -d -m 0755 "$(dirname "$UNIT")" "$DOC"
sed "s|/opt/vastd|$PREFIX|g" "$HERE/systemd/vastd.service" > "$UNIT"
chmod 0644 "$UNIT"
install -m 0644 "$HERE/README.md" "$HERE/docs/OPERATIONS.md" "$DOC/"

if [ -z "$ROOT" ]; then
    chown root:"$USER_NAME" "$ETC" "$ETC/config.toml"
    chown "$USER_NAME:$USER_NAME" "$STATE"
fi
if systemd_running; then
    systemd-tmpfiles --create "$TMPFILES" || true
    systemctl daemon-reload
    if [ "$ENABLE" -eq 1 ]; then
        systemctl enable vastd.service
        say "enabled vastd.service (starts at boot; not started now)"
    fi
elif [ "$ENABLE" -eq 1 ] && [ -n "$ROOT" ] && command -v systemctl >/dev/null; then
    # An image or a staged root: the wants/ link, made offline, without a running systemd.
    systemctl --root="$ROOT" --quiet enable vastd.service 2>/dev/null
    say "enabled vastd.service in $ROOT (starts when that system boots)"
elif [ "$ENABLE" -eq 1 ]; then
    say "systemd is not running here, so the unit is not enabled: run 'systemctl enable vastd' on the system that will run it"
fi
cat <<EOF
install-service: done. Next:
  - put the vast.ai API key in $ETC/vast_api_key and the SSH private key in
    $ETC/id_ed25519 (both 0600 root:root; systemd hands them to vastd as credentials)
  - edit $ETC/config.toml, then: $PREFIX/.venv/bin/vastd check-config --config $ETC/config.toml
  - systemctl start vastd; journalctl -u vastd -f
EOF
