#!/usr/bin/env bash
# `sudo make demo`: set up a fresh machine, bring the shop up on the local mesh,
# drive traffic, print what the mesh did. Everything runs on this machine only.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "make demo needs root (network namespaces and iptables): run 'sudo make demo'" >&2
    exit 1
fi

need_apt=()
for tool in iptables ip curl; do
    command -v "$tool" >/dev/null 2>&1 || need_apt+=("$tool")
done
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "== installing system packages (iptables iproute2 curl)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iptables iproute2 curl >/dev/null
fi
if ! python3 -c 'import synchro, grpc_health' >/dev/null 2>&1; then
    echo "== installing synchro (pip install -e '.[dev]')"
    python3 -m pip install -q -e '.[dev]'
fi

exec python3 -m examples.demo "$@"
