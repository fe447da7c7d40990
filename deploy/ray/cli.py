"""``layervault ray up|down|status``: the deployment functions on the command line.

The argument parser lives in ``layervault.cli`` (building it must not import Ray); this
module connects to the cluster and runs one command.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import os

import ray

from layervault.errors import InvalidArgumentError, UnavailableError
from layervault.ray.deployment import DeploymentStatus, down, status, up
from layervault.ray.naming import NAMESPACE


def _connect(address: str) -> None:
    try:
        ray.init(address=address, namespace=NAMESPACE, logging_level=logging.WARNING, log_to_driver=False)
    except ConnectionError as exc:
        raise UnavailableError(f"cannot reach the Ray cluster at {address!r} (set --address or RAY_ADDRESS): {exc}") from None


def passed_env(patterns: list[str], environ: dict[str, str] | None = None) -> dict[str, str]:
    """The caller's variables named by ``patterns`` (exact names or globs such as ``AWS_*``)."""
    environ = dict(os.environ if environ is None else environ)
    chosen = {}
    for pattern in patterns:
        matched = {k: v for k, v in environ.items() if fnmatch.fnmatchcase(k, pattern)}
        if not matched:
            raise InvalidArgumentError(f"--pass-env {pattern}: no such variable in this environment")
        chosen.update(matched)
    return chosen


def _print_status(state: DeploymentStatus) -> None:
    if not state.deployed:
        print("layervault is not deployed on this Ray cluster (layervault ray up --storage URL)")
        return
    if state.coordinator is not None:
        c = state.coordinator
        scheme = "https" if c.options.tls_cert else "http"  # metrics follow the daemons' TLS (agent/metrics.py)
        metrics = f"  metrics {scheme}://{c.metrics_address}/metrics" if c.metrics_address else ""
        print(f"coordinator  {c.address}  node {c.node_id[:12]}  pid {c.pid}  storage {c.options.storage}{metrics}")
    else:
        print(f"coordinator  NOT SERVING: {state.coordinator_problem or 'no coordinator actor'}")
    # The METRICS column only when agents serve metrics (ray up --agent-metrics-port).
    width = max((len(a.info.metrics_address) for a in state.agents if a.info and a.info.metrics_address), default=0)

    def column(text: str) -> str:
        return f"{text:<{max(width, 7)}}  " if width else ""

    print(f"{'NODE':<14} {'AGENT':<58} {'PID':>7}  {column('METRICS')}STATE")
    for a in state.agents:
        where = a.info.address if a.info else "-"
        pid = a.info.pid if a.info else "-"
        metrics = (a.info.metrics_address if a.info else "") or "-"
        print(f"{a.node_id[:12]:<14} {where:<58} {pid:>7}  {column(metrics)}{a.problem or 'serving'}")
    for node_id in state.nodes_without_agent:
        print(f"{node_id[:12]:<14} {'-':<58} {'-':>7}  {column('-')}"
              "no agent: node joined after the last up; run `layervault ray up`")


def _settings(args: argparse.Namespace) -> dict:
    """The :class:`ServiceOptions` fields from the flags of ``ray up`` (same names, ``-`` as ``_``)."""
    return dict(
        # agents
        staging_mib=args.staging_mib, chunk_mib=args.chunk_mib, upload_workers=args.upload_workers,
        cache_mib=args.cache_mib, handoff_wait_ms=args.handoff_wait_ms, store_write_gbps=args.store_write_gbps,
        store_read_gbps=args.store_read_gbps, agent_host=args.agent_host, socket_dir=args.socket_dir,
        # coordinator
        commit_timeout=args.commit_timeout, retention=args.retention or "",
        coordinator_host=args.coordinator_host, coordinator_port=args.coordinator_port,
        # observability
        agent_metrics_port=args.agent_metrics_port, coordinator_metrics_port=args.coordinator_metrics_port,
        log_format=args.log_format,
        # security
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=args.tls_ca, tls_server_name=args.tls_server_name,
        insecure=args.insecure, tokens=args.tokens, socket_group=args.socket_group,
    )


def run(args: argparse.Namespace) -> int:
    """Run ``layervault ray <args.ray_command>`` against the cluster at ``args.address``."""
    _connect(args.address)
    try:
        if args.ray_command == "up":
            state = up(args.storage, env=passed_env(args.pass_env), timeout=args.timeout, **_settings(args))
            _print_status(state)
            return 0
        if args.ray_command == "down":
            stopped = down(grace=args.grace)
            print(f"stopped {stopped} layervault actors" if stopped else "layervault was not running on this Ray cluster")
            return 0
        state = status()
        if args.json:
            print(json.dumps(state.to_dict(), indent=1))
        else:
            _print_status(state)
        return 0 if state.healthy else 1
    finally:
        ray.shutdown()
