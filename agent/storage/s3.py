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

Retries: botocore's own are off; every request goes through one :class:`RetryPolicy`
(:mod:`.retry`; defaults from ``LAYERVAULT_S3_RETRY_*``), and only idempotent requests are
retried: GET, HEAD, LIST, DELETE, and PUTs whose second copy would write the same bytes
(chunk keys are unique per save attempt; ``latest`` and an overwriting manifest are
last-writer-wins). A request that keeps failing ends in a StorageError saying how many
attempts over how long. Timeouts: ``LAYERVAULT_S3_CONNECT_TIMEOUT`` (5 s) and
``LAYERVAULT_S3_READ_TIMEOUT`` (30 s) unless given to the constructor.

The create-only ``put_if_absent`` is the one non-idempotent write. After a transient
failure nobody knows whether the server applied it, so it is sent again, and a 412 on
that second try is settled by reading the object back: it is ours (True) only if its bytes
equal the ones we sent. Manifests carry their save attempt id and commit time, so another
writer's manifest never has our bytes.

Objects above ``MULTIPART_THRESHOLD`` go up in parts, each part retried on its own; a
failed upload is aborted, so its parts do not linger invisible to LIST. An upload that an
agent crash leaves open is found by :meth:`S3Store.incomplete_uploads` when the attempt
is cleaned up (:mod:`layervault.agent.attempt_cleanup`).

Conditional create: ``put_if_absent`` sends ``PutObject`` with ``If-None-Match: *``
(AWS since 2024, MinIO, SeaweedFS 4.x answer 412 when the key exists). A server that does
not implement the header either refuses it or, worse, ignores it and overwrites. On first
use the store therefore probes: it writes a probe key, writes it again with the header, and
only trusts the header if the second write is refused. Otherwise it falls back to
HEAD-then-PUT, which is *not* atomic (two writers racing can both "win"), and says so
through ``supports_conditional_put = False``.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import os
import re
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import boto3.exceptions
import botocore.config
import botocore.exceptions
import botocore.loaders
import botocore.session

from layervault.agent import redact
from layervault.agent.checksum import crc32c
from layervault.agent.storage.base import (
    ByteRange,
    IncompleteUpload,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    StorageError,
    check_key,
)
from layervault.agent.storage.retry import RetriesExhausted, RetryPolicy, call_with_retries, is_transient
from layervault.agent.storage.retry import code_of as _code

log = logging.getLogger("layervault.storage")
T = TypeVar("T")

#: Above this size ``put`` uploads in parts (chunks are a few MiB; this is a safety net).
MULTIPART_THRESHOLD = 64 << 20
MIN_PART_SIZE = 5 << 20  # S3's floor for every part but the last
_DELETE_BATCH = 1000  # the most keys one DeleteObjects request may carry
_NOT_FOUND_CODES = {"NoSuchKey", "NotFound", "404"}
#: ``check()`` runs at startup, where a wrong endpoint should fail in seconds, not minutes.
_CHECK_RETRY = RetryPolicy(attempts=3, base_delay=0.2, max_delay=1.0, deadline=10.0)
_BUCKET_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9._-]{1,254}")  # botocore's rule, legacy names included

_S3Error = (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, boto3.exceptions.Boto3Error)

# One model loader for every store of the process: each new session would otherwise parse
# the S3 service model again (~70 ms per store; tests and tools open many stores).
_LOADER = botocore.loaders.create_loader()


def _env_seconds(name: str, default: float) -> float:
    text = os.environ.get(name, "")
    try:
        value = float(text) if text else default
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a number of seconds") from None
    if value <= 0:
        raise ValueError(f"{name} must be > 0 seconds, got {text!r}")
    return value


@dataclasses.dataclass
class _Ambiguity:
    """Whether an earlier try of a non-idempotent request may have been applied."""

    maybe_applied: bool = False

    def note(self, exc: BaseException) -> None:
        # A refused-by-conflict (409) request was not applied; any other transient failure may have been.
        if _code(exc) != "ConditionalRequestConflict":
            self.maybe_applied = True


def _detail(exc: BaseException) -> str:
    """One botocore failure in a line: the S3 error code, HTTP status and message, or the exception."""
    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
        return f"{_code(exc) or 'error'} (HTTP {status}): {err.get('Message', '')}".rstrip(": ")
    return f"{type(exc).__name__}: {exc}"


