"""synchro-init's rules against real iptables, in Pod network namespaces.

Pod `a` gets the interception rules and runs `dstecho.py` as the proxy's
stand-in on 15001/15006 (plus an "app" on 8080/8081, the status port 15020 and
an excluded port 9090); it answers with the port that accepted the connection
and the SO_ORIGINAL_DST it saw. Pod `b` has no rules and serves 8080/9091.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy import ports
from proxy.init import rules as rules_core
from proxy.init.options import InterceptOptions
from synchro.local.netns import Node, PodNet

DSTECHO = Path(__file__).resolve().parent / "dstecho.py"
A_PORTS = (ports.OUTBOUND_CAPTURE_PORT, ports.INBOUND_CAPTURE_PORT, 8080, 8081, 9090, 15020)
B_PORTS = (8080, 9091)
EXCLUDED_IN = 9090
EXCLUDED_OUT = 9091
OPTIONS = InterceptOptions(
    exclude_inbound_ports=(ports.STATUS_PORT, EXCLUDED_IN),
    exclude_outbound_ports=(EXCLUDED_OUT,),
)


@dataclass
class Mesh:
    node: Node
    a: PodNet
    b: PodNet
    synchro_init: str

    def init(
        self, *args: str, pod: PodNet | None = None, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        return (pod or self.a).exec([self.synchro_init, *args], **kwargs)

    def nat(self, pod: PodNet | None = None, binary: str = "iptables-save") -> str:
        return (pod or self.a).exec([binary, "-t", "nat"], check=True).stdout


def serve(pod: PodNet, pod_ports: tuple[int, ...]) -> None:
    # As the proxy would: uid/gid 1337, so its answers are never captured either.
    proc = pod.spawn(
        [sys.executable, str(DSTECHO), "serve", *map(str, pod_ports)],
        name="dstecho",
        uid=ports.PROXY_UID,
        gid=ports.PROXY_GID,
    )
    for port in pod_ports:
        try:
            pod.wait_for_port(port)
        except Exception:
            raise AssertionError(f"dstecho did not start:\n{proc.log()}") from None


def ask(pod: PodNet, host: str, port: int) -> dict[str, Any]:
    """Connect from `pod` as an app (this root process) and read the answer."""
    with pod.connect(host, port) as sock:
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    answer: dict[str, Any] = json.loads(data)
    return answer


def ask_as(pod: PodNet, host: str, port: int, uid: int, gid: int) -> dict[str, Any]:
    """Connect from a separate process running as uid/gid."""
    proc = pod.exec([sys.executable, str(DSTECHO), "ask", host, str(port)], uid=uid, gid=gid)
    assert proc.returncode == 0, proc.stderr
    answer: dict[str, Any] = json.loads(proc.stdout)
    return answer


@pytest.fixture(scope="module")
def shared_mesh(module_node: Node, synchro_init: str) -> Mesh:
    a, b = module_node.add_pod("a"), module_node.add_pod("b")
    serve(a, A_PORTS)
    serve(b, B_PORTS)
    return Mesh(module_node, a, b, synchro_init)


@pytest.fixture
def mesh(shared_mesh: Mesh) -> Mesh:
    """The shared Pods with exactly OPTIONS' rules, whatever the last test did."""
    done = shared_mesh.init(*OPTIONS.to_args())
    assert done.returncode == 0, done.stderr
    return shared_mesh


def test_outbound_from_an_app_reaches_15001_with_the_original_destination(mesh: Mesh) -> None:
    got = ask(mesh.a, str(mesh.b.ip), 8080)
    assert got["port"] == ports.OUTBOUND_CAPTURE_PORT
    assert got["orig_dst"] == [str(mesh.b.ip), 8080]


def test_an_app_with_another_uid_is_captured_too(mesh: Mesh) -> None:
    got = ask_as(mesh.a, str(mesh.b.ip), 8080, uid=1000, gid=1000)
    assert got["port"] == ports.OUTBOUND_CAPTURE_PORT


def test_the_proxys_uid_and_gid_are_not_captured(mesh: Mesh) -> None:
    got = ask_as(mesh.a, str(mesh.b.ip), 8080, uid=ports.PROXY_UID, gid=ports.PROXY_GID)
    assert got["port"] == 8080 and got["uid"] == ports.PROXY_UID  # b's own server
    # Either identity alone is enough, like Istio's uid and gid rules.
    assert ask_as(mesh.a, str(mesh.b.ip), 8080, uid=1000, gid=ports.PROXY_GID)["port"] == 8080
    assert ask_as(mesh.a, str(mesh.b.ip), 8080, uid=ports.PROXY_UID, gid=1000)["port"] == 8080


