"""Pods as Linux network namespaces: shared by the tests and by `synchro up`.

from synchro.local import node, start_pod
with node() as n:                      # a node namespace with a bridge
    a = n.add_pod("a")                 # a bare Pod namespace: a.ip, a.exec(), a.spawn()
    web = start_pod(n, injected_spec)  # init containers, proxy as 1337, apps
    web.exec(["curl", ...])
# everything is gone here; after a crash: cleanup_prefix("<prefix>")
"""

from synchro.local.netns import (
    LocalError,
    Node,
    PodNet,
    Process,
    cleanup_prefix,
    netns_socket,
    new_prefix,
    node,
    unavailable_reason,
)
from synchro.local.pod import Pod, PodStartError, inject_and_start, start_pod
from synchro.local.podplan import PodSpecError

__all__ = [
    "LocalError",
    "Node",
    "Pod",
    "PodNet",
    "PodSpecError",
    "PodStartError",
    "Process",
    "cleanup_prefix",
    "inject_and_start",
    "netns_socket",
    "new_prefix",
    "node",
    "start_pod",
    "unavailable_reason",
]
