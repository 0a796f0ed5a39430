#!/usr/bin/env bash
# Make this machine ready for the OpenSSH test tier (tests marked `sshd`):
#   - /usr/sbin/sshd (openssh-server) and its privilege separation dir /run/sshd
#   - an unprivileged user `vastdtest` whose login shell is /bin/sh (fast start-up)
#   - a world-readable venv /opt/vastd-test/venv (from /usr/bin/python3, with numpy
#     and pyarrow) that this user can run; the default python here lives under /root.
# Idempotent; run as root (`make test` does it before pytest). Without root it
# only says so, and the sshd tests skip.
set -euo pipefail

TEST_USER=vastdtest
VENV=/opt/vastd-test/venv

if [ "$(id -u)" -ne 0 ]; then
    echo "ensure-test-sshd: not root, nothing done (OpenSSH tests will be skipped)" >&2
    exit 0
fi

apt_updated=0
apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    if [ "$apt_updated" -eq 0 ]; then
        apt-get update -qq
        apt_updated=1
    fi
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

if [ ! -x /usr/sbin/sshd ]; then
    echo "ensure-test-sshd: installing openssh-server"
    apt_install openssh-server
fi
install -d -m 0755 /run/sshd

if ! id "$TEST_USER" >/dev/null 2>&1; then
    echo "ensure-test-sshd: creating user $TEST_USER"
    useradd --create-home --shell /bin/sh "$TEST_USER"
fi
if [ "$(getent passwd "$TEST_USER" | cut -d: -f7)" != "/bin/sh" ]; then
    usermod --shell /bin/sh "$TEST_USER"
fi
# sshd without PAM refuses a locked account ('!' password): '*' = no password, not locked.
if getent shadow "$TEST_USER" | cut -d: -f2 | grep -q '^!'; then
    usermod --password '*' "$TEST_USER"
fi

if ! "$VENV/bin/python" -c 'import numpy, pyarrow' >/dev/null 2>&1; then
    echo "ensure-test-sshd: creating $VENV"
    if [ ! -x /usr/bin/python3 ]; then
        apt_install python3
    fi
    if ! /usr/bin/python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
        apt_install python3-venv
    fi
    rm -rf "$VENV"
    install -d -m 0755 "$(dirname "$VENV")"
    /usr/bin/python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check numpy pyarrow
    chmod -R a+rX "$(dirname "$VENV")"
fi

echo "ensure-test-sshd: ready (sshd $(/usr/sbin/sshd -V 2>&1 | head -n1 || true), user $TEST_USER, python $VENV/bin/python)"
