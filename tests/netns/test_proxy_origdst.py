"""SO_ORIGINAL_DST for real: iptables REDIRECT (IPv4 and IPv6) in a throwaway
network namespace sends a client's connection into synchro-proxy's outbound
listener, and the proxy carries it to where the client was going.

The scenario runs inside the namespace (`python -m tests.netns.test_proxy_origdst`)
and prints one JSON line; the test outside asserts on it and always removes the
namespace and whatever still runs in it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from contextlib import suppress
from pathlib import Path

import pytest

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
PROXY_GID = 1337


def _scenario() -> dict[str, object]:
    from tests.integration.proxy_harness import BackgroundServer, echo_handler, free_port, run_proxy

    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    with (
        BackgroundServer(echo_handler, host="127.0.0.2") as v4,
        BackgroundServer(echo_handler, host="::1") as v6,
    ):
        port = free_port()
        for tool, dst, dport in (("iptables", "127.0.0.2", v4.port), ("ip6tables", "::1", v6.port)):
            # The proxy's own connections (gid 1337) are not redirected again.
            subprocess.run(
                [tool, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", dst, "--dport", str(dport),
                 "-m", "owner", "!", "--gid-owner", str(PROXY_GID),
                 "-j", "REDIRECT", "--to-ports", str(port)],
                check=True,
            )  # fmt: skip
        with run_proxy(
            extra_args=[f"--outbound-listen=0.0.0.0:{port},[::]:{port}"],
            wrapper=["setpriv", f"--regid={PROXY_GID}", "--clear-groups"],
        ) as proxy:
            import socket

            answers = {}
            for name, address in (("v4", ("127.0.0.2", v4.port)), ("v6", ("::1", v6.port))):
                with socket.create_connection(address, timeout=10) as sock:
                    sock.sendall(b"hello " + name.encode())
                    sock.shutdown(socket.SHUT_WR)
                    answers[name] = sock.recv(100).decode()
            outbound = next(i for i in proxy.admin_json("/listeners") if i["name"] == "outbound")
            log = proxy.log()
    return {"answers": answers, "outbound": outbound, "log": log[-2000:]}


def _run_in_namespace(name: str) -> dict[str, object]:
    out = subprocess.run(
        ["ip", "netns", "exec", name, sys.executable, "-m", "tests.netns.test_proxy_origdst"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_redirected_connections_reach_their_original_destination() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: creates a network namespace and iptables rules")
    for tool in ("ip", "iptables", "ip6tables", "setpriv"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")
    name = f"synchro-origdst-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        result = _run_in_namespace(name)
    finally:
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout
        for pid in pids.split():
            with suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", name], check=False)
    assert result["answers"] == {"v4": "hello v4", "v6": "hello v6"}, result["log"]
    outbound = result["outbound"]
    assert isinstance(outbound, dict)
    # Both went through the proxy, and neither needed a static destination.
    assert outbound["accepted"] == 2
    assert outbound["refused"] == 0
    assert outbound["static_destination"] is None


if __name__ == "__main__":
    print(json.dumps(_scenario()))
