"""`synchro check`: is the cluster ready for Synchro, and is Synchro healthy in it?

    synchro check --pre    before `synchro install`: the Kubernetes version
                           (>= 1.29, for native sidecars) and the permissions to
                           create everything `synchro install` renders
                           (SelfSubjectAccessReview)
    synchro check          after: the controller Deployment is ready, the
                           webhook configuration has its caBundle, the webhook
                           answers (a server-side dry-run Pod create), the
                           controller API is ready and its CA's roots are valid
    synchro check --local  a controller outside Kubernetes (`synchro up`, or
                           `--controller URL`): ready, CA, resources, proxies

Each check prints one line, ✔ or ✘, with a hint under a ✘; the exit status is
1 when any check fails. The cluster is the current kubeconfig context (or
`--kubeconfig`/`--context`, or in-cluster credentials).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import ssl
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import httpx
from cryptography import x509

from proxy import ports
from synchro import controller_api, output
from synchro.commands import CommandError

EPILOG = """\
examples:
  synchro check --pre
  synchro install | kubectl apply -f - && synchro check
  synchro check --context kind-synchro -o json
  sudo synchro check --local            # the mesh of `synchro up`
  synchro check --controller https://127.0.0.1:15012 --cacert ca.crt
"""

NAMESPACE = "synchro-system"
CONTROLLER = "synchro-controller"
WEBHOOK_CONFIG = "synchro-injector"
INJECT_LABEL = "synchro.dev/inject"
STATUS_ANNOTATION = "synchro.dev/status"
MIN_VERSION = (1, 29)
CA_WARN_DAYS = 30
# The API server reaches the controller's API through its Service (port 15012).
SERVICE_PROXY = f"/api/v1/namespaces/{NAMESPACE}/services/https:{CONTROLLER}:15012/proxy"
# Any Pod name: the config endpoint answers for unknown Pods too; only its
# trust bundle is read.
PROBE_POD = f"{NAMESPACE}/synchro-check"


@dataclass(frozen=True)
class Result:
    name: str
    ok: bool
    detail: str
    hint: str = ""


# --- pure checks: API answers in, a Result out -------------------------------------------


def parse_version(info: Mapping[str, Any]) -> tuple[int, int] | None:
    try:
        major = int(str(info.get("major", "")).rstrip("+"))
        minor = int(str(info.get("minor", "")).rstrip("+"))
        return major, minor
    except ValueError:
        pass
    git = str(info.get("gitVersion", "")).lstrip("v").split(".")
    if len(git) >= 2 and git[0].isdigit() and git[1].isdigit():
        return int(git[0]), int(git[1])
    return None


def version_result(info: Mapping[str, Any]) -> Result:
    name = "Kubernetes version"
    version = parse_version(info)
    shown = info.get("gitVersion") or f"{info.get('major')}.{info.get('minor')}"
    if version is None:
        return Result(name, False, f"cannot read the version from {dict(info)}")
    if version < MIN_VERSION:
        return Result(
            name,
            False,
            f"{shown}: native sidecars need >= {MIN_VERSION[0]}.{MIN_VERSION[1]}",
            "upgrade the cluster, or install with --set nativeSidecar=false "
            "(the proxy then runs as an ordinary container)",
        )
    return Result(name, True, f"{shown} (native sidecars supported)")


def needed_permissions(objs: Iterable[Mapping[str, Any]]) -> list[tuple[str, str, str, str]]:
    """(verb, group, resource, namespace) for every object `synchro install` creates."""
    out: list[tuple[str, str, str, str]] = []
    for o in objs:
        api_version = str(o.get("apiVersion", ""))
        group = api_version.rpartition("/")[0]
        resource = str(o.get("kind", "")).lower() + "s"  # every kind install renders
        namespace = str((o.get("metadata") or {}).get("namespace", ""))
        for verb in ("create", "patch"):  # kubectl apply: create, then patch later
            item = (verb, group, resource, namespace)
            if item not in out:
                out.append(item)
    return out


def access_results(
    reviews: Sequence[tuple[tuple[str, str, str, str], Mapping[str, Any]]],
) -> list[Result]:
    denied = []
    for (verb, group, resource, namespace), status in reviews:
        if not status.get("allowed"):
            where = f" in {namespace}" if namespace else " cluster-wide"
            what = f"{verb} {resource}{'.' + group if group else ''}{where}"
            reason = status.get("reason") or status.get("evaluationError") or ""
            denied.append(what + (f" ({reason})" if reason else ""))
    name = "permissions to install"
    if denied:
        return [
            Result(
                name,
                False,
                f"not allowed to {'; '.join(denied)}",
                "install as a cluster administrator (ClusterRole cluster-admin)",
            )
        ]
    return [Result(name, True, f"{len(reviews)} create/patch permissions granted")]


def deployment_result(dep: Mapping[str, Any] | None) -> Result:
    name = "controller Deployment"
    if dep is None:
        return Result(
            name,
            False,
            f"no Deployment {NAMESPACE}/{CONTROLLER}",
            "synchro install | kubectl apply -f -",
        )
    want = int((dep.get("spec") or {}).get("replicas", 1))
    status = dep.get("status") or {}
    ready = int(status.get("readyReplicas") or 0)
    if ready == 0:
        return Result(
            name,
            False,
            f"0/{want} replicas ready",
            f"kubectl -n {NAMESPACE} describe deployment {CONTROLLER}; "
            f"kubectl -n {NAMESPACE} logs deployment/{CONTROLLER}",
        )
    if ready < want:
        return Result(name, True, f"{ready}/{want} replicas ready (rollout in progress)")
    return Result(name, True, f"{ready}/{want} replicas ready")


def webhook_ca_result(mwc: Mapping[str, Any] | None) -> Result:
    name = "webhook caBundle"
    if mwc is None:
        return Result(
            name, False, f"no MutatingWebhookConfiguration {WEBHOOK_CONFIG}", "synchro install"
        )
    hooks = mwc.get("webhooks") or []
    missing = [
        h.get("name", "?") for h in hooks if not (h.get("clientConfig") or {}).get("caBundle")
    ]
    if not hooks or missing:
        return Result(
            name,
            False,
            f"caBundle not set on {', '.join(missing) or 'any webhook'}",
            "the controller writes it at start-up: check that it runs and may patch "
            f"mutatingwebhookconfigurations/{WEBHOOK_CONFIG}",
        )
    return Result(name, True, f"set on {len(hooks)} webhooks")


def dry_run_result(pod: Mapping[str, Any] | None, error: str, namespace: str) -> Result:
    name = "webhook answers"
    if pod is None:
        return Result(
            name,
            False,
            f"dry-run Pod create in {namespace} failed: {error}",
            "the API server cannot call the webhook: check the controller Service and "
            f"its endpoints (kubectl -n {NAMESPACE} get endpoints {CONTROLLER})",
        )
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    containers = [c.get("name") for c in (spec.get("containers") or [])]
    containers += [c.get("name") for c in (spec.get("initContainers") or [])]
    if (
        STATUS_ANNOTATION in (meta.get("annotations") or {})
        or ports.PROXY_CONTAINER_NAME in containers
    ):
        return Result(name, True, f"a dry-run Pod in {namespace} was injected")
    return Result(
        name,
        False,
        f"a dry-run Pod in {namespace} was admitted but not injected",
        "check the namespace and object selectors of the webhook configuration",
    )


def controller_ready_result(answer: Any, error: str) -> Result:
    name = "controller API"
    if error:
        return Result(name, False, error, "is the controller running? see its log")
    if isinstance(answer, Mapping) and answer.get("ready"):
        return Result(name, True, f"ready (generation {answer.get('generation', '?')})")
    return Result(
        name,
        False,
        "up but no configuration built yet",
        "the controller has not read its resources yet; see its log",
    )


def ca_result(pems: Sequence[str], now: dt.datetime, error: str = "") -> Result:
    name = "CA roots"
    if error:
        return Result(name, False, error, "the controller's CA is not serving its roots")
    if not pems:
        return Result(
            name,
            False,
            "the trust bundle is empty: proxies could not verify one another",
            "start the controller with its CA (--ca-dir) or --trust-bundle",
        )
    expiries = []
    for i, pem in enumerate(pems):
        try:
            cert = x509.load_pem_x509_certificate(pem.encode())
        except ValueError as e:
            return Result(name, False, f"root {i} is not a certificate: {e}")
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            return Result(name, False, f"root {i} ({cert.subject.rfc4514_string()}) is not a CA")
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        if not start <= now <= end:
            return Result(
                name,
                False,
                f"root {i} is not valid now ({start:%Y-%m-%d} .. {end:%Y-%m-%d})",
                "rotate the CA (new --ca-dir contents) and restart the proxies",
            )
        expiries.append(end)
    first = min(expiries)
    days = (first - now).days
    if days < CA_WARN_DAYS:
        return Result(
            name,
            False,
            f"a root expires in {days} days ({first:%Y-%m-%d})",
            "rotate the CA before it expires",
        )
    return Result(name, True, f"{len(pems)} valid, the first expiring {first:%Y-%m-%d}")


def problems_result(answer: Any) -> Result:
    problems = answer.get("problems", []) if isinstance(answer, Mapping) else []
    if problems:
        lines = "; ".join(str(p.get("line", p)) for p in problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        return Result(
            "resources",
            False,
            f"{len(problems)} invalid: {lines}{more}",
            "fix them: an invalid resource is left out of the configuration",
        )
    return Result("resources", True, "no invalid resource")


def proxies_result(answer: Any) -> Result:
    rows = answer.get("proxies", []) if isinstance(answer, Mapping) else []
    bad = [r for r in rows if r.get("state") not in ("SYNCED", None) or r.get("last_nack")]
    if bad:
        names = ", ".join(f"{r.get('proxy')} ({r.get('state')})" for r in bad[:5])
        return Result(
            "proxies", False, f"{len(bad)}/{len(rows)} not in sync: {names}", "synchro status"
        )
    return Result("proxies", True, f"{len(rows)} in sync")


# --- talking to the cluster ------------------------------------------------------------------


class KubeError(Exception):
    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class Kube:
    """JSON over the API server, with the credentials the `kubernetes` client loads."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client

    @classmethod
    def connect(cls, kubeconfig: str | None, context: str | None) -> Kube:
        from kubernetes import client, config

        cfg = client.Configuration()
        try:
            if kubeconfig or context or not os.environ.get("KUBERNETES_SERVICE_HOST"):
                config.load_kube_config(
                    config_file=kubeconfig, context=context, client_configuration=cfg
                )
            else:
                config.load_incluster_config(client_configuration=cfg)
        except (config.ConfigException, OSError, TypeError, ValueError) as e:
            raise CommandError(f"no Kubernetes credentials: {e}") from None
        headers = {"accept": "application/json"}
        token = (cfg.api_key or {}).get("authorization") or (cfg.api_key or {}).get("BearerToken")
        if token:
            headers["authorization"] = token if " " in token else f"Bearer {token}"
        verify: bool | ssl.SSLContext = bool(cfg.verify_ssl)
        if cfg.ssl_ca_cert and cfg.verify_ssl:
            verify = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
        cert = (cfg.cert_file, cfg.key_file) if cfg.cert_file and cfg.key_file else None
        return cls(
            httpx.Client(base_url=cfg.host, headers=headers, verify=verify, cert=cert, timeout=15.0)
        )

    def request(
        self, method: str, path: str, body: Any = None, params: Mapping[str, str] | None = None
    ) -> Any:
        try:
            resp = self.client.request(
                method,
                path,
                params=params,
                content=None if body is None else json.dumps(body),
                headers={"content-type": "application/json"},
            )
        except httpx.HTTPError as e:
            raise KubeError(f"{method} {path}: {e}") from None
        if resp.status_code >= 400:
            try:
                message = resp.json().get("message") or resp.text
            except ValueError:
                message = resp.text
            raise KubeError(f"{message[:300]} (HTTP {resp.status_code})", resp.status_code)
        try:
            return resp.json()
        except ValueError:
            raise KubeError(f"{method} {path}: the answer is not JSON") from None

    def get_or_none(self, path: str) -> Any:
        try:
            return self.request("GET", path)
        except KubeError as e:
            if e.status == 404:
                return None
            raise