def test_inbound_from_another_pod_reaches_15006(mesh: Mesh) -> None:
    got = ask(mesh.b, str(mesh.a.ip), 8080)
    assert got["port"] == ports.INBOUND_CAPTURE_PORT
    assert got["orig_dst"] == [str(mesh.a.ip), 8080]
    assert got["peer"][0] == str(mesh.b.ip)


def test_status_port_and_excluded_ports_bypass_the_proxy(mesh: Mesh) -> None:
    assert ask(mesh.b, str(mesh.a.ip), ports.STATUS_PORT)["port"] == ports.STATUS_PORT
    assert ask(mesh.b, str(mesh.a.ip), EXCLUDED_IN)["port"] == EXCLUDED_IN
    assert ask(mesh.a, str(mesh.b.ip), EXCLUDED_OUT)["port"] == EXCLUDED_OUT
    # The proxy's own listeners are not redirected into themselves.
    got = ask(mesh.b, str(mesh.a.ip), ports.INBOUND_CAPTURE_PORT)
    assert got["port"] == ports.INBOUND_CAPTURE_PORT and got["orig_dst"] in (
        None,
        [str(mesh.a.ip), ports.INBOUND_CAPTURE_PORT],
    )


def test_loopback_is_not_captured(mesh: Mesh) -> None:
    got = ask(mesh.a, "127.0.0.1", 8080)
    assert got["port"] == 8080


def test_a_pod_calling_its_own_ip_reaches_its_inbound_listener(mesh: Mesh) -> None:
    got = ask(mesh.a, str(mesh.a.ip), 8080)
    assert got["port"] == ports.INBOUND_CAPTURE_PORT
    assert got["orig_dst"] == [str(mesh.a.ip), 8080]
    # ...with the inbound exclusions still applying.
    assert ask(mesh.a, str(mesh.a.ip), ports.STATUS_PORT)["port"] == ports.STATUS_PORT
    assert ask(mesh.a, str(mesh.a.ip), EXCLUDED_IN)["port"] == EXCLUDED_IN


def test_only_included_inbound_ports_are_captured(mesh: Mesh) -> None:
    only = InterceptOptions(inbound_all=False, include_inbound_ports=(8080,))
    assert mesh.init(*only.to_args()).returncode == 0
    assert ask(mesh.b, str(mesh.a.ip), 8080)["port"] == ports.INBOUND_CAPTURE_PORT
    assert ask(mesh.b, str(mesh.a.ip), 8081)["port"] == 8081


def test_rerunning_init_is_harmless(mesh: Mesh) -> None:
    before = mesh.nat()
    for _ in range(2):
        again = mesh.init(*OPTIONS.to_args())
        assert again.returncode == 0, again.stderr
    after = mesh.nat()
    assert rules_core.rule_count(after) == rules_core.rule_count(before)
    assert after.count("-j SYNCHRO_OUTPUT") == 1 and after.count("-j SYNCHRO_INBOUND") == 2
    assert ask(mesh.a, str(mesh.b.ip), 8080)["port"] == ports.OUTBOUND_CAPTURE_PORT


def test_rerunning_with_other_options_replaces_the_rules(mesh: Mesh) -> None:
    changed = InterceptOptions(exclude_outbound_cidrs=(f"{mesh.b.ip}/32",))
    assert mesh.init(*changed.to_args()).returncode == 0
    assert ask(mesh.a, str(mesh.b.ip), 8080)["port"] == 8080
    # The old exclusion of inbound 9090 is gone.
    assert ask(mesh.b, str(mesh.a.ip), EXCLUDED_IN)["port"] == ports.INBOUND_CAPTURE_PORT
    assert "--dport 9091" not in mesh.nat()


def test_rules_of_other_tools_survive(mesh: Mesh) -> None:
    foreign = ["OUTPUT", "-p", "udp", "-m", "udp", "--dport", "53", "-j", "RETURN"]
    mesh.a.exec(["iptables", "-t", "nat", "-I", *foreign[:1], "1", *foreign[1:]], check=True)
    try:
        assert mesh.init(*OPTIONS.to_args()).returncode == 0
        assert "-A " + " ".join(foreign) in mesh.nat()
        assert mesh.init("--cleanup").returncode == 0
        saved = mesh.nat()
        assert "-A " + " ".join(foreign) in saved and "SYNCHRO" not in saved
    finally:
        mesh.a.exec(["iptables", "-t", "nat", "-D", *foreign])


def test_cleanup_restores_plain_networking(mesh: Mesh) -> None:
    done = mesh.init("--cleanup")
    assert done.returncode == 0, done.stderr
    saved = mesh.nat()
    assert "SYNCHRO" not in saved and rules_core.rule_count(saved) == 0
    assert ask(mesh.a, str(mesh.b.ip), 8080)["port"] == 8080
    assert ask(mesh.b, str(mesh.a.ip), 8080)["port"] == 8080
    assert ask(mesh.a, str(mesh.a.ip), 8080)["port"] == 8080
    # Cleaning up twice is fine.
    assert mesh.init("--cleanup").returncode == 0


