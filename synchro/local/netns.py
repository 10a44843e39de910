"""Pods as Linux network namespaces, joined on a bridge in a "node" namespace.

Layout of one node (names are `<prefix>-node`, `<prefix>-<pod>`)::

    <prefix>-node:  lo, br0 (gateway .1 of the subnet)
                     +-- p2 <veth> eth0 in <prefix>-a  (subnet .2, default via .1)
                     +-- p3 <veth> eth0 in <prefix>-b  (subnet .3, default via .1)

The veth pairs are created from inside the node namespace with their peer
placed directly in the Pod's namespace, so nothing ever appears in the root
network namespace. A state file per prefix (under /run/synchro-local) records
the namespaces and processes, so a crashed run can be cleaned up later with
`cleanup_prefix()` or `python -m synchro.local.netns cleanup <prefix>`.

Root is required; `unavailable_reason()` says why this host cannot do it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synchro.local.mountns import Mount, helper_argv

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
ETC_NETNS = Path("/etc/netns")
STATE_DIR = Path(os.environ.get("SYNCHRO_LOCAL_STATE_DIR", "/run/synchro-local"))
RUN_ROOT = Path("/tmp/synchro-local")
DEFAULT_SUBNET = "10.213.0.0/24"
BRIDGE = "br0"
POD_IFACE = "eth0"
CLONE_NEWNET = 0x40000000
CAP_DAC_READ_SEARCH = "dac_read_search"

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")
_PREFIX = re.compile(r"^[a-z][a-z0-9-]{0,23}$")


class LocalError(Exception):
    """Something the local runtime could not do; the message says what and why."""


class CommandFailed(LocalError):
    def __init__(self, argv: Sequence[str], returncode: int, output: str) -> None:
        super().__init__(f"{' '.join(argv)} exited {returncode}: {output.strip()}")
        self.argv = list(argv)
        self.returncode = returncode
        self.output = output


# --- host checks -----------------------------------------------------------------


def unavailable_reason() -> str | None:
    """Why Pods-as-namespaces cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth pairs and iptables); run the tests as root"
    for tool in ("ip", "nsenter", "setpriv"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (iproute2 / util-linux)"
    probe = f"synchro-probe-{os.getpid()}-{secrets.token_hex(2)}"
    try:
        _run(["ip", "netns", "add", probe])
    except LocalError as exc:
        return f"`ip netns` is unavailable: {exc}"
    try:
        _run(["ip", "-n", probe, "link", "add", "pa", "type", "veth", "peer", "name", "pb"])
        _run(["ip", "-n", probe, "link", "add", BRIDGE, "type", "bridge"])
    except LocalError as exc:
        return f"veth pairs or bridges are unavailable: {exc}"
    finally:
        with contextlib.suppress(LocalError):
            _run(["ip", "netns", "del", probe])
    return None


def _run(argv: Sequence[str], *, stdin: str | None = None, timeout: float = 30) -> str:
    proc = subprocess.run(
        list(argv), input=stdin, capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise CommandFailed(argv, proc.returncode, proc.stderr or proc.stdout)
    return proc.stdout


def _ip_batch(netns: str, commands: Sequence[str]) -> None:
    """Several `ip` commands in one process (`ip -batch`): fewer forks per Pod."""
    _run(["ip", "-n", netns, "-batch", "-"], stdin="\n".join(commands) + "\n")


# --- entering a namespace from this process ------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _enter(netns: str) -> None:
    fd = os.open(NETNS_DIR / netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({netns}): {os.strerror(err)}")
    finally:
        os.close(fd)


def netns_socket(
    netns: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM
) -> socket.socket:
    """A socket that lives in `netns`, created without leaving this process.

    The network namespace is per thread: a short-lived thread enters `netns`,
    creates the socket and exits; the socket keeps its namespace for life.
    Its traffic is owned by this process's uid (root: an ordinary app).
    """
    box: dict[str, Any] = {}

    def make() -> None:
        try:
            _enter(netns)
            box["sock"] = socket.socket(family, kind)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=make, name=f"netns-{netns}")
    thread.start()
    thread.join()
    if "error" in box:
        raise LocalError(f"cannot open a socket in {netns}: {box['error']}")
    sock: socket.socket = box["sock"]
    return sock


# --- processes -------------------------------------------------------------------


def _traversable_by_others(path: Path) -> bool:
    for part in [path, *path.parents]:
        try:
            mode = part.stat().st_mode
        except OSError:
            return False
        if stat.S_ISDIR(mode) and not mode & stat.S_IXOTH:
            return False
    return True


def _needs_read_search() -> bool:
    """Whether a non-root process could not load this Python (e.g. pyenv under a
    0700 /root). Such processes get CAP_DAC_READ_SEARCH as an ambient capability:
    they keep their uid (what the iptables owner match sees) and can read the
    interpreter and the project."""
    here = Path(__file__).resolve().parent
    paths = (Path(sys.prefix), Path(os.path.realpath(sys.executable)).parent, here)
    return not all(_traversable_by_others(p) for p in paths)


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if path is None:
        raise LocalError(f"`{name}` is not installed (util-linux)")
    return path


def wrap_argv(
    netns: str,
    argv: Sequence[str],
    uid: int | None,
    gid: int | None,
    mounts: Sequence[Mount] = (),
    cwd: str | None = None,
) -> list[str]:
    """The command line that runs `argv` inside `netns` as `uid`/`gid`, with the
    container's volume `mounts` at their paths (and then in `cwd`, which may be
    inside one of them)."""
    # Absolute paths: the command's own environment may have no useful PATH.
    out = [_tool("nsenter"), f"--net={NETNS_DIR / netns}", "--"]
    if (ETC_NETNS / netns).is_dir():
        # `ip netns exec` also bind-mounts /etc/netns/<netns>/* over /etc
        # (the per-Pod hosts file of `synchro up`).
        out = [_tool("ip"), "netns", "exec", netns]
    if mounts:
        # As root, before the uid switch: a mount namespace of the command's own.
        out += helper_argv(mounts, cwd)
    if uid is not None or gid is not None:
        out += [_tool("setpriv"), "--clear-groups"]
        if uid is not None:
            out.append(f"--reuid={uid}")
        if gid is not None:
            out.append(f"--regid={gid}")
        if uid not in (None, 0) and _needs_read_search():
            out += [
                f"--inh-caps=+{CAP_DAC_READ_SEARCH}",
                f"--ambient-caps=+{CAP_DAC_READ_SEARCH}",
            ]
        out.append("--")
    return out + list(argv)


def _proc_start_time(pid: int) -> int | None:
    """Kernel start time of `pid` (to tell it from a later process reusing the pid)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(text.rsplit(")", 1)[1].split()[19])


@dataclass
class Process:
    """A process started in a Pod's namespace, in its own process group."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    netns: str

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)

    def stop(self, grace: float = 2.0) -> int:
        """SIGTERM the process group, then SIGKILL after `grace` seconds."""
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait(5)
        # Children that outlived their leader would keep the namespace busy.
        self.signal(signal.SIGKILL)
        return self.popen.returncode


def base_env() -> dict[str, str]:
    """What a container process inherits from the host: enough to find programs."""
    env = {"PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"), "LANG": "C.UTF-8"}
    for key in ("PYTHONPATH", "VIRTUAL_ENV", "PYENV_VERSION", "PYENV_ROOT", "TZ"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


# --- the registry of what a prefix owns ------------------------------------------------

_SAVE_LOCK = threading.Lock()


@dataclass
class State:
    prefix: str
    owner_pid: int
    owner_start: int | None
    netns: list[str] = field(default_factory=list)
    pids: list[tuple[int, int | None]] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return STATE_DIR / f"{self.prefix}.json"

    def save(self) -> None:
        with _SAVE_LOCK:  # Pods of one node may start from several threads
            self._save()

    def _save(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "prefix": self.prefix,
                    "owner_pid": self.owner_pid,
                    "owner_start": self.owner_start,
                    "netns": self.netns,
                    "pids": self.pids,
                }
            )
        )
        tmp.replace(self.path)

    @classmethod
    def load(cls, path: Path) -> State:
        data = json.loads(path.read_text())
        return cls(
            prefix=data["prefix"],
            owner_pid=data["owner_pid"],
            owner_start=data.get("owner_start"),
            netns=list(data.get("netns", [])),
            pids=[(int(p), s) for p, s in data.get("pids", [])],
        )

    def owner_alive(self) -> bool:
        start = _proc_start_time(self.owner_pid)
        return start is not None and start == self.owner_start


