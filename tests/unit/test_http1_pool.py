"""The HTTP/1.1 pool's pure core: reuse order, idle expiry and bounds, on a fake clock."""

from __future__ import annotations

import pytest

from proxy.pool import IdleSet, PoolSettings


def make(**kw: float) -> IdleSet[str]:
    return IdleSet(PoolSettings(**kw))  # type: ignore[arg-type]


def test_newest_idle_connection_is_reused_first() -> None:
    s = make(idle_timeout=10)
    assert s.put("a", "c1", now=0)
    assert s.put("a", "c2", now=1)
    assert s.take("a", now=2) == ("c2", [])
    assert s.take("a", now=2) == ("c1", [])
    assert s.take("a", now=2) == (None, [])
    assert s.total == 0


def test_upstreams_are_kept_apart() -> None:
    s = make()
    s.put("a", "ca", now=0)
    assert s.take("b", now=0) == (None, [])
    assert s.take("a", now=0) == ("ca", [])


def test_expired_connections_are_not_handed_out_but_returned_for_closing() -> None:
    s = make(idle_timeout=10)
    s.put("a", "old", now=0)
    s.put("a", "newer", now=5)
    item, expired = s.take("a", now=15.5)
    assert item is None
    assert sorted(expired) == ["newer", "old"]
    assert s.total == 0


def test_expire_sweeps_and_says_when_next() -> None:
    s = make(idle_timeout=10)
    s.put("a", "a1", now=0)
    s.put("a", "a2", now=4)
    s.put("b", "b1", now=2)
    expired, next_at = s.expire(now=10)
    assert expired == ["a1"]
    assert next_at == 12  # b1
    expired, next_at = s.expire(now=14)
    assert sorted(expired) == ["a2", "b1"]
    assert next_at is None
    assert s.total == 0


def test_bounds_per_upstream_and_total() -> None:
    s = make(max_idle_per_upstream=2, max_idle_total=3)
    assert s.put("a", "1", now=0)
    assert s.put("a", "2", now=0)
    assert not s.put("a", "3", now=0)
    assert s.put("b", "4", now=0)
    assert not s.put("c", "5", now=0)
    assert s.total == 3


def test_discard_and_drain() -> None:
    s = make()
    s.put("a", "1", now=0)
    s.put("a", "2", now=0)
    assert s.discard("a", "1")
    assert not s.discard("a", "1")
    assert s.drain() == ["2"]
    assert s.total == 0


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError):
        PoolSettings(idle_timeout=0)
    with pytest.raises(ValueError):
        PoolSettings(max_idle_total=-1)