def _guard(name: str, fn: Callable[[], Result | list[Result]]) -> list[Result]:
    """An API error in one check is that check's ✘, not the end of the report."""
    try:
        out = fn()
    except KubeError as e:
        hint = "check the kubeconfig context and your permissions" if e.status in (401, 403) else ""
        return [Result(name, False, str(e), hint)]
    return out if isinstance(out, list) else [out]


def pre_checks(kube: Kube) -> list[Result]:
    from synchro.commands import install

    results = _guard("Kubernetes API", lambda: version_result(kube.request("GET", "/version")))

    def permissions() -> list[Result]:
        reviews = []
        for verb, group, resource, namespace in needed_permissions(install.render()):
            attrs = {"verb": verb, "group": group, "resource": resource}
            if namespace:
                attrs["namespace"] = namespace
            review = kube.request(
                "POST",
                "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
                {
                    "apiVersion": "authorization.k8s.io/v1",
                    "kind": "SelfSubjectAccessReview",
                    "spec": {"resourceAttributes": attrs},
                },
            )
            reviews.append(((verb, group, resource, namespace), review.get("status") or {}))
        return access_results(reviews)

    results += _guard("permissions to install", permissions)
    return results


def probe_pod(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"synchro-check-{uuid.uuid4().hex[:8]}",
            "namespace": namespace,
            "labels": {INJECT_LABEL: "enabled", "app.kubernetes.io/name": "synchro-check"},
        },
        "spec": {"containers": [{"name": "app", "image": "registry.k8s.io/pause:3.9"}]},
    }


