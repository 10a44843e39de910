"""The local mesh's liveness and restart decisions on a fake clock."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from synchro.local import probes
from synchro.local.probes import Action


@dataclass(frozen=True)
class P:
    initial_delay: float = 0.0
    period: float = 10.0
    failure_threshold: int = 3


def run(probe: P, results: dict[float, bool], until: float, step: float = 1.0) -> list[float]:
    """Tick every `step` seconds from a container start at 0; probe results by
    time (missing: the last one given). The times at which it is killed."""
    state = probes.start(probe, 0.0)
    kills: list[float] = []
    ok = True
    now = 0.0
    while now <= until:
        ok = results.get(now, ok)
        if probes.due(state, now):
            state, action = probes.observe(state, probe, ok, now)
            if action is Action.KILL:
                kills.append(now)
                state = probes.start(probe, now)  # restarted at once
        now += step
    return kills


def test_nothing_is_probed_before_the_initial_delay() -> None:
    probe = P(initial_delay=15, period=5)
    state = probes.start(probe, 100.0)
    assert not probes.due(state, 114.9) and probes.due(state, 115.0)


def test_failure_threshold_failures_in_a_row_kill_one_period_apart() -> None:
    probe = P(initial_delay=5, period=2, failure_threshold=3)
    # Failing from t=10: probes at 11, 13, 15 fail; the third kills.
    assert run(probe, {0: True, 10: False}, until=15) == [15]


def test_a_success_resets_the_count() -> None:
    probe = P(period=1, failure_threshold=3)
    flaky = {float(t): t % 3 == 0 for t in range(30)}  # two failures, then a success
    assert run(probe, flaky, until=29) == []


def test_a_restarted_container_gets_its_initial_delay_again() -> None:
    probe = P(initial_delay=4, period=1, failure_threshold=2)
    # Always failing: first probes at 4, 5 (kill at 5); restarted at 5, probes at 9, 10.
    assert run(probe, {0: False}, until=15) == [5, 10, 15]


def test_observe_is_pure_and_counts() -> None:
    probe = P(period=3, failure_threshold=2)
    s0 = probes.Liveness(next_at=0.0)
    s1, a1 = probes.observe(s0, probe, False, 1.0)
    assert (s1.failures, s1.next_at, a1) == (1, 4.0, Action.NONE)
    s2, a2 = probes.observe(s1, probe, False, 4.0)
    assert (s2.failures, a2) == (2, Action.KILL)
    s3, a3 = probes.observe(s1, probe, True, 4.0)
    assert (s3.failures, a3) == (0, Action.NONE)
    assert s0 == probes.Liveness(next_at=0.0)


@pytest.mark.parametrize(
    ("policy", "code", "sidecar", "expected"),
    [
        ("Always", 0, False, True),
        ("Always", 137, False, True),
        ("OnFailure", 0, False, False),
        ("OnFailure", 137, False, True),  # killed by a failed liveness probe
        ("OnFailure", -15, False, True),
        ("Never", 137, False, False),
        ("Never", 1, True, True),  # a native sidecar restarts whatever the Pod says
    ],
)
def test_restart_policy(policy: str, code: int, sidecar: bool, expected: bool) -> None:
    assert probes.restarts(policy, code, sidecar=sidecar) is expected


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({}, "Always"),
        ({"restartPolicy": "Never"}, "Never"),
        ({"restartPolicy": "OnFailure"}, "OnFailure"),
        ({"restartPolicy": "bogus"}, "Always"),
        (None, "Always"),
    ],
)
def test_restart_policy_of_a_spec(spec: object, expected: str) -> None:
    assert probes.restart_policy(spec) == expected
