"""InjectorConfig from ConfigMap synchro-config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from webhook.config import ConfigError, InjectorConfig, load

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_valid() -> None:
    config = InjectorConfig()
    assert config.native_sidecar is True
    assert config.trust_domain == "cluster.local"


def test_flat_keys() -> None:
    config = InjectorConfig.from_configmap_data(
        {
            "proxyImage": "reg.example/synchro:1",
            "proxyCPULimit": "",
            "nativeSidecar": "false",
            "traceSampling": "2.5",
            "drainSeconds": "10",
            "defaultMtlsMode": "STRICT",  # someone else's key: ignored
        }
    )
    assert config.image == "reg.example/synchro:1"
    assert config.cpu_limit is None
    assert config.native_sidecar is False
    assert config.trace_sampling == 2.5
    assert config.drain_seconds == 10


def test_mesh_yaml_key_and_direct_keys_win() -> None:
    data = {"mesh.yaml": "nativeSidecar: false\nproxyConcurrency: 3\n", "proxyConcurrency": "2"}
    config = InjectorConfig.from_configmap_data(data)
    assert config.native_sidecar is False
    assert config.concurrency == 2


def test_round_trip() -> None:
    config = InjectorConfig(cpu_limit=None, access_log="text", trace_sampling=0.5)
    assert InjectorConfig.from_configmap_data(config.to_configmap_data()) == config


@pytest.mark.parametrize(
    "data",
    [
        {"proxyCPURequest": "lots"},
        {"nativeSidecar": "sometimes"},
        {"proxyImagePullPolicy": "Often"},
        {"trustDomain": "a/b"},
        {"mesh.yaml": "[1, 2"},
        {"mesh.yaml": "- a list"},
        {"drainSeconds": "-1"},
    ],
)
def test_bad_values_raise_config_error_naming_the_key(data: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as info:
        InjectorConfig.from_configmap_data(data)
    key = next(iter(data))
    assert key in str(info.value)


def test_deploy_configmap_loads(tmp_path: Path) -> None:
    manifest = ROOT / "deploy" / "configmap.yaml"
    if not manifest.exists():
        pytest.skip("deploy/configmap.yaml not present")
    config = load(manifest)
    # A mounted ConfigMap: one file per key, plus the kubelet's dot-entries.
    data = yaml.safe_load(manifest.read_text())["data"]
    for key, value in data.items():
        (tmp_path / key).write_text(value)
    (tmp_path / "..data").mkdir()
    assert load(tmp_path) == config


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("proxyConcurrency: many\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*proxyConcurrency"):
        load(bad)
    with pytest.raises(ConfigError, match="missing"):
        load(tmp_path / "missing")
