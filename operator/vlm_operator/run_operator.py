"""Start the operator: `vlmctl operator [--namespace NS ...] [--metrics-port 8080] [--liveness-port 8081]`.

Serves Prometheus metrics on :8080/metrics and Kopf's liveness probe on :8081/healthz. Runs as one
replica (Deployment strategy Recreate), so Kopf peering is off (`standalone`).
"""

from __future__ import annotations

import argparse
import logging

import kopf
from vlm_core.redact import redact_logging

from vlm_operator import metrics

LIVENESS_PORT = 8081


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
    p.add_argument("--verbose", "-v", action="store_true", help="Debug logging.")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.all_namespaces and args.namespace:
        build_parser().error("--all-namespaces and --namespace are mutually exclusive")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    redact_logging()  # credentials never reach the operator's log
    from vlm_operator import handlers  # noqa: F401  (registers the handlers)

    if args.metrics_port:
        metrics.serve(args.metrics_port)
    liveness = f"http://0.0.0.0:{args.liveness_port}/healthz" if args.liveness_port else None
    kopf.run(
        standalone=True,
        clusterwide=not args.namespace,
        namespaces=args.namespace or (),
        liveness_endpoint=liveness,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
