"""The ``layervault`` command: run the services, and inspect checkpoints.

    layervault coordinator --storage URL [--port 7070]
    layervault agent --coordinator ADDR --storage URL [--socket PATH] [--port 0] [--staging-mib 1024]
    layervault up [--storage URL]                 coordinator + agent in one process (one machine)
    layervault status [--coordinator ADDR]        each agent's state, as the coordinator knows it
    layervault ls [JOB] [--kind K]                committed checkpoints
    layervault show JOB STEP [--kind model|optimizer]
    layervault pull JOB STEP [--kind K] [--layer NAME] -o PATH    layers as numpy .npy files
    layervault verify | diff | rm | gc ...        check and prune checkpoints (layervault.lifecycle_cli)
    layervault ray up --storage URL | down | status   the services as Ray actors, one agent per Ray node

``ls``, ``show`` and ``pull`` ask the agent (``--agent``/``LAYERVAULT_AGENT``), or read
storage directly with ``--storage URL`` - no service needed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import signal
import sys
import threading
import time
from typing import Sequence

from layervault import lifecycle_cli
from layervault.errors import LayervaultError
from layervault.progress import human_bytes as _human

DEFAULT_HOME_STORAGE = pathlib.Path.home() / ".layervault" / "storage"


def _storage(url: str | None):  # -> ObjectStore
    from layervault.agent.storage import StorageError, open_store

    if not url:
        DEFAULT_HOME_STORAGE.mkdir(parents=True, exist_ok=True)
        url = DEFAULT_HOME_STORAGE.as_uri()
    store = open_store(url)
    try:
        store.check()
    except StorageError as exc:
        raise SystemExit(f"layervault: storage {url} is not usable: {exc}")
    return store


def _announce(args: argparse.Namespace, info: dict) -> None:
    print("layervault ready: " + json.dumps(info), flush=True)
    if args.ready_file:
        tmp = pathlib.Path(args.ready_file + ".tmp")
        tmp.write_text(json.dumps(info))
        tmp.replace(args.ready_file)


def _serve_until_signal(servers: list, grace: float) -> None:
    """Serve until SIGTERM/SIGINT, then stop gracefully (in order: agents before the coordinator)."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    # Wake up regularly: a signal delivered to one of the upload threads only marks itself
    # pending, and Python runs the handler once the main thread is back in the interpreter.
    while not stop.wait(0.25):
        pass
    logging.getLogger("layervault").info("shutting down (grace %.0fs)", grace)
    for server in servers:
        server.stop(grace=grace)
    _exit_soon_after_stop()


#: Seconds the process may take to exit once its servers stopped.
EXIT_BOUND_S = 5.0


def _exit_soon_after_stop() -> None:
    """Make sure the process ends within :data:`EXIT_BOUND_S` of a graceful stop.

    A storage call of a save aborted at the end of the grace period may still hang (a stalled
    upload waits out botocore's read timeout and our retries: minutes), and Python's exit
    waits for every pool thread. The save is already failed at the coordinator, so nothing
    is lost by leaving without it: a daemon watchdog ends the process if exit takes longer.
    """

    def watchdog() -> None:
        time.sleep(EXIT_BOUND_S)
        ours = sorted(t.name for t in threading.enumerate() if t.name.startswith("lv-") and t.name != "lv-exit-watchdog")
        logging.getLogger("layervault").warning("exit took over %.0fs after the shutdown; leaving without the threads "
                                                "still running: %s", EXIT_BOUND_S, ", ".join(ours) or "-")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    threading.Thread(target=watchdog, daemon=True, name="lv-exit-watchdog").start()


def _metrics_port(args: argparse.Namespace) -> int | None:
    """``--metrics-port``: 0 (the default) serves no metrics."""
    return args.metrics_port or None


def _metrics_info(*servers) -> dict:
    """The metrics endpoint for the ready file, when one is served."""
    served = [s.metrics_address for s in servers if s.metrics_address]
    return {"metrics": served[0]} if served else {}