def test_dry_run_prints_the_rules_and_changes_nothing(node: Node, synchro_init: str) -> None:
    pod = node.add_pod("dry")
    before = pod.exec(["iptables-save", "-t", "nat"], check=True).stdout
    done = pod.exec([synchro_init, "--dry-run", *OPTIONS.to_args()])
    assert done.returncode == 0, done.stderr
    assert done.stdout == rules_core.rules(OPTIONS)
    after = pod.exec(["iptables-save", "-t", "nat"], check=True).stdout
    assert "SYNCHRO" not in after
    assert rules_core.nat_section(after) == rules_core.nat_section(before)


def test_missing_permission_exits_4_and_says_so(mesh: Mesh) -> None:
    done = mesh.init(*OPTIONS.to_args(), uid=65534, gid=65534)
    assert done.returncode == 4
    assert "missing permission" in done.stderr


def test_missing_iptables_exits_3_and_says_so(mesh: Mesh, tmp_path: Any) -> None:
    done = mesh.init(*OPTIONS.to_args(), env={"PATH": str(tmp_path)})
    assert done.returncode == 3
    assert "missing iptables" in done.stderr and "iptables-save" in done.stderr


def test_ipv6_pods_get_ip6tables_rules(node6: Node, synchro_init: str) -> None:
    a, b = node6.add_pod("a"), node6.add_pod("b")
    assert a.ip6 is not None and b.ip6 is not None
    serve(a, A_PORTS)
    serve(b, B_PORTS)
    done = a.exec([synchro_init, *OPTIONS.to_args()])
    assert done.returncode == 0, done.stderr
    assert "SYNCHRO_OUTPUT" in a.exec(["ip6tables-save", "-t", "nat"], check=True).stdout

    got = ask(a, str(b.ip6), 8080)
    assert got["port"] == ports.OUTBOUND_CAPTURE_PORT
    assert got["orig_dst"] == [str(b.ip6), 8080]
    got = ask(b, str(a.ip6), 8080)
    assert got["port"] == ports.INBOUND_CAPTURE_PORT
    assert got["orig_dst"] == [str(a.ip6), 8080]
    assert ask(a, "::1", 8080)["port"] == 8080

    assert a.exec([synchro_init, "--cleanup"]).returncode == 0
    assert "SYNCHRO" not in a.exec(["ip6tables-save", "-t", "nat"], check=True).stdout
    assert ask(a, str(b.ip6), 8080)["port"] == 8080


def test_an_injected_pod_runs_its_init_proxy_and_app(node: Node) -> None:
    """The webhook core's spec, run as written: init rules, proxy as 1337, app behind it."""
    from synchro.local.pod import inject_and_start, start_pod
    from webhook.config import InjectorConfig

    manifest = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "labels": {"app": "web"}},
        "spec": {
            "containers": [
                {
                    "name": "web",
                    "image": "example/web",
                    "command": ["python3", str(DSTECHO), "serve", "8080"],
                    "readinessProbe": {"tcpSocket": {"port": 8080}},
                }
            ]
        },
    }
    pod = inject_and_start(
        node, manifest, namespace="demo", config=InjectorConfig(controller_address="")
    )
    init = next(c for c in pod.spec["spec"]["initContainers"] if c["name"] == "synchro-init")
    options = InterceptOptions.from_args(init["args"])
    assert pod.exit_codes["synchro-init"] == 0
    saved = pod.exec(["iptables-save", "-t", "nat"], check=True).stdout
    assert rules_core.rule_count(saved) == rules_core.rule_count(rules_core.rules(options))

    status = Path(f"/proc/{pod.process('synchro-proxy').pid}/status").read_text()
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    gid_line = next(line for line in status.splitlines() if line.startswith("Gid:"))
    assert uid_line.split()[1:] == ["1337"] * 4 and gid_line.split()[1:] == ["1337"] * 4
    assert pod.process("web").alive()

    # A plain client Pod reaches the app; the app saw the proxy's connection
    # from 127.0.0.1 (inbound listener -> app), not the client's.
    client = start_pod(
        node,
        {
            "metadata": {"name": "client"},
            "spec": {"containers": [{"name": "c", "command": ["sleep", "60"]}]},
        },
    )
    got = ask(client.net, pod.ip, 8080)
    assert got["port"] == 8080
    assert got["peer"][0] == "127.0.0.1"

    pod.stop(grace=1.0)
    assert not pod.process("synchro-proxy").alive() and not pod.process("web").alive()
