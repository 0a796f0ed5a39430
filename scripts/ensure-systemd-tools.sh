#!/usr/bin/env bash
# Make this machine ready for the unit tests of systemd/vastd.service: systemd-analyze
# (package systemd) and /bin/kill (procps, the unit's ExecReload). Idempotent; run as
# root (`make test` does it before pytest). Without root it only says so, and the unit
# tests skip when systemd-analyze is missing.
set -euo pipefail

need=()
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
[ -x /bin/kill ] || need+=(procps)
if [ ${#need[@]} -eq 0 ]; then
    echo "ensure-systemd-tools: ready ($(systemd-analyze --version | head -n1))"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "ensure-systemd-tools: not root, cannot install ${need[*]} (unit tests will be skipped)" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# systemd-analyze needs no running systemd: verify and security --offline read unit files.
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
echo "ensure-systemd-tools: installed ${need[*]} ($(systemd-analyze --version | head -n1))"
