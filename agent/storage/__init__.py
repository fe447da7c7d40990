"""Object storage backends behind one small interface (see :mod:`.base`)."""

from __future__ import annotations

import urllib.parse

from layervault.agent.storage.base import ByteRange, ObjectNotFound, ObjectStore, StorageError, StoreStats

__all__ = ["ByteRange", "ObjectNotFound", "ObjectStore", "StorageError", "StoreStats", "open_store"]


def open_store(url: str, **kwargs: object) -> ObjectStore:
    """``file:///abs/path`` (or a plain absolute path) or ``s3://bucket/prefix``."""
    if url.startswith("/"):
        url = "file://" + url
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        from layervault.agent.storage.local import LocalStore

        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"file URL {url!r} must be file:///absolute/path")
        return LocalStore(urllib.parse.unquote(parsed.path), **kwargs)  # type: ignore[arg-type]
    if parsed.scheme == "s3":
        from layervault.agent.storage.s3 import S3Store

        if not parsed.netloc:
            raise ValueError(f"s3 URL {url!r} has no bucket; expected s3://bucket/prefix")
        return S3Store(parsed.netloc, parsed.path.strip("/"), **kwargs)  # type: ignore[arg-type]
    raise ValueError(f"unsupported storage URL {url!r}: use s3://bucket/prefix or file:///path")