def _security_flags(p: argparse.ArgumentParser, agent: bool) -> None:
    g = p.add_argument_group("security", "TLS on TCP listeners, job tokens (see README, Security)")
    g.add_argument("--tls-cert", metavar="PEM", help="certificate to listen with" + (
        "; also the client certificate shown to the coordinator" if agent else ""))
    g.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    g.add_argument("--tls-ca", metavar="PEM", help="CA bundle: clients must show a certificate it signed (mutual TLS)" + (
        "; also verifies the coordinator's certificate" if agent else ""))
    g.add_argument("--insecure", action="store_true",
                   help="allow plaintext gRPC on a non-loopback address (refused by default)")
    g.add_argument("--tokens", metavar="FILE", help="job tokens, lines of 'TOKEN JOB[,JOB...]' ('*': every job); "
                                                    "every call must then carry one")
    if agent:
        g.add_argument("--socket-group", metavar="GROUP",
                       help="let this group use the unix socket and staging memory (default: this user only)")
        g.add_argument("--tls-server-name", default="", metavar="NAME",
                       help="name to verify in the coordinator's certificate, when it is not the dialed host")


def _security(args: argparse.Namespace):  # -> ServerSecurity
    from layervault.agent.security import ServerSecurity

    return ServerSecurity.from_flags(args.tls_cert, args.tls_key, args.tls_ca, args.insecure, args.tokens,
                                     getattr(args, "socket_group", None), getattr(args, "tls_server_name", ""))


