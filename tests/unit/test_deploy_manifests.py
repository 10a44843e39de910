"""deploy/ renders, every object validates offline, and the pieces fit together.

Rendering uses `kubectl kustomize` when kubectl is installed, and otherwise a small
reader of the plain-resource-list kustomization this repository uses (a test checks
that both give the same objects whenever kubectl is there). Built-in kinds are
validated with kubernetes-validate's strict schemas; custom resources (the example
policies in deploy/examples-crs/) are validated with jsonschema against the CRDs'
own openAPIV3Schema, with unknown fields rejected as `kubectl apply`'s strict field
validation does.
"""

from __future__ import annotations

import copy
import itertools
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
EXAMPLE_CRS = DEPLOY / "examples-crs"
NAMESPACE = "synchro-system"
# Oldest Kubernetes with native sidecars on by default, and the newest schemas shipped.
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())

Obj = dict[str, Any]


# --- rendering ---------------------------------------------------------------


class KustomizeFallbackError(Exception):
    """The kustomization uses something the fallback reader does not implement."""


def render_fallback(directory: Path) -> list[Obj]:
    """Render a kustomization that only lists `resources` (files or sub-kustomizations)."""
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kust) - {"apiVersion", "kind", "resources"}
    if unsupported:
        raise KustomizeFallbackError(
            f"{directory}/kustomization.yaml uses {sorted(unsupported)}; "
            "the fallback reader only supports a plain resources list"
        )
    out: list[Obj] = []
    for entry in kust.get("resources", []):
        path = directory / entry
        if path.is_dir():
            out.extend(render_fallback(path))
        else:
            out.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return out


def render_kubectl(directory: Path) -> list[Obj]:
    kubectl = shutil.which("kubectl")
    assert kubectl is not None
    done = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"kubectl kustomize failed: {done.stderr}"
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def key(obj: Mapping[str, Any]) -> tuple[str, str, str]:
    meta = obj["metadata"]
    return (obj["kind"], meta.get("namespace", ""), meta["name"])


@pytest.fixture(scope="module")
def rendered() -> list[Obj]:
    if shutil.which("kubectl"):
        return render_kubectl(DEPLOY)
    # No kubectl on this machine: the fallback reader renders the same plain list.
    return render_fallback(DEPLOY)


