"""Security of the daemons: TLS and mutual TLS, the listen/dial rule (the /metrics listener
included), the unix socket's permissions, per-job tokens, and storage credentials kept out of
logs, errors and manifests.

Real servers throughout; certificates come from a throw-away CA (tests/pki.py).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import secrets
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import urllib.request

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

import layervault as lv
from layervault.agent.auth import TokenFileError, TokenTable
from layervault.agent.metrics import serve_metrics
from layervault.agent.security import ServerSecurity, resolve_group
from layervault.agent.server import start_agent, start_coordinator
from layervault.agent.storage import open_store
from layervault.agent.tls import TlsConfig, TlsConfigError
from layervault.client import AgentClient
from layervault.errors import (
    InvalidArgumentError,
    LayervaultError,
    PermissionDeniedError,
    UnauthenticatedError,
    UnavailableError,
)
from layervault.proto import common_pb2, coordinator_pb2, coordinator_pb2_grpc
from layervault.torch import ModelManager

from pki import TestCA
from services import ServiceProcess

STATE = {"encoder.weight": torch.arange(4096, dtype=torch.float32).reshape(64, 64), "head.bias": torch.ones(8)}


def _fresh() -> dict[str, torch.Tensor]:
    return {name: torch.zeros_like(t) for name, t in STATE.items()}


def _assert_state(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor] = STATE) -> None:
    assert state.keys() == expected.keys()
    for name in expected:
        assert torch.equal(state[name], expected[name]), name


def _manager(client: AgentClient, job: str) -> ModelManager:
    return ModelManager(lv.ModelConfig(job=job, name="net"), agent=client)


def _socket_path() -> str:
    return f"{tempfile.mkdtemp(prefix='lv-sec-', dir='/tmp')}/agent.sock"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("pki")
    ca, rogue = TestCA(folder, "ca"), TestCA(folder, "rogue")
    return {"ca": ca.cert, "server": ca.issue("server"), "client": ca.issue("rank"), "rogue": rogue.issue("agent")}


def _tls(pki: dict, who: str = "server", ca: bool = True) -> TlsConfig:
    issued = pki[who]
    return TlsConfig.load(issued.cert, issued.key, pki["ca"] if ca else None)


@pytest.fixture(autouse=True)
def _no_client_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LAYERVAULT_TOKEN", "LAYERVAULT_TLS_CA", "LAYERVAULT_TLS_CERT", "LAYERVAULT_TLS_KEY"):
        monkeypatch.delenv(name, raising=False)


# -- TLS ----------------------------------------------------------------------------------------


def test_mutual_tls_round_trip_on_all_interfaces(pki, tmp_path):
    """Coordinator on 0.0.0.0 with mTLS, agent dialing it with its certificate, a rank over TCP with its own."""
    url = (tmp_path / "store").as_uri()
    security = ServerSecurity(tls=_tls(pki))
    coordinator = start_coordinator(open_store(url), "0.0.0.0", 0, security=security)
    port = coordinator.address.rsplit(":", 1)[1]
    agent = start_agent(open_store(url), f"127.0.0.1:{port}", host="127.0.0.1", staging_bytes=16 << 20, security=security)
    try:
        client = AgentClient(agent.tcp_address, shared_memory=False, tls=_tls(pki, "client"))
        mm = _manager(client, "tls-job")
        info = mm.save(STATE, step=1).wait(60)
        assert info.id.step == 1
        restored = _fresh()
        mm.load(restored, step=1)
        _assert_state(restored)
        # The same rank through the environment, as a launcher would set it up.
        env = {"LAYERVAULT_TLS_CA": str(pki["ca"]), "LAYERVAULT_TLS_CERT": str(pki["client"].cert),
               "LAYERVAULT_TLS_KEY": str(pki["client"].key)}
        from_env = AgentClient(agent.tcp_address, shared_memory=False, tls=TlsConfig.from_env(env))
        assert [c.id.step for c in from_env.list("tls-job")] == [1]
    finally:
        agent.stop(grace=0)
        coordinator.stop(grace=0)


def test_tls_listeners_refuse_plaintext_and_unknown_certificates(pki, tmp_path):
    url = (tmp_path / "store").as_uri()
    security = ServerSecurity(tls=_tls(pki))
    coordinator = start_coordinator(open_store(url), "127.0.0.1", 0, security=security)
    # This agent's client certificate comes from another CA: the coordinator must refuse it.
    rogue = ServerSecurity(tls=TlsConfig.load(pki["rogue"].cert, pki["rogue"].key, pki["ca"]))
    agent = start_agent(open_store(url), coordinator.address, socket_path=_socket_path(), staging_bytes=16 << 20,
                        security=rogue)
    try:
        # A plaintext client on a TLS port, and a TLS client without a client certificate.
        for channel in (grpc.insecure_channel(coordinator.address),
                        grpc.secure_channel(coordinator.address, grpc.ssl_channel_credentials(pki["ca"].read_bytes()))):
            with channel, pytest.raises(grpc.RpcError) as refused:
                coordinator_pb2_grpc.CoordinatorStub(channel).List(common_pb2.ListRequest(), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(UnavailableError):  # a plaintext rank on the agent's TLS port
            AgentClient(agent.tcp_address, shared_memory=False).stats()
        # The rogue agent serves its unix socket, but its coordinator calls fail the handshake.
        with pytest.raises(UnavailableError):
            _manager(AgentClient(agent.address), "rogue-job").save(STATE, step=1)
        assert coordinator.service.catalog.checkpoints("rogue-job", "").checkpoints == []
    finally:
        agent.stop(grace=0)
        coordinator.stop(grace=0)


def test_bad_tls_files_are_named(pki, tmp_path):
    missing = tmp_path / "missing.pem"
    with pytest.raises(TlsConfigError, match=f"cannot read TLS certificate {missing}"):
        TlsConfig.load(missing, pki["server"].key)
    with pytest.raises(TlsConfigError, match=f"TLS key {pki['rogue'].key} does not match certificate {pki['server'].cert}"):
        TlsConfig.load(pki["server"].cert, pki["rogue"].key)
    not_pem = tmp_path / "ca.txt"
    not_pem.write_text("hello")
    with pytest.raises(TlsConfigError, match=f"CA bundle {not_pem} holds no usable PEM certificate"):
        TlsConfig.load(pki["server"].cert, pki["server"].key, not_pem)
    with pytest.raises(TlsConfigError, match="--tls-cert and --tls-key go together"):
        TlsConfig.load(pki["server"].cert, None)
    with pytest.raises(InvalidArgumentError, match="--tls-ca needs --tls-cert and --tls-key"):
        ServerSecurity.from_flags(ca=str(pki["ca"]))


def test_plaintext_only_on_loopback_unless_insecure(tmp_path):
    store = open_store((tmp_path / "store").as_uri())
    with pytest.raises(TlsConfigError, match=r"refusing to listen on 0\.0\.0\.0:0 without TLS.*--insecure"):
        start_coordinator(store, "0.0.0.0", 0)
    with pytest.raises(TlsConfigError, match=r"refusing to dial the coordinator at 10\.1\.2\.3:7070 without TLS"):
        start_agent(store, "10.1.2.3:7070", staging_bytes=16 << 20)
    opened = start_coordinator(store, "0.0.0.0", 0, security=ServerSecurity(insecure=True))
    opened.stop(grace=0)
    for loopback in ("127.0.0.1", "localhost", "::1"):
        start_coordinator(store, loopback, 0).stop(grace=0)


def _scrape(url: str, context: ssl.SSLContext | None = None) -> str:
    with urllib.request.urlopen(url, timeout=10, context=context) as response:
        return response.read().decode()


def test_metrics_listener_uses_the_daemons_tls(pki, tmp_path):
    """With TLS configured, /metrics is HTTPS with the daemon's certificate, on all interfaces
    too; with --tls-ca a scraper shows a certificate that CA signed, as every gRPC client must."""
    url = (tmp_path / "store").as_uri()
    mutual = start_coordinator(open_store(url), "0.0.0.0", 0, security=ServerSecurity(tls=_tls(pki)), metrics_port=0)
    server_only = start_coordinator(open_store(url), "127.0.0.1", 0, security=ServerSecurity(tls=_tls(pki, ca=False)),
                                    metrics_port=0)
    try:
        port = mutual.metrics_address.rsplit(":", 1)[1]
        metrics = f"https://127.0.0.1:{port}/metrics"
        scraper = ssl.create_default_context(cafile=str(pki["ca"]))
        scraper.load_cert_chain(str(pki["client"].cert), str(pki["client"].key))
        assert "layervault_coordinator_saves_committed_total" in _scrape(metrics, scraper)
        for refused in (ssl.create_default_context(cafile=str(pki["ca"])),  # no client certificate
                        _rogue_scraper(pki)):                               # one of another CA
            with pytest.raises(OSError):
                _scrape(metrics, refused)
        with pytest.raises(OSError):  # plaintext HTTP on the TLS port
            _scrape(f"http://127.0.0.1:{port}/metrics")
        with socket.create_connection(("127.0.0.1", int(port))):  # silent: must not stall other scrapes
            assert "process_resident_memory_bytes" in _scrape(metrics, scraper)
        # Without --tls-ca: HTTPS that any scraper trusting the CA may read.
        assert "layervault_coordinator" in _scrape(f"https://{server_only.metrics_address}/metrics",
                                                   ssl.create_default_context(cafile=str(pki["ca"])))
    finally:
        mutual.stop(grace=0)
        server_only.stop(grace=0)


def _rogue_scraper(pki: dict) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki["ca"]))
    context.load_cert_chain(str(pki["rogue"].cert), str(pki["rogue"].key))
    return context


def test_plaintext_metrics_only_on_loopback_unless_insecure():
    with pytest.raises(TlsConfigError, match=r"refusing to serve metrics on 0\.0\.0\.0:0 without TLS.*--insecure"):
        serve_metrics(CollectorRegistry(), "0.0.0.0", 0)
    for host, insecure in (("0.0.0.0", True), ("127.0.0.1", False), ("::1", False)):
        endpoint = serve_metrics(CollectorRegistry(), host, 0, insecure=insecure)
        try:
            assert endpoint.url.startswith("http://")
            assert "python_info" in _scrape(f"http://{'[::1]' if host == '::1' else '127.0.0.1'}:"
                                            f"{endpoint.address.rsplit(':', 1)[1]}/metrics")
        finally:
            endpoint.close()


def test_cli_names_the_flag_problem(tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "layervault.cli", "coordinator", "--storage",
                               (tmp_path / "store").as_uri(), *args], capture_output=True, text=True, timeout=60)

    plain = run("--port", "0")  # the coordinator's default host is 0.0.0.0
    assert plain.returncode == 1 and "refusing to listen on 0.0.0.0:0 without TLS" in plain.stderr
    assert "Traceback" not in plain.stderr
    missing = run("--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", str(tmp_path / "nope.key"))
    assert missing.returncode == 1 and f"cannot read TLS certificate {tmp_path / 'nope.pem'}" in missing.stderr


# -- the node's unix socket ---------------------------------------------------------------------


@pytest.mark.parametrize("group", [None, os.getgid()], ids=["owner", "group"])
def test_unix_socket_is_private_to_the_owner_or_group(tmp_path, group):
    socket_dir = pathlib.Path(tempfile.mkdtemp(prefix="lv-sec-", dir="/tmp")) / "run"
    agent = start_agent(open_store((tmp_path / "store").as_uri()), "127.0.0.1:9", socket_path=str(socket_dir / "a.sock"),
                        staging_bytes=16 << 20, security=ServerSecurity(socket_group=group))
    try:
        sock, pool = os.stat(socket_dir / "a.sock"), os.stat(agent.service.pool.path)
        assert stat.S_ISSOCK(sock.st_mode)
        want_dir, want = (0o700, 0o600) if group is None else (0o750, 0o660)
        assert stat.S_IMODE(os.stat(socket_dir).st_mode) == want_dir
        assert stat.S_IMODE(sock.st_mode) == want and stat.S_IMODE(pool.st_mode) == want
        if group is not None:
            assert sock.st_gid == group and pool.st_gid == group
    finally:
        agent.stop(grace=0)
    with pytest.raises(InvalidArgumentError, match="--socket-group 'no-such-group-lv': no such group"):
        resolve_group("no-such-group-lv")


# -- per-job tokens -----------------------------------------------------------------------------

TOKEN_A, TOKEN_B, TOKEN_OPERATOR = (secrets.token_hex(16) for _ in range(3))


def test_token_file_format(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"# token  jobs\n\n{TOKEN_A}  job-a,team-*   # a comment\n{TOKEN_OPERATOR} *\n")
    path.chmod(0o600)
    table = TokenTable.load(path)
    grant = table.lookup(TOKEN_A)
    assert grant.source == "tokens:3" and grant.covers("job-a") and grant.covers("team-7") and not grant.covers("job-b")
    assert table.lookup(TOKEN_OPERATOR).all_jobs and table.lookup(TOKEN_B) is None
    for text, message in ((f"{TOKEN_A}\n", "line 1: expected 'TOKEN JOB"), ("short job-a\n", "tokens:1 is shorter than 16"),
                          (f"{TOKEN_A} a\n{TOKEN_A} b\n", "tokens:2 repeats the token at tokens:1"),
                          ("# nothing\n", "holds no tokens")):
        path.write_text(text)
        with pytest.raises(TokenFileError, match=message):
            TokenTable.load(path)
    with pytest.raises(TokenFileError, match=f"cannot read token file {tmp_path / 'absent'}"):
        TokenTable.load(tmp_path / "absent")


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """Coordinator and agent sharing one token file; job-a and job-b each saved with their own token."""
    folder = tmp_path_factory.mktemp("guarded")
    tokens = folder / "tokens"
    tokens.write_text(f"{TOKEN_A} job-a\n{TOKEN_B} job-b\n{TOKEN_OPERATOR} *\n")
    tokens.chmod(0o600)
    url = (folder / "store").as_uri()
    security = ServerSecurity.from_flags(tokens=str(tokens))
    coordinator = start_coordinator(open_store(url), security=security)
    agent = start_agent(open_store(url), coordinator.address, socket_path=_socket_path(), staging_bytes=16 << 20,
                        security=security)
    b_state = {name: t + 1 for name, t in STATE.items()}
    _manager(AgentClient(agent.address, token=TOKEN_A), "job-a").save(STATE, step=1).wait(60)
    _manager(AgentClient(agent.address, token=TOKEN_B), "job-b").save(b_state, step=1).wait(60)
    yield agent, coordinator, b_state
    agent.stop(grace=0)
    coordinator.stop(grace=0)


def test_calls_without_a_known_token_are_unauthenticated(guarded, monkeypatch):
    agent, coordinator, _ = guarded
    for client in (AgentClient(agent.address, token=""), AgentClient(agent.address, token="x" * 32)):
        with pytest.raises(UnauthenticatedError, match="LAYERVAULT_TOKEN|does not know this token"):
            client.list("job-a")
        with pytest.raises(UnauthenticatedError):
            client.stats()
        with pytest.raises(UnauthenticatedError):
            _manager(client, "job-a").save(STATE, step=9)
    # The environment variable is how ranks get it.
    monkeypatch.setenv("LAYERVAULT_TOKEN", TOKEN_A)
    assert [c.id.job for c in AgentClient(agent.address).list("job-a")] == ["job-a"]
    # Health checks stay open for probes; the coordinator checks tokens itself too.
    with grpc.insecure_channel(coordinator.address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as refused:
            coordinator_pb2_grpc.CoordinatorStub(channel).List(common_pb2.ListRequest(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_token_for_job_a_cannot_touch_job_b(guarded):
    agent, coordinator, b_state = guarded
    operator = AgentClient(agent.address, token=TOKEN_OPERATOR)
    before = [(c.id.step, c.save_id) for c in operator.list("job-b")]
    as_a = AgentClient(agent.address, token=TOKEN_A)
    mm_b = _manager(as_a, "job-b")
    with pytest.raises(PermissionDeniedError, match="may not save job 'job-b'; it covers job-a"):
        mm_b.save(STATE, step=1, overwrite=True)
    with pytest.raises(PermissionDeniedError, match="may not save job 'job-b'"):
        mm_b.save(STATE, step=2)
    with pytest.raises(PermissionDeniedError, match="may not read job 'job-b'"):
        mm_b.load(_fresh(), step=1)
    with pytest.raises(PermissionDeniedError, match="may not read job 'job-b'"):
        mm_b.load_layer("head.bias", step=1)
    with pytest.raises(PermissionDeniedError, match="may not list job 'job-b'"):
        as_a.list("job-b")
    assert {c.id.job for c in as_a.list()} == {"job-a"}  # a List of all jobs shows only the token's own
    # The coordinator applies the same rule to a caller that goes around the agent.
    with grpc.insecure_channel(coordinator.address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        begin = coordinator_pb2.BeginSaveRequest(id=common_pb2.CheckpointId(job="job-b", kind="model", step=3),
                                                 world_size=1, agent_id="intruder")
        with pytest.raises(grpc.RpcError) as refused:
            stub.BeginSave(begin, metadata=(("authorization", f"Bearer {TOKEN_A}"),), timeout=5)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as refused:
            stub.ListAgents(coordinator_pb2.ListAgentsRequest(), metadata=(("authorization", f"Bearer {TOKEN_A}"),))
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # job-b is as it was, and its own token still reads it.
    assert [(c.id.step, c.save_id) for c in operator.list("job-b")] == before
    restored = _fresh()
    _manager(AgentClient(agent.address, token=TOKEN_B), "job-b").load(restored, step=1)
    _assert_state(restored, b_state)


def test_operator_token_lists_every_job(guarded):
    agent, _, _ = guarded
    listed = AgentClient(agent.address, token=TOKEN_OPERATOR).list()
    assert {c.id.job for c in listed} >= {"job-a", "job-b"}


# -- storage credentials ------------------------------------------------------------------------


def test_registered_secrets_are_masked_in_records_tracebacks_and_statuses(caplog):
    from layervault.agent import redact
    from layervault.agent.rpc import _status

    secret = "sk-" + secrets.token_hex(12)
    redact.register([secret, "short"])  # too short to mask by value: ordinary words stay readable
    log = logging.getLogger("layervault.test")
    with caplog.at_level("DEBUG"):
        log.debug("headers {'Authorization': 'AWS4-HMAC-SHA256 Credential=ASIAROTATED123/20260101/us-east-1/s3'}")
        log.info("using %s for a short walk", secret)
        try:
            raise RuntimeError(f"boom with {secret}")
        except RuntimeError:
            log.exception("failed")
    assert secret not in caplog.text and "ASIAROTATED123" not in caplog.text
    assert "Credential=[REDACTED]/20260101" in caplog.text and "[REDACTED] for a short walk" in caplog.text
    assert "boom with [REDACTED]" in caplog.text
    code, message = _status(InvalidArgumentError(f"bad layer {secret!r}, short"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message == "bad layer '[REDACTED]', short"


@pytest.mark.s3
@pytest.mark.slow
def test_storage_credentials_appear_in_no_log_error_or_manifest(s3_server, s3_bucket, monkeypatch, caplog, tmp_path):
    if not s3_server.external:  # the test server accepts any key pair: use ones that cannot occur by chance
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "LVKEY" + secrets.token_hex(8).upper())
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "lvsecret/" + secrets.token_urlsafe(24))
    access_key, secret_key = os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
    caplog.set_level("DEBUG")
    seen: list[str] = []

    # In this process: save, load, a failing load (a chunk deleted), a save to a missing bucket.
    url = f"s3://{s3_bucket}/scan"
    coordinator = start_coordinator(open_store(url))
    agent = start_agent(open_store(url), coordinator.address, socket_path=_socket_path(), staging_bytes=16 << 20,
                        cache_bytes=0)  # no cache: the load after the chunk's deletion must go to storage
    broken = start_agent(open_store(f"s3://{s3_bucket}-missing/scan"), coordinator.address, socket_path=_socket_path(),
                         staging_bytes=16 << 20)
    try:
        mm = _manager(AgentClient(agent.address), "scan")
        mm.save(STATE, step=1).wait(60)
        restored = _fresh()
        mm.load(restored, step=1)
        _assert_state(restored)
        manifest_key = mm.client.list("scan")[0].manifest_key
        seen.append(agent.service.store.get(manifest_key).decode())
        chunk = mm.client.resolve("scan", "model", {"step": "1"}).shards[0].chunks[0].key
        agent.service.store.delete([chunk])
        with pytest.raises(LayervaultError) as lost:
            mm.load(_fresh(), step=1)
        seen.append(str(lost.value))
        with pytest.raises(LayervaultError) as failed:
            _manager(AgentClient(broken.address), "scan-broken").save(STATE, step=1).wait(60)
        seen.append(str(failed.value))
        assert "scan-broken" in seen[-1] or "storage" in seen[-1]
    finally:
        broken.stop(grace=0)
        agent.stop(grace=0)
        coordinator.stop(grace=0)
    seen.append(caplog.text)
    assert "Credential=[REDACTED]" in caplog.text  # botocore did log its signed requests: the scan means something

    # A `layervault up` process with DEBUG logs to its own file.
    up = ServiceProcess(["--log-level", "DEBUG", "up", "--storage", f"s3://{s3_bucket}/scan-up", "--socket", _socket_path(),
                         "--staging-mib", "16"], tmp_path, "up")
    try:
        mm = _manager(AgentClient(up.info["agent"]), "scan-up")
        mm.save(STATE, step=1).wait(60)
        mm.load(_fresh(), step=1)
        seen.append(json.dumps([str(c) for c in mm.client.list("scan-up")]))
    finally:
        up.stop()
    seen.append(up.log_path.read_text())
    assert "DEBUG" in seen[-1] and "Credential=[REDACTED]" in seen[-1]

    for text in seen:
        assert access_key not in text and secret_key not in text
