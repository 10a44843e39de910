"""The pure cores around the push: debounce, proxy status, client backoff and decode."""

from __future__ import annotations

import gzip
import json
import random

import pytest

from controlplane.push import Debouncer, ProxyTracker, _GzipPrefix, pod_document
from controlplane.resources import _R as Reader
from controlplane.resources import parse_pod
from proxy import config as pc
from proxy.config_client import backoff_delay, decode


def test_debounce_folds_bursts_but_never_waits_past_max() -> None:
    d = Debouncer(delay=0.05, max_delay=0.1)
    assert d.deadline() is None and not d.due(0.0)
    d.change(1.00)
    assert d.deadline() == pytest.approx(1.05)
    d.change(1.03)
    assert d.deadline() == pytest.approx(1.08)
    for t in (1.06, 1.09):  # a steady stream of changes...
        d.change(t)
    assert d.deadline() == pytest.approx(1.10)  # ...still fires 100 ms after the first
    assert not d.due(1.099) and d.due(1.10)
    d.fire()
    assert d.deadline() is None


def test_tracker_ack_nack_and_state() -> None:
    t = ProxyTracker()
    st = t.poll_started("ns", "p", "", 0.0)
    t.poll_ended("ns", "p", 0.1, "v1")
    assert st.sent == "v1" and st.acked == ""
    t.nack("ns", "p", "v1", "bad", 0.2)
    (row,) = t.rows(0.3, lambda s: "v1")
    assert row["state"] == "NACKED" and row["last_nack"]["error"] == "bad" and not row["synced"]
    t.ack("ns", "p", "v2", 0.4)
    (row,) = t.rows(0.5, lambda s: "v2")
    assert row["state"] == "SYNCED" and row["synced"] and row["connected"]
    # A poll carrying a version is an ACK (a restarted controller learns it so).
    t2 = ProxyTracker()
    t2.poll_started("ns", "q", "v9", 10.0)
    (row,) = t2.rows(10.0, lambda s: "v9")
    assert row["synced"] and row["connected"]
    t2.poll_ended("ns", "q", 10.0, None)
    (row,) = t2.rows(100.0, lambda s: "v9")
    assert not row["connected"]
    t2.forget_stale(10_000.0)
    assert t2.rows(10_000.0, lambda s: "") == []


def test_gzip_prefix_composes_valid_streams() -> None:
    g = _GzipPrefix('{"services":' + json.dumps([{"x": i} for i in range(1000)]))
    for tail in (',"version":"a"}', ',"version":"b","more":[1,2]}'):
        assert json.loads(gzip.decompress(g.finish(tail)))["version"] in ("a", "b")


def test_pod_report_short_form() -> None:
    doc = pod_document(
        "shop",
        "web-1",
        {
            "ip": "10.0.0.1",
            "labels": {"app": "web"},
            "serviceAccount": "web",
            "meshed": True,
            "ports": {"http": 8080},
            "zone": "z1",
        },
    )
    pod = parse_pod(Reader(doc, ""))
    assert (pod.ip, pod.service_account, pod.ready, pod.meshed, pod.zone) == (
        "10.0.0.1",
        "web",
        True,
        True,
        "z1",
    )
    assert pod.named_ports["http"] == 8080


def test_backoff_is_full_jitter_and_capped() -> None:
    rng = random.Random(7)
    for attempt in range(40):
        cap = min(5.0, 0.1 * 2**attempt)
        samples = [backoff_delay(attempt, rng, base=0.1, cap=5.0) for _ in range(50)]
        assert all(0.0 <= s <= cap for s in samples)
    assert max(backoff_delay(30, rng) for _ in range(200)) > 2.5  # spread, not fixed


def test_decode_refuses_bad_configs_with_a_reason() -> None:
    good = pc.ProxyConfig(version="v1")
    snap = decode(json.dumps(good.to_dict()).encode())
    assert snap.version == "v1" and snap.registry.version == "v1"
    with pytest.raises(pc.ConfigError, match="not JSON"):
        decode(b"{nope")
    with pytest.raises(pc.ConfigError, match="version: must not be empty"):
        decode(b'{"version": ""}')

    def picky(config: pc.ProxyConfig) -> None:
        raise RuntimeError("cannot bind")

    with pytest.raises(pc.ConfigError, match="picky: cannot bind"):
        decode(json.dumps(good.to_dict()).encode(), (picky,))