def one(objs: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [o for o in objs if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"expected exactly one {kind} {name or ''}, found {len(found)}"
    return found[0]


def load_examples() -> list[Obj]:
    docs: list[Obj] = []
    for path in sorted(EXAMPLE_CRS.glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_fallback_renderer_matches_kubectl() -> None:
    by_kubectl = {key(o): o for o in render_kubectl(DEPLOY)}
    by_fallback = {key(o): o for o in render_fallback(DEPLOY)}
    assert by_kubectl == by_fallback


def test_fallback_renderer_refuses_what_it_cannot_render(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamespace: other\n")
    with pytest.raises(KustomizeFallbackError, match="namespace"):
        render_fallback(tmp_path)


def test_renders_the_expected_objects(rendered: list[Obj]) -> None:
    kinds = sorted(key(o) for o in rendered)
    assert len(kinds) == len(set(kinds)), "duplicate objects"
    expected = {
        ("Namespace", "", NAMESPACE),
        ("ServiceAccount", NAMESPACE, "synchro-controller"),
        ("ClusterRole", "", "synchro-controller"),
        ("ClusterRoleBinding", "", "synchro-controller"),
        ("Role", NAMESPACE, "synchro-controller"),
        ("RoleBinding", NAMESPACE, "synchro-controller"),
        ("ConfigMap", NAMESPACE, "synchro-config"),
        ("Service", NAMESPACE, "synchro-controller"),
        ("Deployment", NAMESPACE, "synchro-controller"),
        ("PodDisruptionBudget", NAMESPACE, "synchro-controller"),
        ("MutatingWebhookConfiguration", "", "synchro-injector"),
        ("CustomResourceDefinition", "", "trafficpolicies.synchro.dev"),
        ("CustomResourceDefinition", "", "peerauthentications.synchro.dev"),
        ("CustomResourceDefinition", "", "authorizationpolicies.synchro.dev"),
    }
    assert set(kinds) == expected


# --- offline validation of built-in kinds --------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_validates_against_the_kubernetes_schema(
    rendered: list[Obj], version: str
) -> None:
    for obj in rendered:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{key(obj)} invalid for Kubernetes {version} at {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            pytest.fail(f"{key(obj)}: {e.message}")


def test_kind_test_manifests_validate() -> None:
    # What tests/kind applies must be valid before a cluster ever sees it.
    docs = [d for d in yaml.safe_load_all((REPO / "tests/kind/manifests.yaml").read_text()) if d]
    assert {d["kind"] for d in docs} == {"Deployment", "Service", "ServiceAccount"}
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSIONS[0], strict=True)


def test_validation_catches_a_broken_object(rendered: list[Obj]) -> None:
    # The check above must be able to fail: a typo'd field is rejected in strict mode.
    deployment = copy.deepcopy(one(rendered, "Deployment"))
    deployment["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


# --- CRDs: structural schemas, and custom resources validated against them -----


def crds(rendered: list[Obj]) -> dict[str, Obj]:
    return {
        o["spec"]["names"]["kind"]: o for o in rendered if o["kind"] == "CustomResourceDefinition"
    }


def schema_of(crd: Obj) -> Obj:
    (version,) = crd["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


_JUNCTORS = ("allOf", "anyOf", "oneOf", "not")
# Inside a logical junctor a structural schema may only carry value validations.
_FORBIDDEN_IN_JUNCTOR = {"type", "description", "default", "additionalProperties", "nullable"}
_ENUM_TYPES: dict[str, type | tuple[type, ...]] = {
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
}


def structural_errors(node: Obj, path: str, *, in_junctor: bool = False) -> Iterator[str]:
    """The rules of apiextensions' structural schemas that a hand-written CRD can break."""
    if in_junctor:
        for bad in _FORBIDDEN_IN_JUNCTOR & set(node):
            yield f"{path}: {bad!r} inside a logical junctor"
    elif "type" not in node and not (
        node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")
    ):
        yield f"{path}: no type"
    if "properties" in node and isinstance(node.get("additionalProperties"), dict):
        yield f"{path}: both properties and additionalProperties"
    if "items" in node and not isinstance(node["items"], dict):
        yield f"{path}: items must be one schema"
    if node.get("type") == "array" and "items" not in node and not in_junctor:
        yield f"{path}: array without items"
    for name, child in node.get("properties", {}).items():
        yield from structural_errors(child, f"{path}.{name}", in_junctor=in_junctor)
    if isinstance(node.get("additionalProperties"), dict):
        yield from structural_errors(node["additionalProperties"], f"{path}.*")
    if isinstance(node.get("items"), dict):
        yield from structural_errors(node["items"], f"{path}[]", in_junctor=in_junctor)
    for junctor in _JUNCTORS:
        if junctor not in node:
            continue
        branches = [node["not"]] if junctor == "not" else node[junctor]
        for i, branch in enumerate(branches):
            for field in branch.get("required", []):
                if field not in node.get("properties", {}):
                    yield f"{path}.{junctor}[{i}]: requires {field!r}, which is not a property"
            yield from structural_errors(branch, f"{path}.{junctor}[{i}]", in_junctor=True)
    if node.get("x-kubernetes-list-type") == "map":
        item = node.get("items", {})
        for k in node.get("x-kubernetes-list-map-keys", []):
            if k not in item.get("required", []) and "default" not in item["properties"][k]:
                yield f"{path}: list-map key {k!r} must be required or defaulted"
    if "enum" in node and "type" in node:
        py = _ENUM_TYPES[node["type"]]
        for v in node["enum"]:
            if not isinstance(v, py):
                yield f"{path}: enum value {v!r} is not a {node['type']}"


def field_exists(schema: Obj, json_path: str) -> bool:
    node = schema
    # Filters such as [?(@.type=="Accepted")] select list items; the field is the item's.
    simple = re.sub(r"\[[^\]]*\]", "[]", json_path)
    for part in simple.lstrip(".").split("."):
        name = part.split("[", 1)[0]
        props = node.get("properties", {})
        if name not in props:
            return name == "creationTimestamp" and node is schema["properties"]["metadata"]
        node = props[name]
        if "[" in part:
            node = node["items"]
    return True


def test_crds_are_structural_and_well_formed(rendered: list[Obj]) -> None:
    found = crds(rendered)
    assert set(found) == {"TrafficPolicy", "PeerAuthentication", "AuthorizationPolicy"}
    for kind, crd in found.items():
        spec = crd["spec"]
        assert spec["group"] == "synchro.dev"
        assert spec["scope"] == "Namespaced"
        assert crd["metadata"]["name"] == f"{spec['names']['plural']}.synchro.dev"
        (version,) = spec["versions"]
        assert version["name"] == "v1alpha1"
        assert version["served"] and version["storage"]
        assert version["subresources"] == {"status": {}}
        schema = schema_of(crd)
        errors = list(structural_errors(schema, kind))
        assert not errors, "\n".join(errors)
        # metadata may not be described beyond its type in a CRD.
        assert schema["properties"]["metadata"] == {"type": "object"}
        conditions = schema["properties"]["status"]["properties"]["conditions"]
        assert set(conditions["items"]["properties"]) >= {"type", "status", "reason", "message"}
        columns = version["additionalPrinterColumns"]
        assert {c["name"] for c in columns} >= {"Accepted", "Age"}
        for column in columns:
            assert field_exists(schema, column["jsonPath"]), (kind, column["jsonPath"])


def test_structural_check_can_fail() -> None:
    bad = {
        "type": "object",
        "properties": {"a": {"properties": {}}, "b": {"type": "array"}},
        "oneOf": [{"type": "object", "required": ["c"]}],
    }
    errors = " ".join(structural_errors(bad, "x"))
    for expected in ("x.a: no type", "x.b: array without items", "'type' inside", "'c'"):
        assert expected in errors


def fields(node: Obj, prefix: str = "") -> Iterator[str]:
    for name, child in node.get("properties", {}).items():
        yield f"{prefix}{name}"
        sub = child.get("items", child)
        yield from fields(sub, f"{prefix}{name}.")


def test_crd_fields(rendered: list[Obj]) -> None:
    found = crds(rendered)
    tp = schema_of(found["TrafficPolicy"])["properties"]["spec"]
    assert set(fields(tp)) >= {
        "targetRef.group", "targetRef.kind", "targetRef.name",
        "loadBalancer.type", "loadBalancer.consistentHash.header",
        "loadBalancer.consistentHash.cookie.name", "loadBalancer.consistentHash.cookie.ttl",
        "retry.attempts", "retry.perTryTimeout", "retry.retryOn",
        "retry.budget.percent", "retry.budget.minRetriesPerSecond", "retry.budget.ttl",
        "timeouts.request", "timeouts.connect", "timeouts.idle",
        "circuitBreaker.maxConnections", "circuitBreaker.maxPendingRequests",
        "circuitBreaker.maxRequests", "circuitBreaker.maxRetries",
        "outlierDetection.consecutive5xxErrors", "outlierDetection.consecutiveGatewayErrors",
        "outlierDetection.interval", "outlierDetection.baseEjectionTime",
        "outlierDetection.maxEjectionPercent", "outlierDetection.successRate.stdevFactor",
        "faultInjection.delay.fixedDelay", "faultInjection.delay.percentage",
        "faultInjection.abort.httpStatus", "faultInjection.abort.grpcStatus",
        "faultInjection.abort.percentage",
        "rateLimit.requestsPerUnit", "rateLimit.unit", "rateLimit.burst", "rateLimit.perSource",
    }  # fmt: skip
    lb = tp["properties"]["loadBalancer"]["properties"]["type"]["enum"]
    assert set(lb) == {"ewma", "round_robin", "least_request", "random", "ring_hash", "maglev"}

    pa = schema_of(found["PeerAuthentication"])["properties"]["spec"]
    assert set(fields(pa)) >= {"selector.matchLabels", "mtls.mode", "portLevelMtls"}
    assert set(pa["properties"]["mtls"]["properties"]["mode"]["enum"]) >= {
        "STRICT", "PERMISSIVE", "DISABLE",
    }  # fmt: skip

    ap = schema_of(found["AuthorizationPolicy"])["properties"]["spec"]
    assert set(ap["properties"]["action"]["enum"]) == {"ALLOW", "DENY", "AUDIT"}
    source = [
        f"rules.from.source.{f}"
        for f in (
            "principals",
            "namespaces",
            "ipBlocks",
            "notPrincipals",
            "notNamespaces",
            "notIpBlocks",
        )
    ]
    operation = [
        f"rules.to.operation.{f}"
        for f in (
            "hosts",
            "ports",
            "methods",
            "paths",
            "notHosts",
            "notPorts",
            "notMethods",
            "notPaths",
        )
    ]
    when = ["rules.when.key", "rules.when.values", "rules.when.notValues"]
    assert set(fields(ap)) >= {"selector.matchLabels", *source, *operation, *when}


def to_jsonschema(node: Any) -> Any:
    """OpenAPI v3 (Kubernetes dialect) -> JSON Schema 2020-12, closed like strict validation."""
    if isinstance(node, list):
        return [to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    for bound in ("Minimum", "Maximum"):
        # OpenAPI 3.0 spells exclusive bounds as booleans next to the bound.
        if out.pop(f"exclusive{bound}", False) is True:
            out[f"exclusive{bound}"] = out.pop(bound.lower())
    if "properties" in node and "additionalProperties" not in node:
        out["additionalProperties"] = False
    return out


def validator_for(rendered: list[Obj], kind: str) -> jsonschema.Draft202012Validator:
    schema = to_jsonschema(schema_of(crds(rendered)[kind]))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_examples_cover_every_kind() -> None:
    kinds = {d["kind"] for d in load_examples()}
    assert kinds == {"TrafficPolicy", "PeerAuthentication", "AuthorizationPolicy"}
    assert {d["apiVersion"] for d in load_examples()} == {"synchro.dev/v1alpha1"}


@pytest.mark.parametrize(
    "doc", load_examples(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}"
)
def test_example_custom_resources_validate(rendered: list[Obj], doc: Obj) -> None:
    errors = sorted(validator_for(rendered, doc["kind"]).iter_errors(doc), key=str)
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def example(kind: str, name: str | None = None) -> Obj:
    docs = [d for d in load_examples() if d["kind"] == kind]
    chosen = docs[0] if name is None else next(d for d in docs if d["metadata"]["name"] == name)
    return copy.deepcopy(chosen)


def _set(doc: Obj, dotted: str, value: Any) -> Obj:
    *parents, last = dotted.split(".")
    node: Any = doc
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return doc


_DELETE = object()

INVALID = [
    ("TrafficPolicy", "spec.loadBalancer.type", "fastest"),
    ("TrafficPolicy", "spec.retries", {"attempts": 3}),
    ("TrafficPolicy", "spec.retry.retryOn", ["sometimes"]),
    ("TrafficPolicy", "spec.retry.perTryTimeout", "10 seconds"),
    ("TrafficPolicy", "spec.retry.attempts", -1),
    ("TrafficPolicy", "spec.targetRef.kind", "Deployment"),
    ("TrafficPolicy", "spec.targetRef.name", _DELETE),
    ("TrafficPolicy", "spec.loadBalancer.consistentHash.header", "x-user"),  # and cookie
    ("TrafficPolicy", "spec.faultInjection.abort.grpcStatus", "UNAVAILABLE"),  # and http
    ("TrafficPolicy", "spec.faultInjection.abort.httpStatus", 700),
    ("TrafficPolicy", "spec.faultInjection.delay.percentage", 101),
    ("TrafficPolicy", "spec.outlierDetection.successRate.stdevFactor", 0),
    ("TrafficPolicy", "spec.rateLimit.unit", "fortnight"),
    ("TrafficPolicy", "spec.circuitBreaker.maxConnections", "many"),
    ("PeerAuthentication", "spec.mtls.mode", "ON"),
    ("PeerAuthentication", "spec.mtls.strict", True),
    ("AuthorizationPolicy", "spec.action", "CUSTOM"),
    ("AuthorizationPolicy", "spec.rules.0.from.0.source.requestPrincipals", ["*"]),
    ("AuthorizationPolicy", "spec.rules.0.to.0.operation.ports", ["http"]),
    ("AuthorizationPolicy", "spec.rules.1.when.0.key", _DELETE),
    ("AuthorizationPolicy", "spec.selector.matchLabels", {"app": 3}),
]


@pytest.mark.parametrize(
    ("kind", "path", "value"), INVALID, ids=[f"{k}:{p}" for k, p, _ in INVALID]
)
def test_invalid_custom_resources_are_rejected(
    rendered: list[Obj], kind: str, path: str, value: Any
) -> None:
    doc = _set(example(kind, {"TrafficPolicy": "reviews"}.get(kind)), path, value)
    assert list(validator_for(rendered, kind).iter_errors(doc)), f"{path}={value!r} was accepted"


def test_example_custom_resources_parse_in_the_control_plane() -> None:
    # The CRDs and the control plane's reader must agree on every field name.
    from controlplane import resources

    for doc in load_examples():
        parsed = resources.parse(copy.deepcopy(doc))
        assert parsed is not None, doc["metadata"]["name"]
        assert type(parsed).__name__ == doc["kind"]


def test_crd_enums_agree_with_the_proxy(rendered: list[Obj]) -> None:
    from proxy import config as pc
    from proxy.traffic import retry

    found = crds(rendered)
    tp = schema_of(found["TrafficPolicy"])["properties"]["spec"]["properties"]
    assert set(tp["loadBalancer"]["properties"]["type"]["enum"]) == set(pc.LB_TYPES)
    pattern = tp["retry"]["properties"]["retryOn"]["items"]["pattern"]
    named = {n for n in pattern.strip("^$()").split("|") if not n.startswith("[")}
    assert named == set(retry.CONDITIONS)
    pa = schema_of(found["PeerAuthentication"])["properties"]["spec"]["properties"]
    assert set(pa["mtls"]["properties"]["mode"]["enum"]) == {*pc.MTLS_MODES, "UNSET"}
    ap = schema_of(found["AuthorizationPolicy"])["properties"]["spec"]["properties"]
    assert set(ap["action"]["enum"]) == set(pc.AUTHZ_ACTIONS)


# --- the webhook configuration -------------------------------------------------


def test_webhook_settings(rendered: list[Obj]) -> None:
    mwc = one(rendered, "MutatingWebhookConfiguration", "synchro-injector")
    service = one(rendered, "Service", "synchro-controller")
    service_ports = {p["port"] for p in service["spec"]["ports"]}
    hooks = mwc["webhooks"]
    assert len(hooks) == 2
    for hook in hooks:
        assert hook["failurePolicy"] == "Fail"
        assert hook["sideEffects"] == "None"
        assert hook["timeoutSeconds"] == 10
        assert hook["reinvocationPolicy"] == "IfNeeded"
        assert hook["admissionReviewVersions"] == ["v1"]
        svc = hook["clientConfig"]["service"]
        assert (svc["name"], svc["namespace"]) == ("synchro-controller", NAMESPACE)
        assert svc["path"] == "/mutate"
        assert svc.get("port", 443) in service_ports
        (rule,) = hook["rules"]
        assert rule["operations"] == ["CREATE"]
        assert (rule["apiGroups"], rule["apiVersions"], rule["resources"]) == (
            [""], ["v1"], ["pods"],
        )  # fmt: skip


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """metav1.LabelSelector semantics (an absent selector matches everything)."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        k, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": k in labels and labels[k] in values,
            "NotIn": k not in labels or labels[k] not in values,
            "Exists": k in labels,
            "DoesNotExist": k not in labels,
        }[op]
        if not ok:
            return False
    return True


def hooks_called(
    mwc: Obj, namespace: str, ns_labels: Mapping[str, str], pod_labels: Mapping[str, str]
) -> list[str]:
    # The API server adds this label to every namespace (Kubernetes >= 1.22).
    ns_labels = {**ns_labels, "kubernetes.io/metadata.name": namespace}
    return [
        h["name"]
        for h in mwc["webhooks"]
        if selector_matches(h.get("namespaceSelector"), ns_labels)
        and selector_matches(h.get("objectSelector"), pod_labels)
    ]


INJECT = "synchro.dev/inject"
SYSTEM_NAMESPACES = ("kube-system", "kube-public", "kube-node-lease", NAMESPACE)


LABEL_VALUES = (None, "enabled", "disabled", "yes")


def test_each_pod_reaches_the_webhook_at_most_once_and_exactly_when_selected(
    rendered: list[Obj],
) -> None:
    mwc = one(rendered, "MutatingWebhookConfiguration")
    # Every combination: small enough to enumerate, so no sampling.
    for namespace, ns_value, pod_value in itertools.product(
        ("default", "shop", *SYSTEM_NAMESPACES), LABEL_VALUES, LABEL_VALUES
    ):
        ns_labels = {} if ns_value is None else {INJECT: ns_value}
        pod_labels = {} if pod_value is None else {INJECT: pod_value}
        called = hooks_called(mwc, namespace, ns_labels, pod_labels)
        # DESIGN.md: the namespace label enables, the Pod's label wins, system namespaces never.
        wanted = namespace not in SYSTEM_NAMESPACES and (
            pod_value == "enabled" or (ns_value == "enabled" and pod_value != "disabled")
        )
        assert len(called) == (1 if wanted else 0), (namespace, ns_value, pod_value, called)


def test_controller_is_never_injected(rendered: list[Obj]) -> None:
    mwc = one(rendered, "MutatingWebhookConfiguration")
    ns = one(rendered, "Namespace", NAMESPACE)
    template = one(rendered, "Deployment", "synchro-controller")["spec"]["template"]
    pod_labels = template["metadata"]["labels"]
    assert pod_labels[INJECT] == "disabled"
    assert template["metadata"]["annotations"][INJECT] == "disabled"
    assert hooks_called(mwc, NAMESPACE, ns["metadata"].get("labels", {}), pod_labels) == []
    # Even if someone labels synchro-system for injection.
    assert hooks_called(mwc, NAMESPACE, {INJECT: "enabled"}, {INJECT: "enabled"}) == []


# --- RBAC ----------------------------------------------------------------------


def granted(role: Obj) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule.get("apiGroups", [])
        for resource in rule.get("resources", [])
        for verb in rule["verbs"]
    }


def test_rbac_grants_what_the_controller_needs(rendered: list[Obj]) -> None:
    cluster = granted(one(rendered, "ClusterRole", "synchro-controller"))
    local = granted(one(rendered, "Role", "synchro-controller"))
    watch = ("get", "list", "watch")
    needed_cluster = {
        *(("", r, v) for r in ("services", "pods", "namespaces") for v in watch),
        *(("discovery.k8s.io", "endpointslices", v) for v in watch),
        *(
            ("gateway.networking.k8s.io", r + s, v)
            for r in ("httproutes", "grpcroutes")
            for s, verbs in (("", watch), ("/status", ("update", "patch")))
            for v in verbs
        ),
        *(
            ("synchro.dev", r + s, v)
            for r in ("trafficpolicies", "peerauthentications", "authorizationpolicies")
            for s, verbs in (("", watch), ("/status", ("update", "patch")))
            for v in verbs
        ),
        ("authentication.k8s.io", "tokenreviews", "create"),
        ("admissionregistration.k8s.io", "mutatingwebhookconfigurations", "patch"),
    }
    assert needed_cluster <= cluster, needed_cluster - cluster
    needed_local = {
        *(("coordination.k8s.io", "leases", v) for v in ("get", "create", "update")),
        *(("", "configmaps", v) for v in watch),
        *(("", "secrets", v) for v in ("get", "create", "update")),
    }
    assert needed_local <= local, needed_local - local


def test_rbac_is_scoped(rendered: list[Obj]) -> None:
    for role in (one(rendered, "ClusterRole"), one(rendered, "Role")):
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule.get(field, []), (role["kind"], rule)
    cluster = one(rendered, "ClusterRole")
    assert not any(r for (_, r, _) in granted(cluster) if r == "secrets")
    (webhook_rule,) = [
        r for r in cluster["rules"] if "mutatingwebhookconfigurations" in r["resources"]
    ]
    assert webhook_rule["resourceNames"] == ["synchro-injector"]
    assert set(webhook_rule["verbs"]) <= {"get", "watch", "patch"}


def test_bindings_point_at_the_controller_service_account(rendered: list[Obj]) -> None:
    sa = one(rendered, "ServiceAccount", "synchro-controller")
    for kind, role_kind in (("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")):
        binding = one(rendered, kind)
        assert binding["roleRef"]["kind"] == role_kind
        one(rendered, role_kind, binding["roleRef"]["name"])
        assert binding["subjects"] == [
            {
                "kind": "ServiceAccount",
                "name": sa["metadata"]["name"],
                "namespace": sa["metadata"]["namespace"],
            }
        ]
    deployment = one(rendered, "Deployment")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]


# --- controller Deployment, Service, PDB ----------------------------------------


def container_ports(deployment: Obj) -> dict[str, int]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {p["name"]: p["containerPort"] for p in container["ports"]}


def test_controller_deployment(rendered: list[Obj]) -> None:
    from proxy import ports

    deployment = one(rendered, "Deployment", "synchro-controller")
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] != ports.PROXY_CONTAINER_NAME
    named = container_ports(deployment)
    assert named == {
        "webhook": ports.WEBHOOK_PORT,
        "api": ports.CONTROLLER_API_PORT,
        "metrics": ports.CONTROLLER_METRICS_PORT,
    }
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        get = container[probe]["httpGet"]
        assert get["port"] in named and get["scheme"] == "HTTPS", probe
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    resources = container["resources"]
    assert set(resources["requests"]) == set(resources["limits"]) == {"cpu", "memory"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    args = " ".join(container["args"])
    for port in (ports.WEBHOOK_PORT, ports.CONTROLLER_API_PORT):
        assert f":{port}" in args
    volumes = {v["name"]: v for v in pod["volumes"]}
    (config,) = [m for m in container["volumeMounts"] if "configMap" in volumes[m["name"]]]
    assert volumes[config["name"]]["configMap"]["name"] == "synchro-config"
    selector = spec["selector"]["matchLabels"]
    assert selector_matches({"matchLabels": selector}, spec["template"]["metadata"]["labels"])


def host_port(value: str | tuple[str, int]) -> str:
    # The parser keeps some HOST:PORT options as text and splits others.
    return value if isinstance(value, str) else f"{value[0]}:{value[1]}"


def test_controller_arguments_parse(rendered: list[Obj]) -> None:
    # The real synchro-controller parser: an unknown flag would crash-loop the Pod.
    from controlplane import main

    deployment = one(rendered, "Deployment", "synchro-controller")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["synchro-controller"]
    args = main.build_parser().parse_args(container["args"])
    assert args.kubernetes
    assert host_port(args.webhook_listen) == "0.0.0.0:9443"
    assert host_port(args.api_listen) == "0.0.0.0:15012"
    (config,) = [m for m in container["volumeMounts"] if m["name"] == "config"]
    assert Path(config["mountPath"]) == main.DEFAULT_MESH_CONFIG
    env = {e["name"] for e in container["env"]}
    assert {"POD_NAMESPACE", "SYNCHRO_SERVICE_NAME", "SYNCHRO_WEBHOOK_CONFIG"} <= env


def test_pdb_keeps_a_controller_up(rendered: list[Obj]) -> None:
    deployment = one(rendered, "Deployment", "synchro-controller")
    pdb = one(rendered, "PodDisruptionBudget", "synchro-controller")
    assert pdb["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    assert 1 <= pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    assert selector_matches(
        pdb["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"]
    )


def test_service_exposes_webhook_api_and_metrics(rendered: list[Obj]) -> None:
    deployment = one(rendered, "Deployment", "synchro-controller")
    service = one(rendered, "Service", "synchro-controller")
    named = container_ports(deployment)
    mapping = {
        p["port"]: named[p["targetPort"]] if isinstance(p["targetPort"], str) else p["targetPort"]
        for p in service["spec"]["ports"]
    }
    assert mapping == {443: 9443, 15012: 15012, 15014: 15014}
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector_matches({"matchLabels": service["spec"]["selector"]}, labels)


# --- synchro-config ------------------------------------------------------------


def mesh_config(rendered: list[Obj]) -> dict[str, str]:
    data: dict[str, str] = one(rendered, "ConfigMap", "synchro-config")["data"]
    return data


def test_mesh_config_defaults(rendered: list[Obj]) -> None:
    mesh = mesh_config(rendered)
    assert all(isinstance(v, str) for v in mesh.values()), "ConfigMap data must be strings"
    assert mesh["trustDomain"] == "cluster.local"
    assert mesh["defaultMtlsMode"] == "PERMISSIVE"
    assert mesh["outboundPolicy"] == "ALLOW_ANY"
    assert mesh["accessLog"] in ("off", "json", "text")
    assert "tracingEndpoint" in mesh
    assert 0 <= float(mesh["traceSampling"]) <= 100
    assert mesh["nativeSidecar"] == "true"
    assert mesh["proxyImage"] == "synchro:dev"
    for k in ("proxyCPURequest", "proxyCPULimit", "proxyMemoryRequest", "proxyMemoryLimit"):
        assert mesh[k]


def test_mesh_config_is_read_by_the_injector(rendered: list[Obj], tmp_path: Path) -> None:
    # Through the webhook's real loader, laid out as the Deployment mounts the
    # ConfigMap (/etc/synchro, one file per key), with values that differ from
    # the loader's built-in defaults so that a silently ignored key shows.
    from webhook.config import InjectorConfig, load

    mesh = dict(mesh_config(rendered))
    changed = {"proxyImage": "registry.example/synchro:1.2", "nativeSidecar": "false"}
    mesh.update(changed)
    for name, value in mesh.items():
        (tmp_path / name).write_text(value)
    injector = load(tmp_path)
    assert injector.image == changed["proxyImage"]
    assert injector.native_sidecar is False
    assert injector.cpu_request == mesh["proxyCPURequest"]
    assert injector.access_log == mesh["accessLog"]
    assert injector.trust_domain == mesh["trustDomain"]
    assert injector.controller_address == mesh["controllerAddress"]
    assert load(tmp_path) != InjectorConfig()


def test_mesh_config_is_read_by_the_control_plane(rendered: list[Obj]) -> None:
    from controlplane import resources

    cm = copy.deepcopy(one(rendered, "ConfigMap", "synchro-config"))
    cm["data"].update(defaultMtlsMode="STRICT", outboundPolicy="REGISTRY_ONLY", trustDomain="x.io")
    parsed = resources.parse(cm)
    assert isinstance(parsed, resources.MeshConfig)
    settings = parsed.settings
    assert (settings.default_mtls_mode, settings.outbound_policy, settings.trust_domain) == (
        "STRICT",
        "REGISTRY_ONLY",
        "x.io",
    )


def makefile_var(name: str) -> str:
    m = re.search(rf"^{name}\s*\?=\s*(\S+)", (REPO / "Makefile").read_text(), re.M)
    assert m, name
    return m[1]


def test_images_agree_with_what_make_kind_up_loads(rendered: list[Obj]) -> None:
    image = makefile_var("IMAGE")
    (container,) = one(rendered, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["image"] == image
    # Loaded with `kind load`, never pulled.
    assert container["imagePullPolicy"] in ("IfNotPresent", "Never")
    assert mesh_config(rendered)["proxyImage"] == image


# --- Dockerfile and kind ---------------------------------------------------------


def test_dockerfile() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [ln.strip() for ln in re.sub(r"\\\n", " ", text).splitlines()]
    instructions = [ln for ln in lines if ln and not ln.startswith("#")]
    assert instructions[0] == "FROM python:3.11-slim"
    run = " ".join(i for i in instructions if i.startswith("RUN "))
    assert re.search(r"apt-get install [^&]*\biptables\b", run)
    assert re.search(r"pip install \.(\s|$)", run)
    users = [i.split()[1] for i in instructions if i.startswith("USER ")]
    assert users, "no default USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "default user must be numeric and non-root"
    copied = [i.split()[1:-1] for i in instructions if i.startswith("COPY ")]
    sources = {s for srcs in copied for s in srcs}
    for src in sources:
        assert (REPO / src).exists(), f"COPY {src}: no such path in the repository"
    pyproject = (REPO / "pyproject.toml").read_text()
    include = re.search(r"include\s*=\s*\[([^\]]*)\]", pyproject)
    assert include
    for pattern in re.findall(r'"(\w+)\*?"', include[1]):
        assert pattern in sources, f"package {pattern} is not copied into the image"
    for script in ("synchro", "synchro-controller", "synchro-init", "synchro-proxy"):
        assert re.search(rf"^{script}\s*=", pyproject, re.M), script


def test_kind_config() -> None:
    config = yaml.safe_load((REPO / "kind-config.yaml").read_text())
    assert config["kind"] == "Cluster"
    assert config["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    roles = sorted(n["role"] for n in config["nodes"])
    assert roles == ["control-plane", "worker"]
    for node in config["nodes"]:
        m = re.fullmatch(r"kindest/node:v(\d+)\.(\d+)\.\d+(@sha256:[0-9a-f]{64})?", node["image"])
        assert m, node["image"]
        assert (int(m[1]), int(m[2])) >= (1, 29), "native sidecars need Kubernetes >= 1.29"


def test_make_kind_up_uses_these_files() -> None:
    makefile = (REPO / "Makefile").read_text()
    target = makefile.split("\nkind-up:", 1)[1].split("\n\n", 1)[0]
    assert "--config kind-config.yaml" in target
    assert "-f deploy/Dockerfile" in target
    assert "kind load docker-image" in target
    assert "apply -k deploy/" in target