def list_netns() -> list[str]:
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def _kill_netns_processes(netns: str) -> None:
    for _ in range(20):
        try:
            pids = [int(p) for p in _run(["ip", "netns", "pids", netns]).split()]
        except LocalError:
            return
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    log.warning("processes in %s survived SIGKILL", netns)


def delete_netns(netns: str) -> None:
    """Kill every process in `netns`, then delete it (its veth ends go with it)."""
    if not (NETNS_DIR / netns).exists():
        return
    _kill_netns_processes(netns)
    try:
        _run(["ip", "netns", "del", netns])
    except LocalError as exc:
        log.warning("could not delete netns %s: %s", netns, exc)


def cleanup_prefix(prefix: str, *, only_dead_owners: bool = False) -> list[str]:
    """Remove the namespaces and processes of every run whose prefix starts with
    `prefix`. With `only_dead_owners`, runs whose creating process is still
    alive are left alone (another test session may be using them).
    Returns the namespaces deleted."""
    removed: list[str] = []
    live_prefixes: list[str] = []
    states = sorted(STATE_DIR.glob(f"{prefix}*.json")) if STATE_DIR.exists() else []
    for path in states:
        try:
            state = State.load(path)
        except (OSError, ValueError, KeyError):
            path.unlink(missing_ok=True)
            continue
        if only_dead_owners and state.owner_alive():
            live_prefixes.append(state.prefix)
            continue
        for pid, start in state.pids:
            if start is not None and _proc_start_time(pid) == start:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
        for netns in state.netns:
            if netns in list_netns():
                delete_netns(netns)
                removed.append(netns)
        path.unlink(missing_ok=True)
        _remove_rundir(state.prefix)
    # Namespaces with no state file left are orphans of an interrupted cleanup.
    for netns in list_netns():
        if netns.startswith(prefix) and not any(
            netns.startswith(live + "-") for live in live_prefixes
        ):
            delete_netns(netns)
            removed.append(netns)
    return removed


