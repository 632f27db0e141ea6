"""Start the operator: `vlmctl operator [--namespace NS ...] [--metrics-port 8080] [--liveness-port 8081]`.

Serves Prometheus metrics on :8080/metrics and Kopf's liveness probe on :8081/healthz.

One replica, or several with `--peering NAME` (the chart runs 2): Kopf peering through the
ClusterKopfPeering (cluster-wide) or KopfPeering (`--namespace`) object NAME, which must exist (the chart
creates it). Every replica writes a keep-alive there every few seconds; a replica pauses (no watches, no
reconciles) while a live replica of higher priority exists. The priority is seniority: the replica that
started first is active and a replica started later waits, so a restarted pod never displaces the active
one. When the active replica dies without a word (SIGKILL, OOM, node loss), its record expires after
`--peering-lifetime` seconds and the standby takes over: it lists the jobs and their stage Jobs afresh
(nothing carries over from the dead replica's memory) and reconciles each, so a running stage keeps its
Job and a pending handoff happens then. Takeover time: at most the lifetime (default 15 s) plus one
reconcile of each job.
"""

from __future__ import annotations

import argparse
import logging
import time

import kopf
from vlm_core.redact import redact_logging

from vlm_operator import metrics

LIVENESS_PORT = 8081
PEERING_LIFETIME = 15  # seconds a replica's keep-alive counts; the standby takes over within this


def seniority_priority(started: float | None = None) -> int:
    """Kopf peering priority from the start time: an earlier start is a higher priority (milliseconds, so
    two replicas never tie; equal priorities would pause both)."""
    return -int((time.time() if started is None else started) * 1000)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmctl operator", description="Run the VLMTrainingJob operator.")
    p.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        help="Watch this namespace (repeatable; glob patterns allowed). Default: all namespaces.",
    )
    p.add_argument("--all-namespaces", "-A", action="store_true", help="Watch every namespace (the default).")
    p.add_argument(
        "--metrics-port", type=int, default=metrics.METRICS_PORT, help="Port of /metrics (0: off)."
    )
    p.add_argument("--liveness-port", type=int, default=LIVENESS_PORT, help="Port of /healthz (0: off).")
    p.add_argument(
        "--peering",
        metavar="NAME",
        default=None,
        help="Run as one of several replicas: Kopf peering through the (Cluster)KopfPeering object NAME, which "
        "must exist; the replica started first is active, the others wait. Default: standalone (one replica).",
    )
    p.add_argument(
        "--peering-lifetime",
        type=int,
        default=PEERING_LIFETIME,
        help=f"Seconds a replica's keep-alive counts: a standby takes over this long after the active replica "
        f"died (default {PEERING_LIFETIME}).",
    )
    p.add_argument("--verbose", "-v", action="store_true", help="Debug logging.")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.all_namespaces and args.namespace:
        build_parser().error("--all-namespaces and --namespace are mutually exclusive")
    if args.peering_lifetime < 2:
        build_parser().error(f"--peering-lifetime: {args.peering_lifetime} s; accepted: 2 seconds or more")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    redact_logging()  # credentials never reach the operator's log
    from vlm_operator import handlers  # noqa: F401  (registers the handlers)

    if args.metrics_port:
        metrics.serve(args.metrics_port)
    liveness = f"http://0.0.0.0:{args.liveness_port}/healthz" if args.liveness_port else None
    settings = kopf.OperatorSettings()
    settings.peering.lifetime = args.peering_lifetime
    settings.peering.stealth = True  # no log line per keep-alive; pauses and resumes are still logged
    kopf.run(
        settings=settings,
        standalone=not args.peering,
        peering_name=args.peering,  # mandatory when given: a missing peering object is an error, not "standalone"
        priority=seniority_priority() if args.peering else None,
        clusterwide=not args.namespace,
        namespaces=args.namespace or (),
        liveness_endpoint=liveness,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