def _milliseconds(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of milliseconds >= 0")
    return value


def _gbps(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate in GB/s > 0")
    return value


def _agent_kwargs(args: argparse.Namespace) -> dict:
    from layervault.agent.codecs import StoreRates

    return dict(socket_path=args.socket, host=args.host, port=args.port, staging_bytes=args.staging_mib << 20,
                chunk_size=args.chunk_mib << 20, upload_workers=args.upload_workers, cache_bytes=args.cache_mib << 20,
                handoff_wait=args.handoff_wait_ms / 1000,
                store_rates=StoreRates(args.store_write_gbps, args.store_read_gbps),
                metrics_port=_metrics_port(args), security=_security(args), state_dir=args.state_dir)


def cmd_coordinator(args: argparse.Namespace) -> int:
    from layervault.agent.server import start_coordinator

    security = _security(args)  # bad TLS/token files fail before storage is touched
    server = start_coordinator(_storage(args.storage), args.host, args.port, args.commit_timeout,
                               metrics_port=_metrics_port(args), security=security, retention=args.retention)
    _announce(args, {"coordinator": server.address, "pid": os.getpid(), **_metrics_info(server)})
    _serve_until_signal([server], args.grace)
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    from layervault.agent.server import start_agent

    server = start_agent(_storage(args.storage), args.coordinator, **_agent_kwargs(args))
    _announce(args, {"agent": server.address, "tcp": server.tcp_address, "pid": os.getpid(), **_metrics_info(server)})
    _serve_until_signal([server], args.grace)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from prometheus_client import CollectorRegistry

    from layervault.agent.server import start_agent, start_coordinator
    from layervault.agent.storage import open_store

    store = _storage(args.storage)
    registry = CollectorRegistry()  # one /metrics for both roles; each role its own store and storage counters
    agent_kwargs = _agent_kwargs(args)  # bad TLS/token files fail before anything starts
    coordinator = start_coordinator(open_store(store.url), "127.0.0.1", args.coordinator_port, args.commit_timeout,
                                    metrics_registry=registry, security=agent_kwargs["security"], retention=args.retention)
    agent = start_agent(store, coordinator.address, **agent_kwargs, metrics_registry=registry)
    _announce(args, {"agent": agent.address, "tcp": agent.tcp_address, "coordinator": coordinator.address,
                     "storage": store.url, "pid": os.getpid(), **_metrics_info(agent)})
    _serve_until_signal([agent, coordinator], args.grace)
    return 0


def _checkpoints(args: argparse.Namespace):  # -> common_pb2.ListReply
    if args.storage:
        from layervault.agent.catalog import Catalog
        from layervault.agent.storage import open_store

        return Catalog(open_store(args.storage)).checkpoints(args.job or "", args.kind or "").reply()
    from layervault.client import AgentClient

    return AgentClient(args.agent).listing(args.job or "", args.kind or "")


def cmd_ls(args: argparse.Namespace) -> int:
    """Exit status 1 when a stored manifest cannot be read: the readable ones are listed
    all the same, and each damaged one is named on stderr."""
    listing = _checkpoints(args)
    rows = list(listing.checkpoints)
    for d in listing.damaged:
        print(f"layervault: damaged manifest {d.key} ({d.id.job}/{d.id.kind} step {d.id.step}): {d.problem}",
              file=sys.stderr)
    status = 1 if listing.damaged else 0
    if args.json:
        from google.protobuf import json_format

        print(json.dumps([json_format.MessageToDict(r, preserving_proto_field_name=True) for r in rows], indent=1))
        return status
    if not rows:
        print("no committed checkpoints" + (f" for job {args.job!r}" if args.job else ""))
        return status
    print(f"{'JOB':<20} {'KIND':<10} {'STEP':>8} {'NAME':<16} {'WORLD':>5} {'LAYERS':>6} {'RAW':>10} {'STORED':>10}  KEYS")
    for r in rows:
        keys = " ".join(f"{k}={v}" for k, v in sorted(r.keys.items()) if k != "step")
        print(f"{r.id.job:<20} {r.id.kind:<10} {r.id.step:>8} {r.config_name:<16} {r.world_size:>5} {r.entries:>6} "
              f"{_human(r.raw_bytes):>10} {_human(r.stored_bytes):>10}  {keys}")
    return status


def cmd_show(args: argparse.Namespace) -> int:
    selector = {"step": str(args.step)}
    if args.storage:
        from layervault.agent.catalog import Catalog
        from layervault.agent.storage import open_store

        _, manifest = Catalog(open_store(args.storage)).resolve(args.job, args.kind, selector)
    else:
        from layervault.client import AgentClient

        manifest = AgentClient(args.agent).resolve(args.job, args.kind, selector)
    if args.json:
        from layervault.agent.manifest import encode_manifest

        print(encode_manifest(manifest).decode())
        return 0
    cfg = manifest.config
    raw = sum(s.raw_bytes for s in manifest.shards)
    stored = sum(s.stored_bytes for s in manifest.shards)
    print(f"checkpoint   {manifest.job}/{manifest.kind} step {manifest.step}  (committed {manifest.committed_at}, attempt {manifest.save_id})")
    print(f"config       name={cfg.name} framework={cfg.framework} compressor={cfg.compressor} "
          + " ".join(f"{k}={v}" for k, v in sorted(cfg.additional.items())))
    print("keys         " + " ".join(f"{k}={v}" for k, v in sorted(manifest.keys.items())))
    print(f"world size   {manifest.world_size}")
    print(f"size         {_human(raw)} raw, {_human(stored)} stored ({raw / stored if stored else 1:.3f}x), {len(manifest.shards)} shards")
    print(f"\n{'LAYER':<44} {'DTYPE':<9} {'SHAPE':<18} {'RANK':>4} {'RAW':>10} {'STORED':>10} {'CHUNKS':>6}  CODEC")
    for s in manifest.shards:
        shape = "x".join(map(str, s.layout.local_shape)) or "scalar"
        print(f"{s.name:<44} {s.layout.dtype:<9} {shape:<18} {s.rank:>4} {_human(s.raw_bytes):>10} "
              f"{_human(s.stored_bytes):>10} {len(s.chunks):>6}  {'+'.join(s.codec) or 'none'}")
    return 0


def _list_agents(address: str, timeout: float):  # -> list[coordinator_pb2.AgentStatus]
    """The coordinator's agents, dialled with the clients' settings (LAYERVAULT_TOKEN, LAYERVAULT_TLS_*)."""
    import grpc

    from layervault.agent.auth import ENV_TOKEN, BearerToken
    from layervault.agent.tls import TlsConfig, open_channel
    from layervault.errors import UnavailableError, error_from_rpc
    from layervault.proto import coordinator_pb2, coordinator_pb2_grpc

    token = os.environ.get(ENV_TOKEN, "")
    with open_channel(address, TlsConfig.from_env(), (), [BearerToken(token)] if token else []) as channel:
        try:
            return list(coordinator_pb2_grpc.CoordinatorStub(channel).ListAgents(
                coordinator_pb2.ListAgentsRequest(), timeout=timeout).agents)
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise UnavailableError(f"coordinator {address} is unavailable: {exc.details()}") from None
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise UnavailableError(f"{address} does not answer ListAgents: not a layervault coordinator, "
                                       "or one older than `layervault status`") from None
            raise error_from_rpc(exc) from None


def cmd_status(args: argparse.Namespace) -> int:
    from layervault.agent.agent_registry import phase_name

    agents = _list_agents(args.coordinator, args.timeout)
    if args.json:
        from google.protobuf import json_format

        rows = []
        for a in agents:
            row = json_format.MessageToDict(a, preserving_proto_field_name=True, always_print_fields_with_no_presence=True,
                                            unquote_int64_if_possible=True)
            row["state"]["phase"] = phase_name(a.state.phase)
            rows.append(row)
        print(json.dumps(rows, indent=1))
        return 0
    if not agents:
        print(f"no agent has reported to the coordinator at {args.coordinator}")
        return 0
    print(f"{'AGENT':<28} {'STATE':<9} {'IN FLIGHT':>9} {'STAGING USED/BUDGET':>21} {'QUEUE':>6} "
          f"{'RSS (PEAK)':>21} {'SEEN':>7}  LAST ERROR")
    for a in agents:
        s = a.state
        staging = f"{_human(s.staging_used_bytes)} / {_human(s.staging_budget_bytes)}"
        memory = f"{_human(s.rss_bytes)} ({_human(s.peak_rss_bytes)})"
        error = f"{s.last_error_at} {s.last_error}" if s.last_error else "-"
        print(f"{s.agent_id:<28} {phase_name(s.phase):<9} {s.saves_in_flight:>9} {staging:>21} {s.upload_queue_chunks:>6} "
              f"{memory:>21} {a.seconds_since_report:>6.1f}s  {error}")
    return 0


_PULL_BATCH_BYTES = 256 << 20  # layers fetched per round trip, so a large checkpoint never sits in memory whole


class _Puller:
    """Fetches whole layers of one checkpoint as numpy arrays, through the agent or from storage."""

    def __init__(self, args: argparse.Namespace) -> None:
        selector = {} if args.step == "latest" else {"step": str(args.step)}
        self.store = self.client = None
        self.progress = None  # a ByteProgress when stderr is a terminal
        if args.storage:
            from layervault.agent.catalog import Catalog
            from layervault.agent.storage import open_store

            self.store = open_store(args.storage)
            _, self.manifest = Catalog(self.store).resolve(args.job, args.kind, selector)
        else:
            from layervault.client import AgentClient

            self.client = AgentClient(args.agent)
            self.manifest = self.client.resolve(args.job, args.kind, selector)

    def names(self) -> list[str]:
        return list(dict.fromkeys(s.name for s in self.manifest.shards))

    def batches(self, names: list[str]) -> list[list[str]]:
        size: dict[str, int] = {}
        for shard in self.manifest.shards:
            size[shard.name] = size.get(shard.name, 0) + shard.raw_bytes
        out: list[list[str]] = [[]]
        total = 0
        for name in names:
            if out[-1] and total + size[name] > _PULL_BATCH_BYTES:
                out.append([])
                total = 0
            out[-1].append(name)
            total += size[name]
        return out

    def fetch(self, names: list[str]):  # -> dict[str, np.ndarray]
        from layervault.arrays import assemble, shard_sinks
        from layervault.errors import NotFoundError
        from layervault.progress import CountingSink

        wanted = set(names)
        indices = [i for i, s in enumerate(self.manifest.shards) if s.name in wanted]
        missing = wanted - {self.manifest.shards[i].name for i in indices}
        if missing:
            m = self.manifest
            raise NotFoundError(f"{m.job}/{m.kind} step {m.step} has no layer {', '.join(map(repr, sorted(missing)[:5]))}")
        sinks = shard_sinks(self.manifest, indices)
        counted = {i: CountingSink(s, self.progress) for i, s in sinks.items()} if self.progress else sinks
        if self.client is not None:
            self.client.restore(self.manifest, names, counted)
        else:
            self._read_storage(indices, counted)
        return assemble(self.manifest, sinks)

    def _read_storage(self, indices: list[int], sinks: dict, window: int = 16) -> None:
        """Chunks straight from storage, verified and decoded as the agent would, ``window`` at a time."""
        import collections
        from concurrent.futures import ThreadPoolExecutor

        from layervault.agent.restore import fetch_chunk

        work = collections.deque((i, c) for i in indices for c in self.manifest.shards[i].chunks)
        in_flight: collections.deque = collections.deque()
        with ThreadPoolExecutor(8, thread_name_prefix="lv-pull") as pool:
            while work or in_flight:
                while work and len(in_flight) < window:
                    index, chunk = work.popleft()
                    future = pool.submit(fetch_chunk, self.store, self.manifest, self.manifest.shards[index], chunk)
                    in_flight.append((index, chunk.raw_offset, future))
                index, offset, future = in_flight.popleft()
                sinks[index].write(offset, memoryview(future.result()))


def _write_npy(path: pathlib.Path, name: str, array) -> None:
    import numpy as np

    from layervault.arrays import npy_compatible

    out = npy_compatible(array)
    with open(path, "wb") as f:
        np.save(f, out, allow_pickle=False)
    widened = ""
    if out is not array:
        widened = f" (stored {array.dtype.name}, widened to {out.dtype.name}: .npy has no {array.dtype.name})"
    print(f"{name}  {array.dtype.name} {list(array.shape)} -> {path}{widened}")


def cmd_pull(args: argparse.Namespace) -> int:
    from layervault.agent.keys import layer_segment

    if args.step != "latest" and not args.step.isdigit():
        raise ValueError(f"STEP must be a non-negative integer or 'latest', got {args.step!r}")
    from layervault.progress import ByteProgress

    puller = _Puller(args)
    wanted = {args.layer} if args.layer is not None else set(puller.names())
    puller.progress = ByteProgress.for_terminal(sum(s.raw_bytes for s in puller.manifest.shards if s.name in wanted), "pull ")
    out = pathlib.Path(args.output)
    try:
        if args.layer is not None:
            if out.is_dir():
                out = out / f"{layer_segment(args.layer)}.npy"
            _write_npy(out, args.layer, puller.fetch([args.layer])[args.layer])
            return 0
        out.mkdir(parents=True, exist_ok=True)
        for batch in puller.batches(puller.names()):
            for name, array in puller.fetch(batch).items():
                _write_npy(out / f"{layer_segment(name)}.npy", name, array)
        return 0
    finally:
        if puller.progress:
            puller.progress.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="layervault", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default=os.environ.get("LAYERVAULT_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True)

    def service(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.add_argument("--storage", help="s3://bucket/prefix or file:///path (default for up: ~/.layervault/storage)")
        p.add_argument("--ready-file", help="write the bound addresses as JSON here once serving")
        p.add_argument("--commit-timeout", type=float, default=600.0, help="seconds a save may take to commit")
        p.add_argument("--grace", type=float, default=30.0,
                       help="on SIGTERM: seconds to let in-flight hand-offs and uploads finish before aborting them")
        p.add_argument("--metrics-port", type=int, default=0,
                       help="serve Prometheus metrics on this port, on the gRPC listener's host "
                            "(0: off; operators: 9464 for agents, 9465 for the coordinator)")
        p.add_argument("--log-format", choices=["text", "json"], default=os.environ.get("LAYERVAULT_LOG_FORMAT", "text"),
                       help="json: one JSON object per line, with job/kind/step/rank/save_id/agent fields")
        _security_flags(p, agent=name != "coordinator")
        return p

    p = service("coordinator", "run the coordinator")
    p.add_argument("--retention", type=lifecycle_cli.retention_arg, default=None,
                   help="retention for jobs whose saves set none, e.g. keep_last=3,keep_every=1000,keep_best=loss:min:2")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=7070)
    p.set_defaults(func=cmd_coordinator)

    for name, help_, func in (("agent", "run a node agent", cmd_agent), ("up", "run coordinator + agent (one machine)", cmd_up)):
        from layervault.agent.codecs import StoreRates
        from layervault.agent.server import default_socket_path

        p = service(name, help_)
        if name == "agent":
            p.add_argument("--coordinator", required=True, help="coordinator address host:port")
        else:
            p.add_argument("--coordinator-port", type=int, default=0)
            p.add_argument("--retention", type=lifecycle_cli.retention_arg, default=None,
                           help="the coordinator's retention for jobs whose saves set none (see `coordinator --help`)")
        p.add_argument("--socket", default=default_socket_path(), help="unix socket for the node's ranks")
        p.add_argument("--host", default="127.0.0.1", help="TCP interface (0.0.0.0 for other nodes)")
        p.add_argument("--port", type=int, default=0, help="TCP port (0: any free port)")
        p.add_argument("--staging-mib", type=int, default=1024, help="staging budget (shared memory) in MiB")
        p.add_argument("--chunk-mib", type=int, default=4, help="chunk (object) size in MiB")
        p.add_argument("--upload-workers", type=int, default=8)
        p.add_argument("--handoff-wait-ms", type=_milliseconds, default=250,
                       help="longest an upload defers one chunk to ranks handing off (0: never defer)")
        p.add_argument("--cache-mib", type=int, default=256, help="node-local cache of restored chunks in MiB")
        p.add_argument("--store-write-gbps", type=_gbps, default=StoreRates.write_gbps, metavar="GBPS",
                       help="how fast the storage takes this agent's writes; with --store-read-gbps it decides per "
                            "layer whether a codec saves more time than it costs (lower: compress more)")
        p.add_argument("--store-read-gbps", type=_gbps, default=StoreRates.read_gbps, metavar="GBPS",
                       help="how fast restores read from the storage")
        p.add_argument("--state-dir", help="journals of handed-off saves, finished by the agent after a restart "
                                           "(default: beside the socket, SOCKET without .sock + .state; '' for none)")
        p.set_defaults(func=func)

    for name, func in (("ls", cmd_ls), ("show", cmd_show)):
        p = sub.add_parser(name, help="list checkpoints" if name == "ls" else "show one checkpoint")
        if name == "ls":
            p.add_argument("job", nargs="?")
            p.add_argument("--kind", choices=["model", "optimizer"])
        else:
            p.add_argument("job")
            p.add_argument("step", type=int)
            p.add_argument("--kind", choices=["model", "optimizer"], default="model")
        p.add_argument("--storage", help="read storage directly (no service needed)")
        p.add_argument("--agent", help="agent address (default: LAYERVAULT_AGENT or the default socket)")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=func)

    p = sub.add_parser("status", help="each agent's state, as the coordinator knows it from their heartbeats")
    p.add_argument("--coordinator", default=os.environ.get("LAYERVAULT_COORDINATOR", "127.0.0.1:7070"),
                   help="coordinator address host:port (default: LAYERVAULT_COORDINATOR or 127.0.0.1:7070)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the coordinator")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("pull", help="write layers of a checkpoint as numpy .npy files",
                       description="Write one layer (--layer NAME -o FILE.npy) or every layer (-o DIR: one .npy per layer, "
                                   "names percent-encoded) of a checkpoint, whatever framework saved it. bfloat16 and "
                                   "float8 layers are widened to float32 (exactly): .npy has no such dtypes.")
    p.add_argument("job")
    p.add_argument("step", help="step number, or 'latest'")
    p.add_argument("--kind", choices=["model", "optimizer"], default="model")
    p.add_argument("--layer", help="the one layer (entry) to write; all layers when omitted")
    p.add_argument("-o", "--output", required=True,
                   help="the .npy file (with --layer; or a directory to put it in), else a directory")
    p.add_argument("--storage", help="read storage directly (no service needed)")
    p.add_argument("--agent", help="agent address (default: LAYERVAULT_AGENT or the default socket)")
    p.set_defaults(func=cmd_pull)
    _add_ray_commands(sub)
    lifecycle_cli.add_commands(sub)
    return parser


def cmd_ray(args: argparse.Namespace) -> int:
    from layervault.ray.cli import run

    return run(args)


def _add_ray_commands(sub) -> None:
    """``layervault ray up|down|status``: the services as Ray actors (needs ``layervault[ray]``)."""
    from layervault.agent.codecs import StoreRates

    ray = sub.add_parser("ray", help="run the agents and the coordinator as Ray actors on a Ray cluster")
    ray_sub = ray.add_subparsers(dest="ray_command", required=True)
    up = ray_sub.add_parser("up", help="start (or complete: new nodes get an agent) layervault on the Ray cluster")
    up.add_argument("--storage", required=True, help="s3://bucket/prefix or file:///path, reachable from every node")
    up.add_argument("--staging-mib", type=int, default=1024, help="each agent's staging budget (shared memory) in MiB")
    up.add_argument("--chunk-mib", type=int, default=4, help="chunk (object) size in MiB")
    up.add_argument("--upload-workers", type=int, default=8)
    up.add_argument("--handoff-wait-ms", type=_milliseconds, default=250,
                    help="longest an upload defers one chunk to ranks handing off (0: never defer)")
    up.add_argument("--cache-mib", type=int, default=256, help="each agent's cache of restored chunks in MiB")
    up.add_argument("--store-write-gbps", type=_gbps, default=StoreRates.write_gbps, metavar="GBPS",
                    help="how fast the storage takes each agent's writes (see `agent --help`)")
    up.add_argument("--store-read-gbps", type=_gbps, default=StoreRates.read_gbps, metavar="GBPS",
                    help="how fast restores read from the storage")
    up.add_argument("--commit-timeout", type=float, default=600.0, help="seconds a save may take to commit")
    up.add_argument("--retention", type=lifecycle_cli.retention_arg, default=None,
                    help="the coordinator's retention for jobs whose saves set none (see `coordinator --help`)")
    up.add_argument("--coordinator-host", default="0.0.0.0", help="coordinator's listening interface")
    up.add_argument("--coordinator-port", type=int, default=7070, help="coordinator's TCP port (0: any free port)")
    up.add_argument("--agent-host", default="127.0.0.1", help="agents' TCP interface (ranks use the unix socket)")
    up.add_argument("--socket-dir", help="directory of the agents' unix sockets (default /tmp/layervault-$UID/ray)")
    up.add_argument("--agent-metrics-port", type=int, default=None, metavar="PORT",
                    help="serve each agent's Prometheus metrics on this port, on --agent-host (default: off; "
                         "0: any free port, see `ray status`; 9464 with one Ray node per machine)")
    up.add_argument("--coordinator-metrics-port", type=int, default=None, metavar="PORT",
                    help="serve the coordinator's metrics on this port, on --coordinator-host (default: off; 0: any)")
    up.add_argument("--log-format", choices=["text", "json"], default=os.environ.get("LAYERVAULT_LOG_FORMAT", "text"),
                    help="the services' log lines (json: one object per line); also this command's")
    up.add_argument("--pass-env", action="append", default=[], metavar="NAME",
                    help="hand this variable (or glob, e.g. 'AWS_*') of this shell to the agents and coordinator")
    up.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for every actor to serve")
    _security_flags(up, agent=True)  # as for `layervault agent`; the files must exist on every node
    down = ray_sub.add_parser("down", help="stop every layervault actor (agents drain first)")
    down.add_argument("--grace", type=float, default=10.0, help="seconds agents may finish in-flight uploads")
    state = ray_sub.add_parser("status", help="the coordinator and each node's agent; exit 1 unless all serve")
    state.add_argument("--json", action="store_true")
    for p in (up, down, state):
        p.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "auto"),
                       help="Ray cluster address (default: RAY_ADDRESS, else the cluster started on this machine)")
        p.set_defaults(func=cmd_ray)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from layervault.agent.logs import configure_logging

    configure_logging(args.log_level, getattr(args, "log_format", "text"))
    from layervault.agent.storage import StorageError

    try:
        return args.func(args)
    except (LayervaultError, StorageError, ValueError, OSError) as exc:  # user-facing: a message, not a traceback
        print(f"layervault: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
