"""Balancer cores with a fake clock and seeded randomness."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from proxy.traffic.balancer import (
    LeastRequest,
    Maglev,
    PeakEwma,
    RingHash,
    RoundRobin,
    make_balancer,
)

EPS = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]


def drive(balancer, latencies: dict[str, float], n: int, rng: random.Random) -> Counter[str]:
    """Sequential requests; each completes with its endpoint's latency."""
    now = 0.0
    picks: Counter[str] = Counter()
    for _ in range(n):
        ep = balancer.pick(list(latencies), now, rng)
        balancer.on_start(ep, now)
        now += latencies[ep]
        balancer.on_end(ep, now, latencies[ep], True)
        picks[ep] += 1
    return picks


def test_ewma_prefers_fast_endpoint_tenfold_slower_other() -> None:
    picks = drive(PeakEwma(), {"fast": 0.005, "slow": 0.050}, 2000, random.Random(1))
    assert picks["fast"] / 2000 >= 0.9


def test_ewma_peak_reacts_at_once_and_decays_slowly() -> None:
    b = PeakEwma(decay=10.0)
    b.on_end("a", 0.0, 0.010, True)
    b.on_end("a", 1.0, 0.500, True)  # a spike is taken at once
    assert b.estimate("a", 1.0) == pytest.approx(0.5)
    b.on_end("a", 2.0, 0.010, True)  # one second later, mostly still the spike
    assert 0.4 < b.estimate("a", 2.0) < 0.5
    b.on_end("a", 60.0, 0.010, True)  # after many decay constants, back near 10 ms
    assert b.estimate("a", 60.0) < 0.02


def test_ewma_new_endpoint_gets_default_rtt_and_is_tried() -> None:
    b = PeakEwma(default_rtt=0.03)
    b.on_end("old", 0.0, 0.2, True)
    assert b.estimate("new", 0.0) == 0.03
    assert b.pick(["old", "new"], 0.0, random.Random(0)) == "new"


def test_ewma_outstanding_requests_raise_the_score() -> None:
    b = PeakEwma()
    for ep in ("a", "b"):
        b.on_end(ep, 0.0, 0.010, True)
    for _ in range(5):
        b.on_start("a", 0.0)
    assert b.pick(["a", "b"], 0.0, random.Random(3)) == "b"


def test_round_robin_cycles_and_avoid_skips_previous_endpoint() -> None:
    rr = RoundRobin()
    rng = random.Random(0)
    assert [rr.pick(EPS, 0, rng) for _ in range(6)] == EPS * 2
    for _ in range(10):
        assert rr.pick(EPS, 0, rng, avoid={EPS[0]}) != EPS[0]
    assert rr.pick(["only"], 0, rng, avoid={"only"}) == "only"


def test_least_request_avoids_busy_endpoint() -> None:
    lr = LeastRequest()
    for _ in range(10):
        lr.on_start("busy", 0)
    picks = Counter(lr.pick(["busy", "idle"], 0, random.Random(i)) for i in range(50))
    assert picks == Counter({"idle": 50})


@pytest.mark.parametrize("cls", [RingHash, Maglev])
def test_consistent_hash_is_sticky_and_moves_few_keys(cls) -> None:
    b = cls()
    rng = random.Random(0)
    eps = [f"10.0.0.{i}:80" for i in range(1, 11)]
    keys = [f"user-{i}".encode() for i in range(2000)]
    before = {k: b.pick(eps, 0, rng, hash_key=k) for k in keys}
    assert before == {k: b.pick(eps, 0, rng, hash_key=k) for k in keys}
    spread = Counter(before.values())
    assert len(spread) == 10 and min(spread.values()) > 2000 / 10 / 3
    after = {k: b.pick(eps[:-1], 0, rng, hash_key=k) for k in keys}
    moved = sum(before[k] != after[k] for k in keys)
    # Only keys of the removed endpoint should move (plus a little for Maglev).
    assert moved <= spread[eps[-1]] * 1.3


def test_consistent_hash_retry_avoids_previous_endpoint() -> None:
    for b in (RingHash(), Maglev()):
        first = b.pick(EPS, 0, random.Random(0), hash_key=b"k")
        assert first is not None
        again = b.pick(EPS, 0, random.Random(0), hash_key=b"k", avoid={first})
        assert again != first


def test_make_balancer_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown load balancer 'fastest'"):
        make_balancer("fastest")
    assert isinstance(make_balancer("ewma"), PeakEwma)


def test_empty_endpoint_list_gives_none() -> None:
    for kind in ("ewma", "round_robin", "least_request", "random", "ring_hash", "maglev"):
        assert make_balancer(kind).pick([], 0.0, random.Random(0)) is None


def test_ewma_new_replica_gets_traffic_beside_a_fast_known_one() -> None:
    """Sequential requests (nothing in flight): a scaled-up replica must be
    probed, not lose every comparison to a 1 ms endpoint."""
    b = PeakEwma(default_rtt=0.03)
    rng = random.Random(11)
    now = 0.0
    for _ in range(20):  # only "old" exists and is fast
        b.on_start("old", now)
        now += 0.001
        b.on_end("old", now, 0.001, True)
    picks = drive(b, {"old": 0.001, "new1": 0.001, "new2": 0.001}, 300, rng)
    assert picks["new1"] > 30 and picks["new2"] > 30


def test_two_choices_are_distinct_and_cover_every_ordered_pair() -> None:
    from proxy.traffic.balancer import _two_distinct

    rng = random.Random(5)
    seen = Counter(_two_distinct(["a", "b", "c"], rng) for _ in range(3000))
    assert all(x != y for x, y in seen)
    assert len(seen) == 6  # each ordered pair: ties go either way
    assert min(seen.values()) > 400  # about 500 each