def _webhook_answers(kube: Kube) -> Result:
    # A namespace that asks for injection if there is one, else default with the
    # Pod's own label (the object webhook): either way the webhook is called.
    listed = kube.request(
        "GET", "/api/v1/namespaces", params={"labelSelector": f"{INJECT_LABEL}=enabled"}
    )
    items = listed.get("items") or []
    namespace = items[0]["metadata"]["name"] if items else "default"
    try:
        pod = kube.request(
            "POST", f"/api/v1/namespaces/{namespace}/pods", probe_pod(namespace), {"dryRun": "All"}
        )
    except KubeError as e:
        return dry_run_result(None, str(e), namespace)
    return dry_run_result(pod, "", namespace)


def _controller_api(kube: Kube, path: str) -> Any:
    return kube.request("GET", SERVICE_PROXY + path)


def _ca_from(get: Callable[[str], Any], now: dt.datetime) -> Result:
    try:
        bundle = get("/v1/trust-bundle")
        pems = list(bundle.get("trust_bundle") or [])
    except (KubeError, CommandError):
        # A controller without the CA endpoint: the roots it pushes to proxies.
        try:
            pems = list(get(f"/v1/config/{PROBE_POD}").get("config", {}).get("trust_bundle") or [])
        except (KubeError, CommandError) as e:
            return ca_result([], now, f"cannot read the trust bundle: {e}")
    return ca_result(pems, now)


