"""Prometheus metrics of the agent and the coordinator, one registry per server.

Each server records into its own :class:`~prometheus_client.CollectorRegistry`, never
the process-wide default one, so several servers in one process (``layervault up``, the
tests) neither collide nor count each other's work; ``layervault up`` hands one registry
to both, so one port shows both roles. A registry is served by :func:`serve_metrics` on the
gRPC listener's host, under the listener's rule (:mod:`layervault.agent.tls`): HTTPS with the
daemon's certificate when it has one (with ``--tls-ca``, scrapers must show a certificate that
CA signed, as every gRPC client must), plain HTTP on loopback, or anywhere with ``--insecure``.

Hot-path cost: a hand-off piece or an uploaded chunk costs a few counter increments
(prometheus_client's own per-value lock), with each codec's labelled children looked up
once and cached. Everything that is a state rather than an event - staging in use, upload
queue, cache hits, storage counters - is read only when scraped, through callbacks and
collectors.

Compression ratio is not a metric of its own: it is derived from two counters per codec,
``layervault_agent_stored_bytes_total / layervault_agent_chunk_raw_bytes_total``, which
stays correct when rates or several agents are summed (a ratio gauge would not).
"""

from __future__ import annotations

import dataclasses
import socket
import ssl
import threading
from typing import Callable, Iterable, Iterator
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from layervault.agent.storage import StoreStats
from layervault.agent.tls import TlsConfig, TlsConfigError, check_plaintext

UPLOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
COMMIT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def codec_label(chain: Iterable[str] | None) -> str:
    """The ``codec`` label of a chain: its descriptors joined by ``+``, or ``none`` (stored raw)."""
    return "+".join(chain or ()) or "none"


@dataclasses.dataclass(frozen=True)
class CodecCounters:
    """The labelled children of one codec chain, resolved once and reused for every chunk."""

    chunks: Counter
    raw_bytes: Counter
    stored_bytes: Counter


class StoreCollector(Collector):
    """Storage request, byte and retry counters of a store, read from its StoreStats at scrape time."""

    _OPS = ("puts", "gets", "deletes", "lists")

    def __init__(self, stats: StoreStats, role: str) -> None:
        self.stats = stats
        self.role = role

    def collect(self) -> Iterator[Metric]:
        counts = self.stats.snapshot()
        requests = CounterMetricFamily("layervault_storage_requests", "Object store calls by operation "
                                       "(deletes: keys asked to be deleted).", labels=["role", "op"])
        for op in self._OPS:
            requests.add_metric([self.role, op.rstrip("s")], counts.get(op, 0))
        yield requests
        transferred = CounterMetricFamily("layervault_storage_bytes", "Payload bytes written to (put) and read "
                                          "from (get) the object store.", labels=["role", "direction"])
        transferred.add_metric([self.role, "put"], counts.get("put_bytes", 0))
        transferred.add_metric([self.role, "get"], counts.get("get_bytes", 0))
        yield transferred
        if "retries" in counts:  # a store that retries counts them in StoreStats.retries
            retries = CounterMetricFamily("layervault_storage_retries", "Storage requests retried after a "
                                          "transient failure.", labels=["role"])
            retries.add_metric([self.role], counts["retries"])
            yield retries


class _CallbackCollector(Collector):
    """Metric families computed by a callback at scrape time."""

    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()


