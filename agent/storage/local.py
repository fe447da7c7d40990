"""``file:///path``: the embedded default store, a folder on a local (or shared) filesystem.

Writes go to a temporary file that is fsynced and renamed into place, so a reader never
sees a partial object; ``put_if_absent`` links the temporary file to its final name, which
fails atomically when the name exists (a real create-only write).
"""

from __future__ import annotations

import os
import pathlib
import uuid
from typing import Iterator

from layervault.agent.storage.base import ByteRange, ObjectNotFound, ObjectStore, StorageError

_TMP = ".tmp-"


class LocalStore(ObjectStore):
    supports_conditional_put = True

    def __init__(self, root: str | os.PathLike[str]) -> None:
        super().__init__()
        self.root = pathlib.Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return self.root.as_uri()

    def _path(self, key: str) -> pathlib.Path:
        parts = key.split("/")
        if not key or key.startswith("/") or "\\" in key or "\x00" in key or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"invalid object key {key!r}")
        return self.root.joinpath(*parts)

    def _write_temp(self, path: pathlib.Path, data: bytes | memoryview) -> pathlib.Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f"{_TMP}{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def _sync_dir(self, path: pathlib.Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def put(self, key: str, data: bytes | memoryview) -> None:
        path = self._path(key)
        try:
            tmp = self._write_temp(path, data)
            os.replace(tmp, path)
            self._sync_dir(path.parent)
        except OSError as exc:
            raise StorageError(f"{self.url}: cannot write {key}: {exc}") from exc
        self.stats.add(puts=1, put_bytes=len(data))

    def put_if_absent(self, key: str, data: bytes | memoryview) -> bool:
        path = self._path(key)
        try:
            tmp = self._write_temp(path, data)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            finally:
                tmp.unlink(missing_ok=True)
            self._sync_dir(path.parent)
        except OSError as exc:
            raise StorageError(f"{self.url}: cannot create {key}: {exc}") from exc
        self.stats.add(puts=1, put_bytes=len(data))
        return True

    def get(self, key: str, byte_range: ByteRange | None = None) -> bytes:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                if byte_range is None:
                    data = f.read()
                else:
                    f.seek(byte_range.start)
                    data = f.read(byte_range.length)
        except FileNotFoundError as exc:
            raise ObjectNotFound(f"{self.url}: no object {key}") from exc
        except OSError as exc:
            raise StorageError(f"{self.url}: cannot read {key}: {exc}") from exc
        self.stats.add(gets=1, get_bytes=len(data))
        return data

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> Iterator[str]:
        self.stats.add(lists=1)
        # Walk only the deepest folder the prefix names completely.
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self.root.joinpath(*folder.split("/")) if folder else self.root
        if not start.is_dir():
            return iter(())
        found = []
        try:
            for dirpath, _, filenames in os.walk(start):
                rel = os.path.relpath(dirpath, self.root)
                for name in filenames:
                    if name.startswith(_TMP):
                        continue
                    key = name if rel == "." else f"{rel.replace(os.sep, '/')}/{name}"
                    if key.startswith(prefix):
                        found.append(key)
        except OSError as exc:
            raise StorageError(f"{self.url}: cannot list {prefix!r}: {exc}") from exc
        return iter(sorted(found))

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            path = self._path(key)
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StorageError(f"{self.url}: cannot delete {key}: {exc}") from exc
            self.stats.add(deletes=1)
            parent = path.parent
            while parent != self.root:
                try:
                    parent.rmdir()
                except OSError:
                    break
                parent = parent.parent