def _remove_rundir(prefix: str) -> None:
    """A dead run's shared volumes, and its run directory once empty (logs a
    caller asked to keep elsewhere are not in it)."""
    rundir = RUN_ROOT / prefix
    shutil.rmtree(rundir / "volumes", ignore_errors=True)
    with contextlib.suppress(OSError):
        rundir.rmdir()


def new_prefix(base: str = "syn") -> str:
    """A fresh name prefix: `<base>-<6 hex>`."""
    return f"{base}-{secrets.token_hex(3)}"


# --- node and pods ---------------------------------------------------------------


@dataclass
class PodNet:
    """One Pod's network namespace on a node."""

    node: Node
    name: str
    netns: str
    ip: ipaddress.IPv4Address
    ip6: ipaddress.IPv6Address | None
    processes: list[Process] = field(default_factory=list)

    def spawn(
        self,
        argv: Sequence[str],
        *,
        name: str | None = None,
        uid: int | None = None,
        gid: int | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        log_path: Path | None = None,
        mounts: Sequence[Mount] = (),
    ) -> Process:
        """Start `argv` in this namespace (stdout+stderr to a log file); returns at once.

        `env` is the whole environment (see `base_env()`); None inherits ours.
        `mounts` are the container's volumes, seen at their paths by it alone.
        """
        pname = name or Path(argv[0]).name
        log_path = log_path or self.node.logdir / self.name / f"{pname}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as logf:
            popen = subprocess.Popen(
                wrap_argv(self.netns, argv, uid, gid, mounts, str(cwd) if cwd else None),
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                # With mounts the helper changes directory, once the volumes are there.
                cwd=None if mounts else cwd,
                start_new_session=True,
            )
        proc = Process(pname, popen, log_path, self.netns)
        self.processes.append(proc)
        self.node.state.pids.append((popen.pid, _proc_start_time(popen.pid)))
        self.node.state.save()
        log.debug("started %s in %s as pid %d", pname, self.netns, popen.pid)
        return proc

    def exec(
        self,
        argv: Sequence[str],
        *,
        uid: int | None = None,
        gid: int | None = None,
        env: Mapping[str, str] | None = None,
        input: str | None = None,
        timeout: float = 30,
        check: bool = False,
        mounts: Sequence[Mount] = (),
        cwd: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` to completion in this namespace, capturing its output."""
        proc = subprocess.run(
            wrap_argv(self.netns, argv, uid, gid, mounts, cwd),
            input=input,
            capture_output=True,
            text=True,
            env=dict(env) if env is not None else None,
            cwd=None if mounts else cwd,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise CommandFailed(argv, proc.returncode, proc.stderr + proc.stdout)
        return proc

    def new_socket(
        self, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM
    ) -> socket.socket:
        return netns_socket(self.netns, family, kind)

    def connect(self, host: str, port: int, timeout: float = 5.0) -> socket.socket:
        """A TCP connection from this Pod, made by this (root) process: an app's."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = self.new_socket(family)
        sock.settimeout(timeout)
        try:
            sock.connect((host, port))
        except OSError:
            sock.close()
            raise
        return sock

    def wait_for_port(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        """Block until something accepts TCP connections on host:port in this Pod."""
        deadline = time.monotonic() + timeout
        last: OSError | None = None
        while time.monotonic() < deadline:
            try:
                self.connect(host, port, timeout=1.0).close()
                return
            except OSError as exc:
                last = exc
                time.sleep(0.02)
        raise LocalError(f"{self.name}: nothing listens on {host}:{port} after {timeout}s ({last})")

    def stop_processes(self, grace: float = 2.0) -> None:
        for proc in reversed(self.processes):
            proc.stop(grace)

    def close(self) -> None:
        self.stop_processes(grace=1.0)
        delete_netns(self.netns)


class Node:
    """A node namespace with a bridge; `add_pod()` joins Pods to it."""

    def __init__(
        self,
        prefix: str,
        *,
        subnet: str = DEFAULT_SUBNET,
        ipv6_subnet: str | None = None,
        logdir: Path | None = None,
    ) -> None:
        if not _PREFIX.match(prefix):
            raise LocalError(
                f"bad prefix {prefix!r}: lowercase letters, digits and '-', at most 24"
            )
        net = ipaddress.ip_network(subnet)
        if not isinstance(net, ipaddress.IPv4Network) or not (
            net.subnet_of(ipaddress.IPv4Network("10.0.0.0/8"))
            or net.subnet_of(ipaddress.IPv4Network("172.16.0.0/12"))
        ):
            raise LocalError(f"subnet {subnet} must be IPv4 inside 10.0.0.0/8 or 172.16.0.0/12")
        self.prefix = prefix
        self.subnet = net
        self.subnet6 = ipaddress.IPv6Network(ipv6_subnet) if ipv6_subnet else None
        self.netns = f"{prefix}-node"
        # Files the Pods' processes share (volumes); removed by close().
        self.rundir = RUN_ROOT / prefix
        self.logdir = logdir or self.rundir / "logs"
        self.pods: dict[str, PodNet] = {}
        self._hosts = self.subnet.hosts()
        self.gateway = next(self._hosts)
        self.gateway6 = self.subnet6[1] if self.subnet6 else None
        self._index = 1
        self._lock = threading.Lock()
        self.state = State(prefix, os.getpid(), _proc_start_time(os.getpid()))
        self._closed = False

    @classmethod
    def create(
        cls,
        prefix: str | None = None,
        *,
        subnet: str = DEFAULT_SUBNET,
        ipv6_subnet: str | None = None,
        logdir: Path | None = None,
    ) -> Node:
        """Create the node namespace and its bridge. Root only."""
        if os.geteuid() != 0:
            raise LocalError("Pods as network namespaces need root")
        node = cls(prefix or new_prefix(), subnet=subnet, ipv6_subnet=ipv6_subnet, logdir=logdir)
        try:
            node._setup()
        except BaseException:
            node.close()
            raise
        return node

    def _setup(self) -> None:
        if self.netns in list_netns():
            raise LocalError(f"namespace {self.netns} exists already; pick another prefix")
        self.state.netns.append(self.netns)
        self.state.save()
        _run(["ip", "netns", "add", self.netns])
        cmds = [
            "link set lo up",
            f"link add {BRIDGE} type bridge",
            f"addr add {self.gateway}/{self.subnet.prefixlen} dev {BRIDGE}",
            f"link set {BRIDGE} up",
        ]
        if self.subnet6 and self.gateway6:
            cmds.insert(3, f"addr add {self.gateway6}/{self.subnet6.prefixlen} dev {BRIDGE} nodad")
        _ip_batch(self.netns, cmds)

    def add_pod(self, name: str) -> PodNet:
        """A new Pod namespace on the bridge with the next free address."""
        if not _NAME.match(name):
            raise LocalError(f"bad pod name {name!r}: DNS label of at most 40 characters")
        with self._lock:  # Pods may be added from several threads
            if name in self.pods or name == "node":
                raise LocalError(f"pod {name!r} exists already on {self.netns}")
            try:
                ip = next(self._hosts)
            except StopIteration:
                raise LocalError(f"subnet {self.subnet} is full") from None
            self._index += 1
            index = self._index
            ip6 = self.subnet6[index] if self.subnet6 else None
            netns = f"{self.prefix}-{name}"
            pod = PodNet(self, name, netns, ip, ip6)
            self.pods[name] = pod
            self.state.netns.append(netns)
        self.state.save()
        _run(["ip", "netns", "add", netns])
        host_end = f"p{index}"
        _ip_batch(
            self.netns,
            [
                f"link add {host_end} type veth peer name {POD_IFACE} netns {netns}",
                f"link set {host_end} master {BRIDGE}",
                f"link set {host_end} up",
            ],
        )
        cmds = [
            "link set lo up",
            f"link set {POD_IFACE} up",
            f"addr add {ip}/{self.subnet.prefixlen} dev {POD_IFACE}",
            f"route add default via {self.gateway}",
        ]
        if ip6 is not None and self.subnet6 is not None:
            cmds.insert(3, f"addr add {ip6}/{self.subnet6.prefixlen} dev {POD_IFACE} nodad")
            cmds.append(f"route add default via {self.gateway6}")
        _ip_batch(netns, cmds)
        return pod

    def remove_pod(self, name: str) -> None:
        """Stop the Pod's processes and delete its namespace."""
        pod = self.pods.pop(name, None)
        if pod is None:
            return
        pod.close()
        with contextlib.suppress(ValueError):
            self.state.netns.remove(pod.netns)
        self.state.save()
        shutil.rmtree(self.rundir / "volumes" / name, ignore_errors=True)

    def close(self) -> None:
        """Stop every process and delete every namespace of this node. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for pod in list(self.pods.values()):
            with contextlib.suppress(Exception):
                pod.stop_processes(grace=1.0)
        for netns in reversed(self.state.netns):
            delete_netns(netns)
        self.pods.clear()
        self.state.path.unlink(missing_ok=True)
        _remove_rundir(self.prefix)

    def __enter__(self) -> Node:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def node(prefix: str | None = None, **kwargs: Any) -> Iterator[Node]:
    """`with node() as n: a = n.add_pod("a")` - always cleaned up."""
    n = Node.create(prefix, **kwargs)
    try:
        yield n
    finally:
        n.close()


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m synchro.local.netns cleanup <prefix>|list`."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["list"]:
        for path in sorted(STATE_DIR.glob("*.json")) if STATE_DIR.exists() else []:
            state = State.load(path)
            alive = "alive" if state.owner_alive() else "dead"
            print(f"{state.prefix}\towner {state.owner_pid} ({alive})\t{' '.join(state.netns)}")
        return 0
    if len(args) == 2 and args[0] == "cleanup":
        for netns in cleanup_prefix(args[1]):
            print(f"deleted {netns}")
        return 0
    print("usage: python -m synchro.local.netns list | cleanup <prefix>", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
