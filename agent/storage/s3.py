"""``s3://bucket/prefix``: objects in any S3-compatible store through boto3.

The endpoint, credentials and region come from the standard AWS settings
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ``~/.aws/config`` ...), as
for every boto3 program; ``endpoint_url`` overrides the endpoint for one store. One
boto3 client is shared by all threads (boto3 clients are thread-safe); its connection pool
has ``max_pool_connections`` slots, so size it to the number of concurrent uploads.
Addressing is path-style, which AWS accepts and local servers (MinIO, SeaweedFS) need.

Every botocore failure is turned into :class:`StorageError` (or :class:`ObjectNotFound`)
whose message names the operation, the bucket, the key and the endpoint, so an operator
reading an agent's log knows which store to look at.

Conditional create: ``put_if_absent`` sends ``PutObject`` with ``If-None-Match: *``
(AWS since 2024, MinIO, SeaweedFS 4.x answer 412 when the key exists). A server that does
not implement the header either refuses it or, worse, ignores it and overwrites. On first
use the store therefore probes: it writes a probe key, writes it again with the header, and
only trusts the header if the second write is refused. Otherwise it falls back to
HEAD-then-PUT, which is *not* atomic (two writers racing can both "win"), and says so
through ``supports_conditional_put = False``.
"""

from __future__ import annotations

import io
import re
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import boto3.exceptions
import boto3.s3.transfer
import botocore.config
import botocore.exceptions
import botocore.loaders
import botocore.session

from layervault.agent.storage.base import ByteRange, ObjectNotFound, ObjectStore, StorageError, check_key

#: Above this size ``put`` uploads in parts (chunks are a few MiB; this is a safety net).
MULTIPART_THRESHOLD = 64 << 20
_DELETE_BATCH = 1000  # the most keys one DeleteObjects request may carry
_NOT_FOUND_CODES = {"NoSuchKey", "NotFound", "404"}
_CONFLICT_RETRIES = 5  # 409 ConditionalRequestConflict: another conditional write is in flight
_BUCKET_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9._-]{1,254}")  # botocore's rule, legacy names included

_S3Error = (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, boto3.exceptions.Boto3Error)

# One model loader for every store of the process: each new session would otherwise parse
# the S3 service model again (~70 ms per store; tests and tools open many stores).
_LOADER = botocore.loaders.create_loader()


