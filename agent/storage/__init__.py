"""Object storage backends behind one small interface (see :mod:`.base`).

``open_store(url)`` is the one entry point the agent, the coordinator and the CLI use:
``file:///abs/path`` (or a plain absolute path) opens :class:`LocalStore`,
``s3://bucket/prefix`` opens :class:`S3Store`. boto3 is imported only when an S3 store is
opened, so the local default starts fast.
"""

from __future__ import annotations

import urllib.parse
from typing import TYPE_CHECKING, Any

from layervault.agent.storage.base import ByteRange, ObjectInfo, ObjectNotFound, ObjectStore, StorageError, StoreStats
from layervault.agent.storage.local import LocalStore

if TYPE_CHECKING:
    from layervault.agent.storage.s3 import S3Store

__all__ = [
    "ByteRange",
    "LocalStore",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectStore",
    "S3Store",
    "StorageError",
    "StoreStats",
    "open_store",
]


def __getattr__(name: str) -> Any:
    if name == "S3Store":  # lazily: importing boto3 costs a few hundred milliseconds
        from layervault.agent.storage.s3 import S3Store

        return S3Store
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_store(url: str, **kwargs: Any) -> ObjectStore:
    """Open the store a URL names; ``kwargs`` go to the backend's constructor.

    Raises ValueError, naming the accepted forms, for anything else.
    """
    forms = "expected s3://bucket[/prefix], file:///absolute/path or an absolute path"
    if not isinstance(url, str) or not url:
        raise ValueError(f"empty storage URL: {forms}")
    if url.startswith("/"):
        return LocalStore(url, **kwargs)
    parsed = urllib.parse.urlsplit(url)
    if parsed.query or parsed.fragment:
        raise ValueError(f"storage URL {url!r} may not have a query or fragment: {forms}")
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
            raise ValueError(f"file URL {url!r} must name an absolute path, as file:///absolute/path")
        return LocalStore(urllib.parse.unquote(parsed.path), **kwargs)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"s3 URL {url!r} has no bucket: {forms}")
        from layervault.agent.storage.s3 import S3Store

        return S3Store(parsed.netloc, urllib.parse.unquote(parsed.path).strip("/"), **kwargs)
    raise ValueError(f"unsupported storage URL {url!r}: {forms}")
