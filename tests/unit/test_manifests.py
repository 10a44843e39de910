"""The pure parts of `synchro up`: manifests -> Pods, hosts files, the node's ClusterIP NAT."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from synchro.local import hosts, servicenat
from synchro.local.manifests import (
    Document,
    ManifestError,
    expand,
    load,
    local_key,
    parse_text,
    signature,
)

CONTAINER = {"name": "app", "command": ["python", "-m", "http.server"]}


def docs(*bodies: dict[str, Any], origin: str = "dir/app.yaml") -> list[Document]:
    return [Document(b, origin, i) for i, b in enumerate(bodies)]


def workload(kind: str, name: str, namespace: str | None = None, **spec: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    template = {
        "metadata": {"labels": {"app": name}, "annotations": {"a": "b"}},
        "spec": {"containers": [CONTAINER], "serviceAccountName": "sa"},
    }
    return {"kind": kind, "metadata": meta, "spec": {"template": template, **spec}}


def test_deployment_replicas_get_stable_names_and_the_template() -> None:
    m = expand(docs(workload("Deployment", "web", "shop", replicas=3)))
    assert [p.ref for p in m.pods] == ["shop/web-0", "shop/web-1", "shop/web-2"]
    pod = m.pods[1]
    assert pod.manifest["kind"] == "Pod"
    assert pod.manifest["metadata"] == {
        "name": "web-1",
        "namespace": "shop",
        "labels": {"app": "web"},
        "annotations": {"a": "b"},
    }
    assert pod.manifest["spec"]["containers"] == [CONTAINER]
    assert pod.service_account == "sa"
    assert pod.owner == "Deployment/web"


def test_default_namespace_one_replica_and_zero_replicas() -> None:
    m = expand(docs(workload("Deployment", "a"), workload("ReplicaSet", "b", replicas=0)))
    assert [p.ref for p in m.pods] == ["default/a-0"]


def test_statefulset_pods_get_hostname_subdomain_and_index_labels() -> None:
    m = expand(docs(workload("StatefulSet", "db", "data", replicas=2, serviceName="db")))
    pod = m.pods[1]
    assert pod.ref == "data/db-1"
    assert pod.manifest["spec"]["hostname"] == "db-1"
    assert pod.manifest["spec"]["subdomain"] == "db"
    assert pod.labels["statefulset.kubernetes.io/pod-name"] == "db-1"
    assert pod.labels["apps.kubernetes.io/pod-index"] == "1"


def test_jobs_daemonsets_bare_pods_and_lists() -> None:
    bare = {
        "kind": "Pod",
        "metadata": {"name": "solo", "labels": {"x": "1"}},
        "spec": {"containers": [CONTAINER]},
    }
    m = expand(
        docs(
            workload("Job", "migrate", "ops", parallelism=2, completions=5),
            {"kind": "List", "items": [workload("DaemonSet", "agent", "ops"), bare]},
            {"kind": "CronJob", "metadata": {"name": "nightly"}},
        )
    )
    refs = {p.ref: p for p in m.pods}
    assert set(refs) == {"ops/migrate-0", "ops/migrate-1", "ops/agent-0", "default/solo"}
    assert refs["ops/migrate-0"].job and refs["ops/migrate-0"].labels["job-name"] == "migrate"
    assert not refs["default/solo"].job and refs["default/solo"].labels == {"x": "1"}
    assert any("CronJob nightly" in line for line in m.skipped)


def test_services_namespaces_and_mesh_config() -> None:
    m = expand(
        docs(
            {
                "kind": "Namespace",
                "metadata": {"name": "off", "labels": {"synchro.dev/inject": "disabled"}},
            },
            {
                "kind": "Service",
                "metadata": {"name": "web", "namespace": "shop"},
                "spec": {
                    "selector": {"app": "web"},
                    "ports": [{"name": "http", "port": 80, "targetPort": "http"}, {"port": 81}],
                },
            },
            {"kind": "Service", "metadata": {"name": "db"}, "spec": {"clusterIP": "None"}},
            {
                "kind": "ConfigMap",
                "metadata": {"name": "synchro-config"},
                "data": {"proxyLogLevel": "debug"},
            },
        )
    )
    web = next(s for s in m.services if s.name == "web")
    assert web.selector == {"app": "web"}
    assert [(p.port, p.target_port, p.name) for p in web.ports] == [
        (80, "http", "http"),
        (81, 81, ""),
    ]
    assert next(s for s in m.services if s.name == "db").headless
    assert m.mesh_config == {"proxyLogLevel": "debug"}
    assert not m.meshed_namespace("off")
    assert m.meshed_namespace("shop") and m.meshed_namespace("never-declared")
    assert m.namespaces() == ["default", "off", "shop"]


def test_webhook_sees_meshed_namespaces_and_pods_that_opt_in() -> None:
    def pod(namespace: str, labels: dict[str, str], annotations: dict[str, str]) -> dict[str, Any]:
        return {
            "kind": "Pod",
            "metadata": {
                "name": f"p{len(labels)}{len(annotations)}",
                "namespace": namespace,
                "labels": labels,
                "annotations": annotations,
            },
            "spec": {"containers": [CONTAINER]},
        }

    ns = {
        "kind": "Namespace",
        "metadata": {"name": "off", "labels": {"synchro.dev/inject": "disabled"}},
    }
    m = expand(
        docs(
            ns,
            pod("off", {}, {}),
            pod("off", {"synchro.dev/inject": "enabled"}, {}),
            pod("off", {}, {"synchro.dev/inject": "enabled"}),
            pod("on", {}, {}),
        )
    )
    seen = {p.ref: m.sends_to_webhook(p) for p in m.pods}
    assert seen == {"off/p00": False, "off/p10": True, "off/p01": True, "on/p00": True}


@pytest.mark.parametrize(
    ("body", "where"),
    [
        (workload("Deployment", "web", replicas=-1), "spec.replicas"),
        (workload("Deployment", "Web"), "metadata.name"),
        ({"kind": "Deployment", "metadata": {"name": "x"}, "spec": {}}, "spec.template"),
        (
            {"kind": "Deployment", "metadata": {"name": "x"}, "spec": {"template": {"spec": {}}}},
            "spec.template.spec.containers",
        ),
        ({"kind": "Pod", "metadata": {"name": "x"}, "spec": {"containers": []}}, "spec.containers"),
        (
            {"kind": "Service", "metadata": {"name": "s"}, "spec": {"ports": [{"port": 0}]}},
            "spec.ports[0].port",
        ),
        (
            {
                "kind": "Pod",
                "metadata": {"name": "x", "labels": {"a": {"b": 1}}},
                "spec": {"containers": [CONTAINER]},
            },
            "metadata.labels",
        ),
    ],
)
def test_errors_name_the_file_document_and_field(body: dict[str, Any], where: str) -> None:
    with pytest.raises(ManifestError) as info:
        expand(docs({"kind": "Namespace", "metadata": {"name": "ok"}}, body))
    message = str(info.value)
    assert message.startswith("dir/app.yaml: document 2")
    assert where in message


def test_a_pod_defined_twice_is_an_error() -> None:
    with pytest.raises(ManifestError, match="default/web-0 is defined twice"):
        expand(
            docs(
                workload("Deployment", "web"),
                {"kind": "Pod", "metadata": {"name": "web-0"}, "spec": {"containers": [CONTAINER]}},
            )
        )


def test_invalid_yaml_names_the_document_and_line() -> None:
    with pytest.raises(ManifestError, match=r"x.yaml: document 2: invalid YAML \(line 4"):
        parse_text("kind: Pod\n---\nkind: Service\nmetadata: {a: b]\n", "x.yaml")


def test_load_reads_the_directory_like_the_controller(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(workload("Deployment", "a")))
    (tmp_path / "sub" / "b.yml").write_text(yaml.safe_dump(workload("Deployment", "b")))
    (tmp_path / ".hidden.yaml").write_text("not: [valid")
    (tmp_path / "notes.txt").write_text("ignored")
    before = signature(tmp_path)
    assert [p.ref for p in load(tmp_path).pods] == ["default/a-0", "default/b-0"]
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(workload("Deployment", "a", replicas=2)))
    assert signature(tmp_path) != before
    with pytest.raises(ManifestError, match="no such file"):
        load(tmp_path / "missing")


def test_digest_changes_with_the_template_only() -> None:
    one = expand(docs(workload("Deployment", "web", replicas=2))).pods
    two = expand(docs(workload("Deployment", "web", replicas=3))).pods
    assert one[0].digest == two[0].digest
    changed = workload("Deployment", "web")
    changed["spec"]["template"]["metadata"]["labels"]["version"] = "v2"
    assert expand(docs(changed)).pods[0].digest != one[0].digest


def test_local_keys_are_short_unique_dns_labels() -> None:
    assert local_key("shop/web-0") == "shop-web-0"
    # Two refs that flatten alike, and a name that is too long, get a hash.
    clash = local_key("a/b-c", taken={"a-b-c"})
    assert clash != "a-b-c" and clash.startswith("a-b-c-")
    long = local_key("a-very-long-namespace-name/a-very-long-deployment-name-12")
    assert len(long) <= 40
    for key in (clash, long):
        assert re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?", key)
    assert local_key("a/b-c", taken={"a-b-c"}) == clash  # stable


# --- hosts files ---------------------------------------------------------------------


def test_hosts_map_four_name_forms_and_own_namespace_short_names() -> None:
    text = hosts.render(
        namespace="shop",
        pod="web-0",
        ip="10.213.0.5",
        services=[
            hosts.ServiceAddress("shop", "catalog", ("10.96.0.10",)),
            hosts.ServiceAddress("pay", "payments", ("10.96.0.20",)),
        ],
        pods=[hosts.PodAddress("data", "db-0", "db", "10.213.0.9")],
    )
    lines = {
        line.split("\t")[0]: line.split("\t")[1].split()
        for line in text.splitlines()
        if "\t" in line
    }
    assert lines["10.213.0.5"] == ["web-0"]
    assert lines["10.96.0.10"] == [
        "catalog",
        "catalog.shop",
        "catalog.shop.svc",
        "catalog.shop.svc.cluster.local",
    ]
    assert lines["10.96.0.20"] == [
        "payments.pay",
        "payments.pay.svc",
        "payments.pay.svc.cluster.local",
    ]
    # A StatefulSet Pod by every form the search path completes (pod.svc.ns ...).
    assert lines["10.213.0.9"] == [
        "db-0.db.data",
        "db-0.db.data.svc",
        "db-0.db.data.svc.cluster.local",
    ]
    assert "localhost" in lines["127.0.0.1"]
    same = hosts.render(
        namespace="data",
        pod="db-1",
        ip="10.213.0.8",
        services=[],
        pods=[hosts.PodAddress("data", "db-0", "db", "10.213.0.9")],
        hostname="db-1",
        subdomain="db",
    )
    assert (
        "10.213.0.9\tdb-0.db db-0.db.data db-0.db.data.svc db-0.db.data.svc.cluster.local" in same
    )
    assert "10.213.0.8\tdb-1 db-1.db db-1.db.data db-1.db.data.svc" in same


def test_hosts_write_in_place_keeps_the_inode(tmp_path: Path) -> None:
    assert hosts.write("m-a", "one\n", "r\n", root=tmp_path)
    inode = (tmp_path / "m-a" / "hosts").stat().st_ino
    assert not hosts.write("m-a", "one\n", "r\n", root=tmp_path)  # unchanged
    assert hosts.write("m-a", "two, longer\n", root=tmp_path)
    assert (tmp_path / "m-a" / "hosts").stat().st_ino == inode
    assert (tmp_path / "m-a" / "hosts").read_text() == "two, longer\n"
    hosts.write("other-a", "x\n", root=tmp_path)
    assert hosts.remove_prefix("m", root=tmp_path) == ["m-a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other-a"]


# --- endpoints and the node's NAT table ----------------------------------------------------


def _running(m: Any, ips: dict[str, tuple[str, bool]]) -> list[servicenat.RunningPod]:
    return [servicenat.RunningPod(p, *ips[p.ref]) for p in m.pods if p.ref in ips]


def test_service_rules_use_ready_endpoints_and_named_target_ports() -> None:
    dep = workload("Deployment", "web", "shop", replicas=3)
    dep["spec"]["template"]["spec"]["containers"] = [
        {**CONTAINER, "ports": [{"name": "http", "containerPort": 8080}]}
    ]
    other = workload("Deployment", "web", "elsewhere")
    svc = {
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]},
    }
    m = expand(docs(dep, other, svc))
    pods = _running(
        m,
        {
            "shop/web-0": ("10.213.0.2", True),
            "shop/web-1": ("10.213.0.3", False),
            "shop/web-2": ("10.213.0.4", True),
            "elsewhere/web-0": ("10.213.0.5", True),
        },
    )
    rules = servicenat.service_rules(m.services, {"shop/web": ("10.96.0.7",)}, pods)
    assert [(r.cluster_ip, r.port, r.backends) for r in rules] == [
        (
            "10.96.0.7",
            80,
            (servicenat.Backend("10.213.0.2", 8080), servicenat.Backend("10.213.0.4", 8080)),
        )
    ]
    table = servicenat.nat_table(rules)
    chain = rules[0].chain
    assert "-A SYNCHRO-SERVICES -d 10.96.0.7/32 -p tcp -m tcp --dport 80" in table
    assert (
        f"-A {chain} -p tcp -m statistic --mode random --probability 0.5000000000 -j DNAT --to-destination 10.213.0.2:8080"
        in table
    )
    assert f"-A {chain} -p tcp -j DNAT --to-destination 10.213.0.4:8080" in table
    assert "-A POSTROUTING -m conntrack --ctstate DNAT -j MASQUERADE" in table
    assert table.startswith("*nat\n") and table.endswith("COMMIT\n")


def test_no_ready_endpoint_means_no_dnat_and_headless_resolves_to_pods() -> None:
    m = expand(
        docs(
            workload("StatefulSet", "db", "data", replicas=2, serviceName="db"),
            {
                "kind": "Service",
                "metadata": {"name": "db", "namespace": "data"},
                "spec": {"clusterIP": "None", "selector": {"app": "db"}, "ports": [{"port": 5432}]},
            },
            {
                "kind": "Service",
                "metadata": {"name": "none", "namespace": "data"},
                "spec": {"selector": {"app": "nobody"}, "ports": [{"port": 1}]},
            },
        )
    )
    pods = _running(m, {"data/db-0": ("10.213.0.2", True), "data/db-1": ("10.213.0.3", False)})
    ips = {"data/none": ("10.96.0.9",)}
    rules = servicenat.service_rules(m.services, ips, pods)
    assert [r.backends for r in rules] == [()]
    assert "10.96.0.9" not in servicenat.nat_table(rules)
    svcs, named = servicenat.addresses(m.services, ips, pods)
    assert {s.name: s.ips for s in svcs} == {"db": ("10.213.0.2",), "none": ("10.96.0.9",)}
    assert {(p.hostname, p.ip) for p in named} == {("db-0", "10.213.0.2"), ("db-1", "10.213.0.3")}


def test_an_empty_selector_selects_nothing() -> None:
    assert not servicenat.selects({}, {"a": "b"})
    assert not servicenat.selects(None, {"a": "b"})
    assert servicenat.selects({"a": "b"}, {"a": "b", "c": "d"})


# --- ConfigMaps and Secrets -------------------------------------------------------------


def _config_docs(
    container: dict[str, Any], volumes: list[dict[str, Any]] | None = None
) -> list[Document]:
    pod = {
        "kind": "Pod",
        "metadata": {"name": "app", "namespace": "shop"},
        "spec": {"containers": [container], **({"volumes": volumes} if volumes else {})},
    }
    return docs(
        {
            "kind": "ConfigMap",
            "metadata": {"name": "cfg", "namespace": "shop"},
            "data": {"MODE": "fast", "app.yaml": "a: 1\n"},
        },
        {
            "kind": "Secret",
            "metadata": {"name": "sec", "namespace": "shop"},
            "data": {"TOKEN": "czNjcjN0"},
            "stringData": {"USER": "bob"},
        },
        pod,
    )


def test_env_from_configmaps_and_secrets_becomes_values() -> None:
    container = {
        **CONTAINER,
        "envFrom": [
            {"configMapRef": {"name": "cfg"}, "prefix": "CFG_"},
            {"secretRef": {"name": "sec"}},
        ],
        "env": [
            {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "MODE"}}},
            {"name": "TOKEN_AGAIN", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "TOKEN"}}},
            {
                "name": "MAYBE",
                "valueFrom": {"configMapKeyRef": {"name": "nope", "key": "x", "optional": True}},
            },
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        ],
    }
    pod = expand(_config_docs(container)).pods[0]
    env = pod.manifest["spec"]["containers"][0]["env"]
    values = {e["name"]: e.get("value") for e in env}
    assert values["CFG_MODE"] == "fast" and values["TOKEN"] == "s3cr3t" and values["USER"] == "bob"
    assert values["MODE"] == "fast" and values["TOKEN_AGAIN"] == "s3cr3t"
    assert "MAYBE" not in values
    assert env[-1] == container["env"][-1]  # the downward API is the runtime's
    assert "envFrom" not in pod.manifest["spec"]["containers"][0]


def test_configmap_and_secret_volumes_become_files() -> None:
    volumes = [
        {
            "name": "config",
            "configMap": {"name": "cfg", "items": [{"key": "app.yaml", "path": "conf.yaml"}]},
        },
        {"name": "secret", "secret": {"secretName": "sec"}},
        {"name": "scratch", "emptyDir": {}},
    ]
    pod = expand(_config_docs(CONTAINER, volumes)).pods[0]
    assert pod.volume_files == {
        "config": {"conf.yaml": "a: 1\n"},
        "secret": {"TOKEN": "s3cr3t", "USER": "bob"},
    }


def test_a_missing_configmap_names_the_field() -> None:
    container = {
        **CONTAINER,
        "env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "NOPE"}}}],
    }
    with pytest.raises(
        ManifestError,
        match=r"spec.containers\[0\].env\[0\].valueFrom.configMapKeyRef: no key 'NOPE'",
    ):
        expand(_config_docs(container))
    gone = {**CONTAINER, "envFrom": [{"configMapRef": {"name": "absent"}}]}
    with pytest.raises(ManifestError, match="ConfigMap shop/absent is not in the directory"):
        expand(_config_docs(gone))
