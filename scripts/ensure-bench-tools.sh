#!/usr/bin/env bash
# Make this machine ready for the GNU parallel comparison of `make bench` (issue 13):
#   - GNU parallel (the baseline), and rsync, which its --transferfile/--return use
#   - the OpenSSH client (ssh), which GNU parallel logs in with
# Idempotent; run as root (`make bench` does it first). Without root it only says so,
# and bench/bench_parallel.py stops with a message (exit 1) when the tools are missing.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "ensure-bench-tools: not root, nothing done (GNU parallel figures need parallel, rsync, ssh)" >&2
    exit 0
fi

missing=()
command -v parallel >/dev/null 2>&1 || missing+=(parallel)
command -v rsync >/dev/null 2>&1 || missing+=(rsync)
command -v ssh >/dev/null 2>&1 || missing+=(openssh-client)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "ensure-bench-tools: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

echo "ensure-bench-tools: ready ($(parallel --version 2>/dev/null | head -n1), $(rsync --version | head -n1 | cut -c1-30))"
