"""A container's volumes at their mountPaths, in a private mount namespace.

A local Pod's volumes are directories on this machine; its containers should
see them where the Pod spec mounts them (`/config`, `/opt/app`, `/state`),
whatever names the path: the command line, a script, or a file name built
inside the program. Each container process (and `synchro exec`, hooks and exec
probes) therefore starts through this small program, which

1. enters a new mount namespace whose mounts follow the host's (slave), so
   nothing it mounts is seen outside and everything goes with its processes;
2. bind-mounts each volume directory (or file, for a `subPath`) at its
   mountPath. A mountPath that does not exist on this machine gets a mount
   point made for it without touching the host: its deepest existing
   directory is covered, in this namespace only, by a tmpfs that holds the
   same entries (each one a bind of the original, so reads and writes reach
   the host's files) plus the new directories. For a directory right under
   `/` a new root is assembled that way and entered with pivot_root;
3. changes to the container's working directory and execs the command.

It runs as a script with the standard library only (`python -I -S`), before
the uid switch, so its start-up stays in the tens of milliseconds that exec
probes can afford. `helper_argv()` builds its command line.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

CLONE_NEWNS = 0x00020000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_SLAVE = 1 << 19
MNT_DETACH = 2
# pivot_root has no glibc wrapper: its syscall number by machine.
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
_OLD_ROOT = ".synchro-old-root"


class MountError(Exception):
    """A volume could not be mounted where the Pod spec puts it."""


@dataclass(frozen=True)
class Mount:
    """One volume mount of a container: `source` on this machine at `path` inside."""

    path: str
    source: str
    read_only: bool = False

    def to_dict(self) -> dict[str, object]:
        return {"path": self.path, "source": self.source, "read_only": self.read_only}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Mount:
        return cls(str(data["path"]), str(data["source"]), bool(data.get("read_only")))


def helper_argv(mounts: Sequence[Mount], cwd: str | None = None) -> list[str]:
    """The command-line prefix that runs a command with `mounts` (and in `cwd`)."""
    spec = {"mounts": [m.to_dict() for m in mounts], "cwd": cwd}
    return [sys.executable, "-I", "-S", os.path.abspath(__file__), json.dumps(spec), "--"]


def order(mounts: Iterable[Mount]) -> list[Mount]:
    """Parents before children, as the kubelet mounts them."""
    return sorted(mounts, key=lambda m: (os.path.normpath(m.path).count("/"), m.path))


# --- the I/O: only ever run in the helper process -------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise MountError(f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    _check(
        _libc.mount(
            source.encode() if source is not None else None,
            target.encode(),
            fstype.encode() if fstype is not None else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {source or fstype} on {target}",
    )


def _umount(target: str) -> None:
    _check(_libc.umount2(target.encode(), MNT_DETACH), f"umount {target}")


def _pivot_root(new_root: str, put_old: str) -> None:
    number = _SYS_PIVOT_ROOT.get(platform.machine())
    if number is None:
        subprocess.run(["pivot_root", new_root, put_old], check=True)
        return
    _check(_libc.syscall(number, new_root.encode(), put_old.encode()), "pivot_root")


def _tmpfs(target: str, like: os.stat_result) -> None:
    mode = stat.S_IMODE(like.st_mode)
    _mount(
        "tmpfs",
        target,
        "tmpfs",
        MS_NOSUID | MS_NODEV,
        f"mode={mode:o},uid={like.st_uid},gid={like.st_gid}",
    )


def _fill(target: str, source: str) -> None:
    """`target` (a fresh tmpfs) gets every entry of directory `source`: symlinks
    copied, everything else bind-mounted (directories with their submounts)."""
    for name in os.listdir(source):
        src, dst = os.path.join(source, name), os.path.join(target, name)
        try:
            st = os.lstat(src)
        except FileNotFoundError:
            continue  # gone meanwhile
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(src), dst)
            continue
        if stat.S_ISDIR(st.st_mode):
            os.mkdir(dst, 0o755)
        else:
            with open(dst, "w"):
                pass
        try:
            _mount(src, dst, None, MS_BIND | MS_REC)
        except MountError:
            # Something the kernel will not bind (e.g. a dying namespace file):
            # leave the entry out rather than fail the container.
            (os.rmdir if stat.S_ISDIR(st.st_mode) else os.unlink)(dst)


def _shadow(directory: str) -> int:
    """Cover `directory` with a tmpfs holding the same entries; its device number."""
    like = os.stat(directory)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _tmpfs(directory, like)
        # The covered original stays reachable through the descriptor.
        _fill(directory, f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    return os.stat(directory).st_dev


def _new_root() -> int:
    """Make `/` a tmpfs holding the host's top-level entries; its device number."""
    # An unpredictable name (mkdtemp, mode 0700): another local user cannot
    # claim it in advance in the shared /tmp.
    scratch = tempfile.mkdtemp(
        prefix=".synchro-root-", dir="/tmp" if os.path.isdir("/tmp") else "/run"
    )
    try:
        _tmpfs(scratch, os.stat("/"))
        _fill(scratch, "/")
        os.mkdir(os.path.join(scratch, _OLD_ROOT))
        os.chdir(scratch)
        _pivot_root(".", _OLD_ROOT)
        os.chdir("/")
        _umount("/" + _OLD_ROOT)
        os.rmdir("/" + _OLD_ROOT)
        # The bind of the host's /tmp (or /run) caught the new root mounted on the
        # scratch directory: that copy and the directory go in `finally`.
    finally:
        for undo in (_umount, os.rmdir):
            # Done already (the usual case), or the mount goes with this namespace.
            with contextlib.suppress(MountError, OSError):
                undo(scratch)
    return os.stat("/").st_dev