def _code(exc: BaseException) -> str:
    if isinstance(exc, botocore.exceptions.ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


class S3Store(ObjectStore):
    """Objects below ``prefix`` in ``bucket``; key ``a/b`` is the S3 key ``prefix/a/b``.

    ``conditional_put``: ``None`` probes the server on first use (see the module
    docstring); ``True``/``False`` skip the probe when the server is known.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region_name: str | None = None,
        max_pool_connections: int = 32,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_attempts: int = 5,
        conditional_put: bool | None = None,
    ) -> None:
        super().__init__()
        if not _BUCKET_RE.fullmatch(bucket):
            raise ValueError(f"invalid S3 bucket name {bucket!r}")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            check_key(self.prefix)
        config = botocore.config.Config(
            max_pool_connections=max_pool_connections,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"mode": "standard", "max_attempts": max_attempts},
            s3={"addressing_style": "path"},
            tcp_keepalive=True,
        )
        # A fresh session per store, so the environment and credentials are read now (a
        # shared session would cache the first ones it saw), with the shared model loader.
        session = botocore.session.get_session()
        session.register_component("data_loader", _LOADER)
        self._client: Any = session.create_client("s3", region_name=region_name, endpoint_url=endpoint_url,
                                                  config=config)
        self.endpoint = str(self._client.meta.endpoint_url)
        self._transfer = boto3.s3.transfer.TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD,
            multipart_chunksize=16 << 20,
            max_concurrency=max(1, min(10, max_pool_connections)),
        )
        self._conditional: bool | None = conditional_put
        self._probe_lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def __repr__(self) -> str:
        return f"S3Store({self.url!r}, endpoint={self.endpoint!r})"

    @property
    def supports_conditional_put(self) -> bool:  # type: ignore[override]
        """True when the server honours ``If-None-Match: *`` (probed on first use)."""
        return self._conditional_supported()

    # -- keys and errors ----------------------------------------------------------------

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _error(self, op: str, key: str | None, exc: BaseException) -> StorageError:
        """One botocore failure as a StorageError naming operation, bucket, key, endpoint."""
        where = f"s3://{self.bucket}/{key}" if key is not None else f"bucket {self.bucket!r}"
        code = _code(exc)
        if code in _NOT_FOUND_CODES:
            return ObjectNotFound(f"{op} {where}: no such object (bucket {self.bucket!r}, key {key!r})")
        if code == "NoSuchBucket":
            return ObjectNotFound(f"{op} {where}: bucket {self.bucket!r} does not exist at {self.endpoint}")
        if isinstance(exc, botocore.exceptions.ClientError):
            err = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
            detail = f"{code or 'error'} (HTTP {status}): {err.get('Message', '')}".rstrip(": ")
        else:
            detail = f"{type(exc).__name__}: {exc}"
        return StorageError(f"{op} {where} at {self.endpoint} failed: {detail}")

    # -- conditional create ---------------------------------------------------------------

    def _conditional_supported(self) -> bool:
        with self._probe_lock:
            if self._conditional is None:
                self._conditional = self._probe_conditional_put()
            return self._conditional

    def _probe_conditional_put(self) -> bool:
        """Write a probe key twice, the second time with If-None-Match; trust only a refusal."""
        probe = self._key(f".layervault-probe-{uuid.uuid4().hex}")
        try:
            self._client.put_object(Bucket=self.bucket, Key=probe, Body=b"1")
            try:
                self._client.put_object(Bucket=self.bucket, Key=probe, Body=b"2", IfNoneMatch="*")
                return False  # accepted a second create: the header is ignored
            except botocore.exceptions.ClientError as exc:
                if _code(exc) in ("PreconditionFailed", "ConditionalRequestConflict"):
                    return True
                if _code(exc) in ("NotImplemented", "InvalidArgument", "InvalidRequest", "501", "400"):
                    return False
                raise
            finally:
                self._client.delete_object(Bucket=self.bucket, Key=probe)
        except _S3Error as exc:
            raise self._error("probe of If-None-Match on", probe, exc) from exc

    def put_if_absent(self, key: str, data: bytes | memoryview) -> bool:
        full = self._key(key)
        if not self._conditional_supported():
            # Fallback for servers without If-None-Match: check, then write. Not atomic.
            if self.exists(key):
                self.stats.add(puts=1)
                return False
            self.put(key, data)
            return True
        for attempt in range(_CONFLICT_RETRIES):
            try:
                self._client.put_object(Bucket=self.bucket, Key=full, Body=bytes(data), IfNoneMatch="*")
                break
            except _S3Error as exc:
                code = _code(exc)
                if code == "PreconditionFailed":
                    self.stats.add(puts=1)
                    return False
                if code == "ConditionalRequestConflict" and attempt < _CONFLICT_RETRIES - 1:
                    # Another create of this key is in flight; its outcome decides ours.
                    time.sleep(0.05 * 2**attempt)
                    continue
                if code == "ConditionalRequestConflict":
                    self.stats.add(puts=1)
                    return False
                raise self._error("put_if_absent", full, exc) from exc
        self.stats.add(puts=1, put_bytes=len(data))
        return True

    # -- ObjectStore --------------------------------------------------------------------

    def put(self, key: str, data: bytes | memoryview) -> None:
        full = self._key(key)
        try:
            if len(data) > MULTIPART_THRESHOLD:
                # Concurrent part uploads; BytesIO over bytes shares the buffer, no copy.
                with boto3.s3.transfer.create_transfer_manager(self._client, self._transfer) as transfer:
                    transfer.upload(io.BytesIO(data), self.bucket, full).result()
            else:
                # botocore refuses a memoryview body; bytes() of a bytes object is no copy.
                self._client.put_object(Bucket=self.bucket, Key=full, Body=bytes(data))
        except _S3Error as exc:
            raise self._error("put", full, exc) from exc
        self.stats.add(puts=1, put_bytes=len(data))

    def get(self, key: str, byte_range: ByteRange | None = None) -> bytes:
        full = self._key(key)
        try:
            if byte_range is not None and byte_range.length == 0:
                # HTTP cannot ask for zero bytes; still fail like any get if the object is missing.
                self._client.head_object(Bucket=self.bucket, Key=full)
                data = b""
            elif byte_range is None:
                data = self._client.get_object(Bucket=self.bucket, Key=full)["Body"].read()
            else:
                data = self._get_range(full, byte_range)
        except _S3Error as exc:
            raise self._error("get", full, exc) from exc
        self.stats.add(gets=1, get_bytes=len(data))
        return data

    def _get_range(self, full: str, byte_range: ByteRange) -> bytes:
        try:
            resp = self._client.get_object(
                Bucket=self.bucket, Key=full, Range=f"bytes={byte_range.start}-{byte_range.stop - 1}"
            )
        except botocore.exceptions.ClientError as exc:
            if _code(exc) == "InvalidRange":
                return b""  # the range starts at or past the end: cut like a slice
            raise
        data: bytes = resp["Body"].read()
        if "ContentRange" not in resp:
            # The server ignored Range and sent the whole object.
            data = data[byte_range.start : byte_range.stop]
        return data

    def exists(self, key: str) -> bool:
        """True if the object exists. (A HEAD cannot tell a missing bucket from a missing key.)"""
        full = self._key(key)
        try:
            self._client.head_object(Bucket=self.bucket, Key=full)
        except _S3Error as exc:
            if _code(exc) in _NOT_FOUND_CODES:
                return False
            raise self._error("exists", full, exc) from exc
        return True

    def list(self, prefix: str) -> Iterator[str]:
        """Keys starting with ``prefix``, sorted; all pages are fetched before this returns.

        Sorted here because not every server lists in byte order: SeaweedFS walks its
        folders depth-first and returns ``a/b`` before ``a-b``.
        """
        if "\x00" in prefix or prefix.startswith("/"):
            raise ValueError(f"invalid list prefix {prefix!r}")
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        self.stats.add(lists=1)
        found: list[str] = []
        try:
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                found.extend(obj["Key"][strip:] for obj in page.get("Contents", ()))
        except _S3Error as exc:
            raise self._error("list", full + "*", exc) from exc
        return iter(sorted(found))

    def delete(self, keys: Sequence[str]) -> None:
        fulls = [self._key(key) for key in keys]
        for start in range(0, len(fulls), _DELETE_BATCH):
            batch = fulls[start : start + _DELETE_BATCH]
            try:
                resp = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
                )
            except _S3Error as exc:
                raise self._error(f"delete ({len(batch)} keys)", batch[0], exc) from exc
            self.stats.add(deletes=len(batch))
            errors = [e for e in resp.get("Errors", ()) if e.get("Code") != "NoSuchKey"]
            if errors:
                shown = ", ".join(f"{e.get('Key')}: {e.get('Code')} {e.get('Message', '')}".strip() for e in errors[:5])
                raise StorageError(
                    f"delete in s3://{self.bucket} at {self.endpoint}: {len(errors)} of {len(batch)} keys failed: {shown}"
                )

    def check(self) -> None:
        """Prove the bucket exists and the credentials may list, write, read and delete."""
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except _S3Error as exc:
            code = _code(exc)
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise StorageError(
                    f"check of {self.url}: bucket {self.bucket!r} does not exist at {self.endpoint} "
                    "(create it, or fix the bucket in the URL)"
                ) from exc
            if code in ("403", "AccessDenied"):
                raise StorageError(
                    f"check of {self.url}: access to bucket {self.bucket!r} at {self.endpoint} is denied "
                    "(check AWS_ACCESS_KEY_ID / AWS_PROFILE and the bucket policy)"
                ) from exc
            raise StorageError(f"check of {self.url}: {self._error('HeadBucket', None, exc)}") from exc
        try:
            self._client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
        except _S3Error as exc:
            raise StorageError(f"check of {self.url}: {self._error('ListObjectsV2 in', None, exc)}") from exc
        try:
            super().check()  # put, get and delete of a probe key below the prefix
        except StorageError as exc:
            raise StorageError(f"check of {self.url} (prefix {self.prefix!r}): {exc}") from exc

    def create_bucket(self) -> None:
        """Create the bucket if it does not exist (tests and the demo; operators make their own)."""
        region = self._client.meta.region_name
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if region and region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self._client.create_bucket(**kwargs)
        except _S3Error as exc:
            if _code(exc) in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                return
            raise self._error("create_bucket", None, exc) from exc

    def close(self) -> None:
        self._client.close()