#: The S3 operation behind each step of :meth:`S3Store.check`, for its messages.
_CHECK_OPERATIONS = {"list": "ListObjectsV2", "put": "PutObject", "get": "GetObject", "delete": "DeleteObjects"}


class S3Store(ObjectStore):
    """Objects below ``prefix`` in ``bucket``; key ``a/b`` is the S3 key ``prefix/a/b``.

    ``conditional_put``: ``None`` probes the server on first use (see the module
    docstring); ``True``/``False`` skip the probe when the server is known. ``retry``:
    the policy for every request (default :meth:`RetryPolicy.from_env`).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region_name: str | None = None,
        max_pool_connections: int = 32,
        connect_timeout: float | None = None,
        read_timeout: float | None = None,
        retry: RetryPolicy | None = None,
        conditional_put: bool | None = None,
        multipart_part_size: int = 16 << 20,
    ) -> None:
        super().__init__()
        if not _BUCKET_RE.fullmatch(bucket):
            raise ValueError(f"invalid S3 bucket name {bucket!r}")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            check_key(self.prefix)
        if multipart_part_size < MIN_PART_SIZE:
            raise ValueError(f"multipart part size {multipart_part_size} is below S3's minimum of {MIN_PART_SIZE} bytes")
        self.retry = retry or RetryPolicy.from_env()
        self.part_size = multipart_part_size
        self._part_workers = max(1, min(10, max_pool_connections))
        config = botocore.config.Config(
            max_pool_connections=max_pool_connections,
            connect_timeout=connect_timeout or _env_seconds("LAYERVAULT_S3_CONNECT_TIMEOUT", 5.0),
            read_timeout=read_timeout or _env_seconds("LAYERVAULT_S3_READ_TIMEOUT", 30.0),
            # Exactly one retry policy, ours: botocore sends each request once.
            retries={"mode": "standard", "total_max_attempts": 1},  # ("max_attempts" would count retries only)
            # No SHA-256 of every body for SigV4 (UNSIGNED-PAYLOAD), as botocore already does on
            # https: it cost ~13% of the agent's upload CPU. Every PUT body carries its CRC32C
            # (``put``), which the server checks, and every chunk its CRC32C in the manifest,
            # checked on restore; so the CRC32 of each GET body is not checked twice (when_required).
            s3={"addressing_style": "path", "payload_signing_enabled": False},
            response_checksum_validation="when_required",
            tcp_keepalive=True,
        )
        # A fresh session per store, so the environment and credentials are read now (a
        # shared session would cache the first ones it saw), with the shared model loader.
        session = botocore.session.get_session()
        session.register_component("data_loader", _LOADER)
        self._client: Any = session.create_client("s3", region_name=region_name, endpoint_url=endpoint_url,
                                                  config=config)
        credentials = session.get_credentials()
        if credentials is not None:  # masked in every log record and status message from now on
            frozen = credentials.get_frozen_credentials()
            redact.register((frozen.access_key, frozen.secret_key, frozen.token))
        self.endpoint = str(self._client.meta.endpoint_url)
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
        """One botocore failure as a StorageError naming operation, bucket, key, endpoint
        (and, after retries, how many attempts were made over how long)."""
        tries = ""
        if isinstance(exc, RetriesExhausted):
            tries, exc = f"{exc.summary()}; last error: ", exc.last
        where = f"s3://{self.bucket}/{key}" if key is not None else f"bucket {self.bucket!r}"
        code = _code(exc)
        if code in _NOT_FOUND_CODES:
            return ObjectNotFound(f"{op} {where}: no such object (bucket {self.bucket!r}, key {key!r})")
        if code == "NoSuchBucket":
            return ObjectNotFound(f"{op} {where}: bucket {self.bucket!r} does not exist at {self.endpoint}")
        return StorageError(f"{op} {where} at {self.endpoint} failed: {tries}{_detail(exc)}")

    def _count_retry(self, exc: BaseException) -> None:
        self.stats.add(retries=1)
        log.debug("retrying after a transient S3 failure: %s", exc)

    def _run(self, op: str, key: str | None, fn: Callable[[], T], *,
             retryable: Callable[[BaseException], bool] = is_transient,
             on_retry: Callable[[BaseException], None] | None = None) -> T:
        """Call ``fn`` (one idempotent request) under the retry policy; failures become StorageError."""

        def note(exc: BaseException) -> None:
            self._count_retry(exc)
            if on_retry is not None:
                on_retry(exc)

        try:
            return call_with_retries(fn, self.retry, retryable=retryable, on_retry=note)
        except (RetriesExhausted, *_S3Error) as exc:
            raise self._error(op, key, exc) from (exc.last if isinstance(exc, RetriesExhausted) else exc)

    # -- conditional create ---------------------------------------------------------------

    def _conditional_supported(self) -> bool:
        with self._probe_lock:
            if self._conditional is None:
                self._conditional = self._probe_conditional_put()
            return self._conditional

    def _probe_conditional_put(self) -> bool:
        """Write a probe key twice, the second time with If-None-Match; trust only a refusal.

        Retrying the second write is safe: a server that ignores the header accepts it
        again (False either way), one that honours it refuses the retry too.
        """
        probe = self._key(f".layervault-probe-{uuid.uuid4().hex}")
        op = "probe of If-None-Match on"

        def second_create() -> bool:
            try:
                self._client.put_object(Bucket=self.bucket, Key=probe, Body=b"2", IfNoneMatch="*")
                return False  # accepted a second create: the header is ignored
            except botocore.exceptions.ClientError as exc:
                if _code(exc) in ("PreconditionFailed", "ConditionalRequestConflict"):
                    return True
                if _code(exc) in ("NotImplemented", "InvalidArgument", "InvalidRequest", "501", "400"):
                    return False
                raise

        self._run(op, probe, lambda: self._client.put_object(Bucket=self.bucket, Key=probe, Body=b"1"))
        try:
            return self._run(op, probe, second_create)
        finally:
            self._run(f"delete after {op}", probe, lambda: self._client.delete_object(Bucket=self.bucket, Key=probe))

    def put_if_absent(self, key: str, data: bytes | memoryview) -> bool:
        full = self._key(key)
        if not self._conditional_supported():
            # Fallback for servers without If-None-Match: check, then write. Not atomic.
            if self.exists(key):
                self.stats.add(puts=1)
                return False
            self.put(key, data)
            return True
        body = bytes(data)
        ambiguity = _Ambiguity()

        def create() -> bool:
            try:
                self._client.put_object(Bucket=self.bucket, Key=full, Body=body, IfNoneMatch="*")
                return True
            except botocore.exceptions.ClientError as exc:
                if _code(exc) != "PreconditionFailed":
                    raise
            if not ambiguity.maybe_applied:
                return False
            # An earlier try failed in a way that may have created the object: whose is it?
            self.stats.add(gets=1)
            return self._client.get_object(Bucket=self.bucket, Key=full)["Body"].read() == body

        def retryable(exc: BaseException) -> bool:
            # 409: another create of this key is in flight; its outcome decides ours.
            return is_transient(exc) or _code(exc) == "ConditionalRequestConflict"

        created = self._run("put_if_absent", full, create, retryable=retryable, on_retry=ambiguity.note)
        self.stats.add(puts=1, put_bytes=len(data) if created else 0)
        return created

    # -- ObjectStore --------------------------------------------------------------------

    def put(self, key: str, data: bytes | memoryview) -> None:
        full = self._key(key)
        if len(data) > MULTIPART_THRESHOLD:
            self._put_multipart(full, memoryview(data))
        else:
            # botocore refuses a memoryview body; bytes() of a bytes object is no copy.
            body = bytes(data)
            # Our hardware CRC32C instead of botocore's own CRC32 in Python's zlib (9% of the
            # agent's upload CPU): the server still refuses a body that does not match it.
            checksum = base64.b64encode(crc32c(body).to_bytes(4, "big")).decode()
            self._run("put", full, lambda: self._client.put_object(Bucket=self.bucket, Key=full, Body=body,
                                                                   ChecksumCRC32C=checksum))
        self.stats.add(puts=1, put_bytes=len(data))

    def _put_multipart(self, full: str, data: memoryview) -> None:
        """Upload in parts of ``part_size``, concurrently; each part is retried on its own,
        and a failed upload is aborted so none of its parts stay behind."""
        upload_id: str = self._run("create multipart upload of", full, lambda: self._client.create_multipart_upload(
            Bucket=self.bucket, Key=full)["UploadId"])
        spans = [(number, start, min(start + self.part_size, len(data)))
                 for number, start in enumerate(range(0, len(data), self.part_size), start=1)]

        def put_part(span: tuple[int, int, int]) -> dict[str, Any]:
            number, start, stop = span
            body = bytes(data[start:stop])
            etag = self._run(f"put part {number} of {len(spans)} of", full, lambda: self._client.upload_part(
                Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=number, Body=body)["ETag"])
            return {"PartNumber": number, "ETag": etag}

        pool = ThreadPoolExecutor(min(self._part_workers, len(spans)), thread_name_prefix="lv-s3-part")
        try:
            parts = list(pool.map(put_part, spans))
            pool.shutdown()
            self._complete_multipart(full, upload_id, parts, len(data))
        except BaseException:
            pool.shutdown(cancel_futures=True)
            try:
                self.abort_uploads([IncompleteUpload(self._relative(full), upload_id)])
            except StorageError as exc:
                log.warning("%s; the attempt's cleanup will abort it later", exc)
            raise

    def _complete_multipart(self, full: str, upload_id: str, parts: list[dict[str, Any]], size: int) -> None:
        ambiguity = _Ambiguity()

        def complete() -> None:
            try:
                self._client.complete_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id,
                                                       MultipartUpload={"Parts": parts})
            except botocore.exceptions.ClientError as exc:
                # A lost reply to a completion that went through: the upload is gone, the object is there.
                if not (ambiguity.maybe_applied and _code(exc) == "NoSuchUpload"):
                    raise
                if self._client.head_object(Bucket=self.bucket, Key=full)["ContentLength"] != size:
                    raise

        self._run("complete multipart upload of", full, complete, on_retry=ambiguity.note)

    def _relative(self, full: str) -> str:
        return full[len(self.prefix) + 1:] if self.prefix else full

    def get(self, key: str, byte_range: ByteRange | None = None) -> bytes:
        full = self._key(key)

        def fetch() -> bytes:  # the body is read inside, so a reset mid-body is retried too
            if byte_range is not None and byte_range.length == 0:
                # HTTP cannot ask for zero bytes; still fail like any get if the object is missing.
                self._client.head_object(Bucket=self.bucket, Key=full)
                return b""
            if byte_range is None:
                body: bytes = self._client.get_object(Bucket=self.bucket, Key=full)["Body"].read()
                return body
            return self._get_range(full, byte_range)

        data = self._run("get", full, fetch)
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

        def head() -> bool:
            try:
                self._client.head_object(Bucket=self.bucket, Key=full)
            except botocore.exceptions.ClientError as exc:
                if _code(exc) in _NOT_FOUND_CODES:
                    return False
                raise
            return True

        return self._run("exists", full, head)

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
        found = [obj["Key"][strip:] for page in self._list_pages(full) for obj in page.get("Contents", ())]
        return iter(sorted(found))

    def _list_pages(self, full: str) -> Iterator[dict[str, Any]]:
        """ListObjectsV2 pages of the S3 prefix ``full``, each page retried on its own (a
        retry repeats one page, not the whole listing); a failure raises, never ends early."""
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full}
            if token:
                kwargs["ContinuationToken"] = token
            page: dict[str, Any] = self._run("list", full + "*", lambda: self._client.list_objects_v2(**kwargs))
            yield page
            token = page.get("NextContinuationToken") if page.get("IsTruncated") else None
            if not token:
                return

    def list_info(self, prefix: str) -> Iterator[ObjectInfo]:
        """Like :meth:`list`, with size and LastModified (the server's clock) of each object."""
        if "\x00" in prefix or prefix.startswith("/"):
            raise ValueError(f"invalid list prefix {prefix!r}")
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        self.stats.add(lists=1)
        found = [ObjectInfo(obj["Key"][strip:], int(obj["Size"]), obj["LastModified"].timestamp())
                 for page in self._list_pages(full) for obj in page.get("Contents", ())]
        return iter(sorted(found, key=lambda info: info.key))

    def delete(self, keys: Sequence[str]) -> None:
        fulls = [self._key(key) for key in keys]
        for start in range(0, len(fulls), _DELETE_BATCH):
            batch = fulls[start : start + _DELETE_BATCH]
            request = {"Objects": [{"Key": k} for k in batch], "Quiet": True}
            resp = self._run(f"delete ({len(batch)} keys)", batch[0],
                             lambda: self._client.delete_objects(Bucket=self.bucket, Delete=request))
            self.stats.add(deletes=len(batch))
            errors = [e for e in resp.get("Errors", ()) if e.get("Code") != "NoSuchKey"]
            if errors:
                shown = ", ".join(f"{e.get('Key')}: {e.get('Code')} {e.get('Message', '')}".strip() for e in errors[:5])
                raise StorageError(
                    f"delete in s3://{self.bucket} at {self.endpoint}: {len(errors)} of {len(batch)} keys failed: {shown}"
                )

    def incomplete_uploads(self, prefix: str) -> list[IncompleteUpload]:
        """Multipart uploads open below ``prefix``, all pages fetched; an error is never "none"."""
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        found: list[IncompleteUpload] = []
        markers: dict[str, str] = {}
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full, **markers}
            page = self._run("list multipart uploads in", full + "*", lambda: self._client.list_multipart_uploads(**kwargs))
            found.extend(IncompleteUpload(self._relative(u["Key"]), u["UploadId"]) for u in page.get("Uploads", ()))
            if not page.get("IsTruncated"):
                return found
            markers = {"KeyMarker": page.get("NextKeyMarker", ""), "UploadIdMarker": page.get("NextUploadIdMarker", "")}

    def abort_uploads(self, uploads: list[IncompleteUpload]) -> None:
        for upload in uploads:
            full = self._key(upload.key)

            def abort(upload_id: str = upload.upload_id) -> None:
                try:
                    self._client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
                except botocore.exceptions.ClientError as exc:
                    if _code(exc) not in ("NoSuchUpload", "404"):
                        raise

            self._run(f"abort multipart upload {upload.upload_id} of", full, abort)

    def check(self) -> None:
        """Prove the bucket exists and the credentials may list, write, read and delete.

        A failure names the S3 operation that failed (HeadBucket, ListObjectsV2, PutObject,
        GetObject, DeleteObjects), the bucket, the prefix and the endpoint. The first request
        is tried only a few times within seconds: an agent started against a wrong endpoint
        should say so at once, not after the full retry deadline.
        """
        try:
            call_with_retries(lambda: self._client.head_bucket(Bucket=self.bucket), _CHECK_RETRY,
                              on_retry=self._count_retry)
        except (RetriesExhausted, *_S3Error) as exc:
            last = exc.last if isinstance(exc, RetriesExhausted) else exc
            code = _code(last)
            if code in ("404", "NoSuchBucket", "NotFound"):
                why = "the bucket does not exist (create it, or fix the bucket in the URL)"
            elif code in ("403", "AccessDenied"):
                why = "access denied (check AWS_ACCESS_KEY_ID / AWS_PROFILE and the bucket policy)"
            else:
                why = (f"{exc.summary()}; last error: " if isinstance(exc, RetriesExhausted) else "") + _detail(last)
            raise StorageError(self._check_failed("HeadBucket", why)) from last
        self._check_step("list", lambda: self._run(
            "ListObjectsV2 in", None, lambda: self._client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)))
        super().check()  # put, get and delete of a probe object below the prefix

    def _check_failed(self, op: str, why: str, key: str | None = None) -> str:
        what = f"of {key!r} " if key else ""
        return (f"check of {self.url}: {op} {what}in bucket {self.bucket!r} (prefix {self.prefix!r}) "
                f"at {self.endpoint} failed: {why}")

    def _check_step(self, step: str, run: Callable[[], object], key: str | None = None) -> None:
        """Run one step of :meth:`check`; a failure names its S3 operation, bucket and prefix."""
        op = _CHECK_OPERATIONS[step]
        try:
            run()
        except StorageError as exc:
            cause = exc.__cause__
            why = _detail(cause) if isinstance(cause, _S3Error) else str(exc)
            if isinstance(cause, botocore.exceptions.ClientError) and _code(cause) in ("403", "AccessDenied"):
                why += " (check AWS_ACCESS_KEY_ID / AWS_PROFILE and the bucket policy)"
            raise StorageError(self._check_failed(op, why, key)) from exc

    def create_bucket(self) -> None:
        """Create the bucket if it does not exist (tests and the demo; operators make their own)."""
        region = self._client.meta.region_name
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if region and region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        def create() -> None:
            try:
                self._client.create_bucket(**kwargs)
            except botocore.exceptions.ClientError as exc:
                if _code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

        self._run("create_bucket", None, create)

    def close(self) -> None:
        self._client.close()