class AgentMetrics:
    """What a node agent counts: hand-offs, uploads by codec, staging, restores."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.received_bytes = Counter("layervault_agent_received_bytes", "Tensor bytes handed off by ranks "
                                      "(shared memory or gRPC stream), counted as each piece is accepted.", registry=r)
        self.chunks = Counter("layervault_agent_chunks_stored", "Chunk objects uploaded, by codec chain.",
                              ["codec"], registry=r)
        self.chunk_raw_bytes = Counter("layervault_agent_chunk_raw_bytes", "Raw (uncompressed) bytes of "
                                       "uploaded chunks, by codec chain.", ["codec"], registry=r)
        self.stored_bytes = Counter("layervault_agent_stored_bytes", "Bytes written to storage for chunks "
                                    "(after the codec chain), by codec chain.", ["codec"], registry=r)
        self.upload_seconds = Histogram("layervault_agent_chunk_upload_seconds", "Time to PUT one chunk object "
                                        "(including the store's retries).", buckets=UPLOAD_BUCKETS, registry=r)
        self.saves_started = Counter("layervault_agent_saves_started", "Rank saves opened on this agent.", registry=r)
        self.saves_durable = Counter("layervault_agent_saves_durable", "Rank saves whose shards were all durable "
                                     "and reported to the coordinator.", registry=r)
        self.saves_failed = Counter("layervault_agent_saves_failed", "Rank saves that failed on this agent "
                                    "(hand-off, upload or coordinator call).", registry=r)
        self.restore_bytes = Counter("layervault_agent_restore_bytes", "Decoded bytes sent to ranks by restores.",
                                     registry=r)
        self.upload_deferred = Counter("layervault_agent_upload_deferred_seconds", "Seconds upload workers held "
                                       "a chunk back for ranks handing off (agent/handoff_gate.py).", registry=r)
        self.staging_used = Gauge("layervault_agent_staging_used_bytes", "Staging pool bytes in use.", registry=r)
        self.staging_budget = Gauge("layervault_agent_staging_budget_bytes", "Staging pool size (the budget).",
                                    registry=r)
        self.upload_queue = Gauge("layervault_agent_upload_queue_chunks", "Chunks staged and not yet durable "
                                  "(queued or uploading).", registry=r)
        self.saves_in_flight = Gauge("layervault_agent_saves_in_flight", "Rank saves handed off or uploading, "
                                     "not yet reported to the coordinator.", registry=r)
        self._codecs: dict[str, CodecCounters] = {}
        self._codecs_lock = threading.Lock()

    def codec(self, chain: Iterable[str] | None) -> CodecCounters:
        """The counters of one codec chain (cached: a dict lookup per chunk, no lock once seen)."""
        label = codec_label(chain)
        found = self._codecs.get(label)
        if found is None:
            with self._codecs_lock:
                found = self._codecs.setdefault(label, CodecCounters(
                    self.chunks.labels(label), self.chunk_raw_bytes.labels(label), self.stored_bytes.labels(label)))
        return found

    def chunk_stored(self, chain: Iterable[str] | None, raw_bytes: int, stored_bytes: int, seconds: float) -> None:
        counters = self.codec(chain)
        counters.chunks.inc()
        counters.raw_bytes.inc(raw_bytes)
        counters.stored_bytes.inc(stored_bytes)
        self.upload_seconds.observe(seconds)

    def watch(self, *, staging_used: Callable[[], float], staging_budget: Callable[[], float],
              upload_queue: Callable[[], float], saves_in_flight: Callable[[], float],
              cache_counts: Callable[[], tuple[int, int]], store_stats: StoreStats) -> None:
        """Connect the scrape-time readings to the agent's live state."""
        self.staging_used.set_function(staging_used)
        self.staging_budget.set_function(staging_budget)
        self.upload_queue.set_function(upload_queue)
        self.saves_in_flight.set_function(saves_in_flight)

        def cache() -> Iterator[Metric]:
            hits, misses = cache_counts()
            family = CounterMetricFamily("layervault_agent_restore_cache", "Restore chunk lookups in the node-local "
                                         "cache (a hit includes joining a fetch already in flight).", labels=["result"])
            family.add_metric(["hit"], hits)
            family.add_metric(["miss"], misses)
            yield family

        self.registry.register(_CallbackCollector(cache))
        self.registry.register(StoreCollector(store_stats, "agent"))


