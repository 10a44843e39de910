"""The local runtime itself: namespaces, isolation from the host, processes,
and cleaning up after a run that crashed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from synchro.local import netns
from synchro.local.netns import Node
from synchro.local.pod import PodStartError, start_pod


def _root_links() -> str:
    return subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout


def _root_addrs() -> str:
    return subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True).stdout


def test_pods_share_a_bridge_and_nothing_touches_the_root_namespace(tmp_path: Path) -> None:
    links, addrs = _root_links(), _root_addrs()
    with netns.node(netns.new_prefix("synt"), logdir=tmp_path) as n:
        a, b = n.add_pod("a"), n.add_pod("b")
        assert a.ip != b.ip and a.ip in n.subnet and b.ip in n.subnet
        assert _root_links() == links and _root_addrs() == addrs
        for pod in (a, b):
            shown = pod.exec(["ip", "-o", "addr", "show", "lo"], check=True).stdout
            assert "127.0.0.1" in shown
            assert f"default via {n.gateway}" in pod.exec(["ip", "route"], check=True).stdout
        ping = a.exec(["ping", "-c1", "-W2", str(b.ip)]) if _has("ping") else None
        assert ping is None or ping.returncode == 0, ping and ping.stdout
        # TCP across the bridge.
        server = b.spawn([sys.executable, "-m", "http.server", "8000"], name="http")
        b.wait_for_port(8000)
        got = a.exec(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://{b.ip}:8000/"]
        )
        assert got.stdout == "200"
        assert server.alive()
        names = [a.netns, b.netns, n.netns]
    assert not set(names) & set(netns.list_netns())
    assert not server.alive()


def _has(tool: str) -> bool:
    import shutil

    return shutil.which(tool) is not None


def test_processes_run_as_the_given_user_with_env_and_a_log(node: Node) -> None:
    pod = node.add_pod("p")
    proc = pod.spawn(
        ["sh", "-c", "id -u; id -g; id -G; echo $GREETING; exec sleep 30"],
        name="who",
        uid=1337,
        gid=1337,
        env={"PATH": os.environ["PATH"], "GREETING": "hi"},
    )
    deadline = time.monotonic() + 5
    while proc.log().count("\n") < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.log().split() == ["1337", "1337", "1337", "hi"]
    assert proc.log_path.parent.parent == node.logdir
    proc.stop(grace=0.5)
    assert not proc.alive()


def test_a_failing_init_container_fails_the_pod_and_leaves_nothing(node: Node) -> None:
    spec = {
        "metadata": {"name": "broken"},
        "spec": {
            "initContainers": [{"name": "setup", "command": ["sh", "-c", "echo nope >&2; exit 7"]}],
            "containers": [{"name": "app", "command": ["sleep", "30"]}],
        },
    }
    with pytest.raises(PodStartError, match=r"setup \(init\) exited 7[\s\S]*nope"):
        start_pod(node, spec)
    assert f"{node.prefix}-broken" not in netns.list_netns()
    assert "broken" not in node.pods


CRASHER = textwrap.dedent(
    """
    import os, sys
    from synchro.local.netns import Node
    n = Node.create(sys.argv[1], logdir=__import__("pathlib").Path(sys.argv[2]))
    pod = n.add_pod("a")
    (n.rundir / "volumes" / "a" / "data").mkdir(parents=True)
    proc = pod.spawn(["sleep", "300"], name="sleeper")
    print(proc.pid, flush=True)
    os.kill(os.getpid(), 9)  # crash: no cleanup
    """
)


def test_a_crashed_run_is_cleaned_up_by_prefix(tmp_path: Path) -> None:
    prefix = netns.new_prefix("synt")
    crashed = subprocess.run(
        [sys.executable, "-c", CRASHER, prefix, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    sleeper = int(crashed.stdout.split()[0])
    try:
        assert f"{prefix}-a" in netns.list_netns()
        assert netns.State.load(netns.STATE_DIR / f"{prefix}.json").owner_alive() is False
        removed = netns.cleanup_prefix("synt", only_dead_owners=True)
        assert {f"{prefix}-node", f"{prefix}-a"} <= set(removed)
        assert not any(name.startswith(prefix) for name in netns.list_netns())
        assert not (netns.STATE_DIR / f"{prefix}.json").exists()
        assert not (netns.RUN_ROOT / prefix).exists()  # the crashed run's volumes too
        deadline = time.monotonic() + 5
        while _running(sleeper) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _running(sleeper)
    finally:
        netns.cleanup_prefix(prefix)


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, not yet reaped


def test_a_live_runs_namespaces_are_left_alone(node: Node) -> None:
    node.add_pod("x")
    netns.cleanup_prefix("synt", only_dead_owners=True)
    assert f"{node.prefix}-x" in netns.list_netns()


def test_volumes_are_mounted_at_their_paths_for_the_container_alone(node: Node) -> None:
    """A program opens its volumes by paths of its own (none on its command line):
    missing directories under `/` and deeper, an existing one covered, a subPath file,
    a read-only mount; hooks, exec probes and `exec` see the same; the host sees none."""
    program = textwrap.dedent(
        """
        import os, time
        cfg = open("/config/app.yaml").read()
        open("/opt/synchro-test-code/ran", "w").write("yes")
        open("seen.tmp", "w").write(cfg + os.getcwd() + "\\n" + open("/etc/one.conf").read())
        os.replace("seen.tmp", "/state/seen")
        time.sleep(60)
        """
    )
    pod = {
        "metadata": {"name": "vols"},
        "spec": {
            "containers": [
                {
                    "name": "app",
                    "command": [sys.executable, "-c", program],
                    "workingDir": "/state",
                    "volumeMounts": [
                        {"name": "state", "mountPath": "/state"},
                        {"name": "cfg", "mountPath": "/config", "readOnly": True},
                        {"name": "cfg", "mountPath": "/etc/one.conf", "subPath": "one.conf"},
                        {"name": "code", "mountPath": "/opt/synchro-test-code"},
                        {"name": "cover", "mountPath": "/srv"},
                        {"name": "code", "mountPath": "/state/nested/code"},
                    ],
                    "lifecycle": {"postStart": {"exec": {"command": ["touch", "/state/hooked"]}}},
                    "readinessProbe": {"exec": {"command": ["test", "-f", "/state/seen"]}},
                }
            ],
            "volumes": [{"name": n, "emptyDir": {}} for n in ("state", "cfg", "code", "cover")],
        },
    }
    files = {"cfg": {"app.yaml": "greeting: hi\n", "one.conf": "one\n"}}
    running = start_pod(node, pod, volume_files=files, timeout=20)
    step = running.plan.step("app")

    def inside(*argv: str) -> subprocess.CompletedProcess[str]:
        return running.exec(list(argv), mounts=step.mounts, cwd=step.cwd)

    seen = inside("cat", "/state/seen")
    assert seen.stdout == "greeting: hi\n/state\none\n", seen.stderr
    assert inside("cat", "/opt/synchro-test-code/ran").stdout == "yes"
    assert inside("test", "-f", "/state/hooked").returncode == 0
    assert inside("pwd").stdout.strip() == "/state"
    assert inside("ls", "/srv").stdout == ""  # covered by its (empty) volume
    # A mount inside another volume gets its mount point made in that volume.
    assert inside("cat", "/state/nested/code/ran").stdout == "yes"
    assert (Path(node.rundir) / "volumes" / "vols" / "state" / "nested" / "code").is_dir()
    assert "Read-only" in inside("touch", "/config/x").stderr
    # The rest of the machine is as it was, in there too.
    assert inside("test", "-x", sys.executable).returncode == 0
    assert inside("test", "-d", "/run/netns").returncode == 0
    for path in ("/state", "/config", "/opt/synchro-test-code", "/etc/one.conf"):
        assert not Path(path).exists(), path
    assert not [p for p in os.listdir("/tmp") if p.startswith(".synchro-root-")]