def post_checks(kube: Kube, now: dt.datetime) -> list[Result]:
    results = _guard(
        "controller Deployment",
        lambda: deployment_result(
            kube.get_or_none(f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/{CONTROLLER}")
        ),
    )
    results += _guard(
        "webhook caBundle",
        lambda: webhook_ca_result(
            kube.get_or_none(
                f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{WEBHOOK_CONFIG}"
            )
        ),
    )
    results += _guard("webhook answers", lambda: _webhook_answers(kube))
    try:
        ready = _controller_api(kube, "/healthz/ready")
        results.append(controller_ready_result(ready, ""))
    except KubeError as e:
        results.append(controller_ready_result(None, f"through the API server: {e}"))
        return results
    results.append(_ca_from(lambda p: _controller_api(kube, p), now))
    return results


def local_checks(client: controller_api.ControllerClient, now: dt.datetime) -> list[Result]:
    try:
        ready = client.get("/healthz/ready")
        results = [controller_ready_result(ready, "")]
    except CommandError as e:
        return [controller_ready_result(None, str(e))]
    results.append(_ca_from(client.get, now))
    for name, path, judge in (
        ("resources", "/v1/problems", problems_result),
        ("proxies", "/v1/proxies", proxies_result),
    ):
        try:
            results.append(judge(client.get(path)))
        except CommandError as e:
            results.append(Result(name, False, str(e)))
    return results


# --- output ------------------------------------------------------------------------------------


def render_text(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = []
    for r in rows:
        lines.append(f"{output.mark(bool(r['ok']))} {r['name']}: {r['detail']}")
        if not r["ok"] and r.get("hint"):
            lines.append(f"    hint: {r['hint']}")
    failed = sum(1 for r in rows if not r["ok"])
    lines.append("")
    lines.append(f"{failed} of {len(rows)} checks failed" if failed else "all checks passed")
    return "\n".join(lines) + "\n"


def cmd_check(args: argparse.Namespace) -> int:
    now = dt.datetime.now(dt.UTC)
    if args.local or args.controller:
        if args.pre:
            raise CommandError("--pre checks a Kubernetes cluster; it does not go with --local")
        results = local_checks(controller_api.client_from_args(args), now)
    else:
        kube = Kube.connect(args.kubeconfig, args.context)
        results = pre_checks(kube) if args.pre else post_checks(kube, now)
    rows = [asdict(r) for r in results]
    output.emit(rows, args.output, table=render_text)
    return 0 if all(r.ok for r in results) else 1


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "check",
        help="check the cluster before install (--pre) and Synchro's health after",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--pre", action="store_true", help="before install: version, permissions")
    p.add_argument(
        "--local",
        action="store_true",
        help="check a controller outside Kubernetes (the local mesh, or --controller)",
    )
    p.add_argument("--kubeconfig", metavar="FILE", help="kubeconfig file (default: ~/.kube/config)")
    p.add_argument("--context", help="kubeconfig context (default: the current one)")
    output.add_output_flag(p)
    controller_api.add_controller_flags(p)
    p.set_defaults(func=cmd_check)