class CoordinatorMetrics:
    """What the coordinator counts: save attempts and how long their commit took."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.saves_started = Counter("layervault_coordinator_saves_started", "Save attempts opened "
                                     "(first BeginSave of a checkpoint).", registry=r)
        self.saves_committed = Counter("layervault_coordinator_saves_committed", "Save attempts committed "
                                       "(manifest written).", registry=r)
        self.saves_failed = Counter("layervault_coordinator_saves_failed", "Save attempts that failed "
                                    "(a rank aborted, deadline passed, or the manifest write failed).", registry=r)
        self.commit_seconds = Histogram("layervault_coordinator_commit_seconds", "From the attempt's first BeginSave "
                                        "to its manifest written.", buckets=COMMIT_BUCKETS, registry=r)
        self.saves_pending = Gauge("layervault_coordinator_saves_pending", "Save attempts open and not yet decided.",
                                   registry=r)

    def watch(self, *, saves_pending: Callable[[], float], agents_by_phase: Callable[[], dict[str, int]],
              store_stats: StoreStats) -> None:
        """Connect the scrape-time readings to the coordinator's live state."""
        self.saves_pending.set_function(saves_pending)

        def agents() -> Iterator[Metric]:
            family = GaugeMetricFamily("layervault_coordinator_agents", "Agents known from their heartbeats, by phase "
                                       "(serving, draining, stopped, stale).", labels=["phase"])
            for phase, count in sorted(agents_by_phase().items()):
                family.add_metric([phase], count)
            yield family

        self.registry.register(_CallbackCollector(agents))
        self.registry.register(StoreCollector(store_stats, "coordinator"))


@dataclasses.dataclass
class MetricsEndpoint:
    """A running ``/metrics`` HTTP(S) server."""

    server: WSGIServer
    thread: threading.Thread
    address: str  # host:port it listens on
    scheme: str = "http"  # "https" when served with the daemon's certificate

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.address}/metrics"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


#: Seconds a scraper has to complete its TLS handshake (and, after it, each read).
HANDSHAKE_TIMEOUT_S = 10.0


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass  # a scrape every few seconds is not news


class _MetricsServer(ThreadingWSGIServer):
    """prometheus_client's threading WSGI server, with TLS shaken hands per connection on the
    connection's own thread under a timeout. (prometheus_client's own TLS server does it inside
    accept(): one client that connects and says nothing would stall every later scrape.)"""

    ssl_context: ssl.SSLContext | None = None

    def finish_request(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        if self.ssl_context is None:
            return super().finish_request(request, client_address)
        request.settimeout(HANDSHAKE_TIMEOUT_S)
        try:
            conn = self.ssl_context.wrap_socket(request, server_side=True)
        except OSError:  # plaintext, no or an unknown client certificate, or silence: no metrics for it
            return None
        try:
            return super().finish_request(conn, client_address)
        finally:
            conn.close()


def _server_context(tls: TlsConfig) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.cert), str(tls.key))
    if tls.verifies_peer_certificates:  # as on the gRPC listener: with a CA, clients show a certificate it signed
        context.load_verify_locations(cadata=tls.ca_pem.decode("ascii", "replace"))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def serve_metrics(registry: CollectorRegistry, host: str, port: int, tls: TlsConfig | None = None,
                  insecure: bool = False) -> MetricsEndpoint:
    """Serve ``registry`` (plus this process's CPU, memory and file descriptors) on ``host:port``.

    With ``tls``: HTTPS with its certificate and key, and with its CA bundle client
    certificates are required. Without: plain HTTP, refused on a non-loopback host unless
    ``insecure`` (:class:`~layervault.agent.tls.TlsConfigError` naming ``--insecure``): job
    names, agents' states and errors would be readable by anyone on the network.
    Port 0 binds any free port; the endpoint's ``address`` says which.
    """
    from prometheus_client import PlatformCollector, ProcessCollector

    shown = f"[{host}]" if ":" in host else host
    if tls is None:
        check_plaintext(f"{shown}:{port}", "serve metrics on", insecure,
                        exposed="job names, agent states and their errors")
    elif not tls.has_identity:
        raise TlsConfigError("serving metrics over TLS needs --tls-cert and --tls-key")
    server_class = type("MetricsServer", (_MetricsServer,), {
        "address_family": socket.AF_INET6 if ":" in host else socket.AF_INET,
        "ssl_context": _server_context(tls) if tls is not None else None,
    })
    try:
        server = make_server(host, port, make_wsgi_app(registry), server_class, handler_class=_QuietHandler)
    except OSError as exc:
        raise OSError(f"cannot serve metrics on {shown}:{port}: {exc}") from exc
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    thread = threading.Thread(target=server.serve_forever, daemon=True, name="lv-metrics")
    thread.start()
    return MetricsEndpoint(server, thread, f"{shown}:{server.server_address[1]}", "https" if tls else "http")