def _missing(path: str) -> tuple[str, list[str]]:
    """The deepest existing directory of `path` and the names below it that are missing."""
    names: list[str] = []
    here = path
    while not os.path.lexists(here):
        here, name = os.path.split(here)
        names.insert(0, name)
    return here, names


def _place(m: Mount, ours: set[int], volumes: list[str]) -> None:
    if not os.path.lexists(m.source):
        os.makedirs(m.source, exist_ok=True)  # a subPath the kubelet would create
    is_dir = os.path.isdir(m.source)
    target = os.path.realpath(m.path)
    if os.path.lexists(target):
        if os.path.isdir(target) != is_dir:
            kind = "a directory" if is_dir else "a file"
            raise MountError(f"{m.path}: cannot mount {kind} ({m.source}) over it")
    else:
        parent, names = _missing(target)
        if not os.path.isdir(parent):
            raise MountError(f"{m.path}: {parent} is not a directory")
        inside_volume = any(parent == v or parent.startswith(v + "/") for v in volumes)
        # In a volume mounted before, the mount point is made in that volume, as
        # the kubelet makes it; on a tmpfs of ours it is made there.
        if not inside_volume and os.stat(parent).st_dev not in ours:
            ours.add(_shadow(parent))
        here = parent
        for i, name in enumerate(names):
            here = os.path.join(here, name)
            if i == len(names) - 1 and not is_dir:
                with open(here, "w"):
                    pass
            else:
                os.mkdir(here, 0o755)
    _mount(m.source, target, None, MS_BIND | MS_REC)
    volumes.append(target)
    if m.read_only:
        _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY)


def setup(mounts: Sequence[Mount]) -> None:
    """In a new mount namespace, every mount of `mounts` at its path."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    # Host mounts keep arriving (new Pods' namespace files); ours never leave.
    _mount(None, "/", None, MS_REC | MS_SLAVE)
    ours: set[int] = set()
    mounts = order(mounts)
    if any(_missing(os.path.realpath(m.path))[0] == "/" for m in mounts):
        ours.add(_new_root())
    volumes: list[str] = []
    for m in mounts:
        _place(m, ours, volumes)


def main(argv: Sequence[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: mountns.py SPEC -- COMMAND...", file=sys.stderr)
        return 2
    spec = json.loads(argv[0])
    try:
        setup([Mount.from_dict(m) for m in spec.get("mounts") or []])
        cwd = spec.get("cwd")
        if cwd:
            os.chdir(cwd)
    except (MountError, OSError) as exc:
        print(f"synchro: volume mounts: {exc}", file=sys.stderr)
        return 126
    command = list(argv[2:])
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        print(f"synchro: {command[0]}: {exc}", file=sys.stderr)
        return 127
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
