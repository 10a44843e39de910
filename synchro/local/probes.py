"""The kubelet's liveness and restart decisions for a local Pod (pure: the clock
is an argument, no probes run here).

A container's liveness probe first runs `initialDelaySeconds` after the
container started, then every `periodSeconds`; `failureThreshold` failures in a
row and the container is killed. Whether a container that ended (killed, or
exited on its own) starts again is the Pod's `restartPolicy`: `Always`, or
`OnFailure` for a non-zero exit (a killed container's is); never with `Never`.
A native sidecar (an init container with `restartPolicy: Always`) always
restarts.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

ALWAYS = "Always"
ON_FAILURE = "OnFailure"
NEVER = "Never"
RESTART_POLICIES = (ALWAYS, ON_FAILURE, NEVER)


class ProbeTiming(Protocol):
    """What the schedule needs of a probe (podplan.Probe has it)."""

    @property
    def initial_delay(self) -> float: ...
    @property
    def period(self) -> float: ...
    @property
    def failure_threshold(self) -> int: ...


@dataclass(frozen=True)
class Liveness:
    """One container's liveness probing since it (re)started."""

    next_at: float  # when the next probe is due
    failures: int = 0  # consecutive failures


class Action(enum.Enum):
    NONE = "none"
    KILL = "kill"  # failureThreshold failures in a row: kill the container


def start(probe: ProbeTiming, started_at: float) -> Liveness:
    """The schedule of a container that started at `started_at`."""
    return Liveness(next_at=started_at + max(0.0, probe.initial_delay))


def due(state: Liveness, now: float) -> bool:
    return now >= state.next_at


def observe(state: Liveness, probe: ProbeTiming, ok: bool, now: float) -> tuple[Liveness, Action]:
    """A probe result at `now`: the next state, and whether to kill the container."""
    period = max(probe.period, 0.1)
    if ok:
        return Liveness(now + period, 0), Action.NONE
    failures = state.failures + 1
    if failures >= max(1, probe.failure_threshold):
        # The container is killed; a restarted one gets a fresh schedule.
        return Liveness(now + period, failures), Action.KILL
    return Liveness(now + period, failures), Action.NONE


def restarts(policy: str, exit_code: int | None, *, sidecar: bool = False) -> bool:
    """Whether the kubelet starts a container again after it ended with `exit_code`."""
    if sidecar or policy == ALWAYS:
        return True
    if policy == ON_FAILURE:
        return exit_code != 0
    return False


def restart_policy(pod_spec: Any) -> str:
    """The Pod's restartPolicy (Kubernetes' default: Always)."""
    policy = pod_spec.get("restartPolicy") if isinstance(pod_spec, Mapping) else None
    return policy if isinstance(policy, str) and policy in RESTART_POLICIES else ALWAYS


__all__ = [
    "ALWAYS",
    "NEVER",
    "ON_FAILURE",
    "Action",
    "Liveness",
    "due",
    "observe",
    "restart_policy",
    "restarts",
    "start",
]
