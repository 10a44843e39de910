"""`synchro uninstall`: what `synchro install` created, for `kubectl delete -f -`.

The webhook configuration comes first, so that no Pod creation waits on a
controller that is going away, and the namespace last. The CRDs are kept
unless `--crds` is given: deleting a CRD deletes every TrafficPolicy,
PeerAuthentication and AuthorizationPolicy in the cluster with it.

Pods injected before keep their sidecar until they are recreated; remove the
`synchro.dev/inject` labels first, then restart the workloads.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from synchro import manifests, output
from synchro.commands import CommandError
from synchro.commands.install import print_objects

EPILOG = """\
examples:
  synchro uninstall | kubectl delete --ignore-not-found -f -
  synchro uninstall --crds | kubectl delete --ignore-not-found -f -   # policies too
"""

Obj = dict[str, Any]


def stub(obj: Obj) -> Obj:
    """Only what `kubectl delete` needs to find the object."""
    meta = obj.get("metadata", {})
    keep = {"name": meta["name"]}
    if meta.get("namespace"):
        keep["namespace"] = meta["namespace"]
    return {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "metadata": keep}


def to_delete(objs: Sequence[Obj], *, crds: bool) -> list[Obj]:
    """`objs` in reverse install order, webhook configurations first, CRDs only with `crds`."""
    chosen = [
        stub(o) for o in reversed(objs) if crds or o.get("kind") != "CustomResourceDefinition"
    ]
    # Whatever deploy/ lists, the admission webhook must go before the controller.
    chosen.sort(key=lambda o: o["kind"] != "MutatingWebhookConfiguration")
    # And the namespace (everything in it goes with it) after everything else.
    chosen.sort(key=lambda o: o["kind"] == "Namespace")
    return chosen


def cmd_uninstall(args: argparse.Namespace) -> int:
    try:
        objs = manifests.render()
    except manifests.ManifestsError as e:
        raise CommandError(str(e)) from None
    print_objects(to_delete(objs, crds=args.crds), args.output)
    if not args.crds:
        print(
            "synchro: keeping the CRDs and every policy; add --crds to delete them too",
            file=sys.stderr,
        )
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "uninstall",
        help="print what to delete for `kubectl delete -f -`",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--crds",
        action="store_true",
        help="delete the CRDs too (and with them every synchro.dev policy)",
    )
    output.add_output_flag(p, choices=(output.YAML, output.JSON))
    p.set_defaults(func=cmd_uninstall)
