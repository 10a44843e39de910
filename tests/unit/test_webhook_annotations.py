"""The annotation table: parsers, error messages, and the README table."""

from __future__ import annotations

import subprocess
import sys
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from webhook import annotations as ann


def test_table_covers_issue_2_and_5_annotations() -> None:
    expected = {
        "inject", "proxy-image", "proxy-cpu-request", "proxy-cpu-limit",
        "proxy-memory-request", "proxy-memory-limit", "proxy-log-level",
        "proxy-concurrency", "native-sidecar", "hold-app-until-proxy-ready",
        "rewrite-probes", "exclude-inbound-ports", "include-inbound-ports",
        "exclude-outbound-ports", "exclude-outbound-ip-ranges",
        "include-outbound-ip-ranges", "opaque-ports", "access-log", "trace-sampling",
        "drain-seconds", "timeout", "retries", "retry-on", "load-balancer",
    }  # fmt: skip
    assert set(ann.BY_NAME) == expected
    assert len(ann.ANNOTATIONS) == len(expected)  # no duplicates
    for a in ann.ANNOTATIONS:
        assert a.key == "synchro.dev/" + a.name
        assert a.doc and a.accepted and a.default and a.type


@pytest.mark.parametrize(
    ("name", "text", "value"),
    [
        ("inject", "enabled", True),
        ("inject", "Disabled", False),
        ("native-sidecar", "false", False),
        ("proxy-cpu-request", "100m", "100m"),
        ("proxy-cpu-limit", "0.5", "0.5"),
        ("proxy-memory-request", "64Mi", "64Mi"),
        ("proxy-memory-limit", "1e9", "1e9"),
        ("proxy-log-level", "DEBUG", "debug"),
        ("proxy-concurrency", "4", 4),
        ("exclude-inbound-ports", "80, 443,80", (80, 443)),
        ("exclude-inbound-ports", "", ()),
        ("include-inbound-ports", "*", "*"),
        ("include-inbound-ports", "8080", (8080,)),
        ("exclude-outbound-ip-ranges", "10.0.0.1/8,fd00::/8", ("10.0.0.0/8", "fd00::/8")),
        ("include-outbound-ip-ranges", "*", "*"),
        ("opaque-ports", "3306,5432", (3306, 5432)),
        ("access-log", "json", "json"),
        ("trace-sampling", "2.5", 2.5),
        ("drain-seconds", "0", 0),
        ("timeout", "2s", 2.0),
        ("timeout", "500ms", 0.5),
        ("timeout", "1m30s", 90.0),
        ("retries", "10", 10),
        ("retry-on", "5xx,connect-failure,503", ("5xx", "connect-failure", "503")),
        ("load-balancer", "least_request", "least_request"),
        ("proxy-image", "registry.example:5000/synchro@sha256:abc", None),
    ],
)
def test_good_values(name: str, text: str, value: object) -> None:
    parsed = ann.BY_NAME[name].value(text)
    if value is not None:
        assert parsed == value


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("inject", "maybe"),
        ("native-sidecar", "yes"),
        ("proxy-cpu-request", "lots"),
        ("proxy-cpu-request", "-1"),
        ("proxy-memory-limit", "1Gb"),
        ("proxy-log-level", "verbose"),
        ("proxy-concurrency", "0"),
        ("proxy-concurrency", "65"),
        ("exclude-outbound-ports", "80,abc"),
        ("exclude-inbound-ports", "0"),
        ("exclude-inbound-ports", "65536"),
        ("include-inbound-ports", "**"),
        ("exclude-outbound-ip-ranges", "10.0.0.0/33"),
        ("include-outbound-ip-ranges", "not-a-cidr"),
        ("opaque-ports", "-5"),
        ("access-log", "xml"),
        ("trace-sampling", "101"),
        ("trace-sampling", "nan"),
        ("drain-seconds", "1.5"),
        ("timeout", "2"),
        ("timeout", "0s"),
        ("timeout", "2 s"),
        ("retries", "11"),
        ("retry-on", "sometimes"),
        ("retry-on", "5xx,99"),
        ("retry-on", ""),
        ("load-balancer", "fastest"),
        ("proxy-image", "has space"),
        ("proxy-image", ""),
    ],
)
def test_bad_values_name_annotation_value_and_form(name: str, text: str) -> None:
    spec = ann.BY_NAME[name]
    with pytest.raises(ann.AnnotationError) as info:
        spec.value(text)
    message = str(info.value)
    assert spec.key in message
    assert repr(text) in message
    assert spec.accepted in message
    assert info.value.annotation == spec.key


def test_quantity_values() -> None:
    assert ann.quantity_value("100m") == Decimal("0.1")
    assert ann.quantity_value("1") == Decimal(1)
    assert ann.quantity_value("64Mi") == 64 * 2**20
    assert ann.quantity_value("1k") == 1000
    assert ann.quantity_value("1e3") == 1000
    assert ann.quantity_value("1.5Gi") == Decimal("1.5") * 2**30


@given(st.integers(min_value=1, max_value=65535))
def test_any_valid_port_parses(port: int) -> None:
    assert ann.parse_ports(f" {port} ,") == (port,)


@given(st.text(max_size=30))
def test_parsers_raise_only_annotation_errors(text: str) -> None:
    for spec in ann.ANNOTATIONS:
        try:
            spec.value(text)
        except ann.AnnotationError as exc:
            assert exc.annotation == spec.key


def test_parse_all_reports_unknown_and_ignores_others() -> None:
    values, unknown = ann.parse_all(
        {
            "synchro.dev/proxy-concurrency": "2",
            "synchro.dev/colour": "blue",
            "synchro.dev/status": "{}",
            "example.com/x": "y",
        }
    )
    assert values == {"proxy-concurrency": 2}
    assert unknown == ("synchro.dev/colour",)


def test_render() -> None:
    assert ann.render(True) == "true"
    assert ann.render((80, 443)) == "80,443"
    assert ann.render(2.5) == "2.5"
    assert ann.render(1.0) == "1"
    assert ann.render(0.5) == "0.5"


def test_markdown_table_has_a_row_per_annotation() -> None:
    table = ann.markdown_table()
    lines = table.strip().splitlines()
    assert len(lines) == 2 + len(ann.ANNOTATIONS)
    for a in ann.ANNOTATIONS:
        assert f"`{a.key}`" in table
    assert all(line.count("|") - line.count("\\|") == 7 for line in lines)


def test_module_prints_the_table() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "webhook.annotations"], capture_output=True, text=True, check=True
    )
    assert out.stdout == ann.markdown_table()
