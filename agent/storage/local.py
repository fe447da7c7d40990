"""``file:///path``: the embedded default store, a folder on a local (or shared) filesystem.

Every write goes to a temporary file in the object's own folder, is fsynced, and only then
gets its final name, so a reader never sees a partial object and a crash leaves either the
old object or the new one. ``put`` renames (``os.replace``, last writer wins);
``put_if_absent`` hard-links the temporary file to the final name, which the kernel refuses
atomically when the name exists: a real create-only write, the property the commit of a
manifest relies on. The folder is fsynced after each name change so the name survives a
power loss too.

Temporary files are named ``.tmp-<uuid>``; :meth:`LocalStore.list` skips them and keys may
not use that form. Folders that a delete leaves empty are removed, so the tree mirrors
the live keys, as ``aws s3 ls`` would show them.
"""

from __future__ import annotations

import errno
import os
import pathlib
import uuid
from collections.abc import Iterator, Sequence

from layervault.agent.storage.base import ByteRange, ObjectInfo, ObjectNotFound, ObjectStore, StorageError, check_key

_TMP = ".tmp-"
_MAKE_TEMP_TRIES = 5
_COLLISION = "one key names an object and another a folder of keys ('a' and 'a/b'), which a folder cannot hold"


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStore(ObjectStore):
    """Objects as files below ``root``; key ``a/b/c`` is the file ``root/a/b/c``.

    Thread-safe and safe across processes sharing the folder: every name change is one
    atomic system call. A key cannot name both an object and a "folder" of other keys
    (``a`` and ``a/b``), which S3 allows; such a write fails with :class:`StorageError`.
    """

    supports_conditional_put = True

    def __init__(self, root: str | os.PathLike[str]) -> None:
        super().__init__()
        path = pathlib.Path(root)
        if not path.is_absolute():
            raise ValueError(f"local store root {str(root)!r} must be an absolute path")
        self.root = path.resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"{self.root.as_uri()}: cannot create the store folder: {exc}") from exc

    @property
    def url(self) -> str:
        return self.root.as_uri()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    # -- keys and files ---------------------------------------------------------------

    def _path(self, key: str) -> pathlib.Path:
        parts = check_key(key).split("/")
        if any(part.startswith(_TMP) for part in parts):
            raise ValueError(f"invalid object key {key!r}: {_TMP}* names are the store's temporary files")
        return self.root.joinpath(*parts)

    def _make_parents(self, path: pathlib.Path) -> None:
        """Create the missing folders above ``path``, fsyncing each new folder's parent."""
        missing = []
        folder = path.parent
        while folder != self.root and not folder.is_dir():
            missing.append(folder)
            folder = folder.parent
        for folder in reversed(missing):
            try:
                os.mkdir(folder)
            except FileExistsError:
                continue  # a concurrent put made it (or a file is in the way: the open below says so)
            _fsync_dir(folder.parent)

    def _write_temp(self, path: pathlib.Path, data: bytes | memoryview) -> pathlib.Path:
        """Write ``data`` durably to a fresh temporary file beside ``path``."""
        for attempt in range(_MAKE_TEMP_TRIES):
            tmp = path.parent / f"{_TMP}{uuid.uuid4().hex}"
            try:
                self._make_parents(path)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileNotFoundError:
                # A concurrent delete removed a folder it had just emptied (the one the file
                # goes in, or one above a folder being made): make them again.
                if attempt == _MAKE_TEMP_TRIES - 1:
                    raise
                continue
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            return tmp
        raise AssertionError("unreachable")

    # -- ObjectStore --------------------------------------------------------------------

    def put(self, key: str, data: bytes | memoryview) -> None:
        path = self._path(key)
        try:
            tmp = self._write_temp(path, data)
            try:
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            _fsync_dir(path.parent)
        except (IsADirectoryError, NotADirectoryError) as exc:
            raise StorageError(f"put {self.url}/{key}: {_COLLISION}") from exc
        except OSError as exc:
            raise StorageError(f"put {self.url}/{key}: {exc}") from exc
        self.stats.add(puts=1, put_bytes=len(data))

    def put_if_absent(self, key: str, data: bytes | memoryview) -> bool:
        path = self._path(key)
        try:
            tmp = self._write_temp(path, data)
            try:
                os.link(tmp, path)
            except FileExistsError:
                if path.is_dir():
                    raise IsADirectoryError(errno.EISDIR, "a folder has this name", str(path)) from None
                self.stats.add(puts=1)
                return False
            except OSError as exc:
                if exc.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise StorageError(
                        f"put_if_absent {self.url}/{key}: this filesystem has no hard links, "
                        "which the create-only write needs"
                    ) from exc
                raise
            finally:
                tmp.unlink(missing_ok=True)
            _fsync_dir(path.parent)
        except (IsADirectoryError, NotADirectoryError) as exc:
            raise StorageError(f"put_if_absent {self.url}/{key}: {_COLLISION}") from exc
        except OSError as exc:
            raise StorageError(f"put_if_absent {self.url}/{key}: {exc}") from exc
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
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise ObjectNotFound(f"get {self.url}/{key}: no such object") from exc
        except OSError as exc:
            raise StorageError(f"get {self.url}/{key}: {exc}") from exc
        self.stats.add(gets=1, get_bytes=len(data))
        return data

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> Iterator[str]:
        """Keys starting with ``prefix``, sorted; the walk is done before this returns."""
        if "\\" in prefix or "\x00" in prefix or prefix.startswith("/"):
            raise ValueError(f"invalid list prefix {prefix!r}")
        folder, _, _ = prefix.rpartition("/")
        if folder:
            check_key(folder)
        self.stats.add(lists=1)
        start = self.root.joinpath(*folder.split("/")) if folder else self.root

        def on_error(exc: OSError) -> None:
            # A folder that vanished under the walk (a concurrent delete emptied it) holds no
            # keys; anything else must not pass for an empty listing.
            if not isinstance(exc, (FileNotFoundError, NotADirectoryError)):
                raise StorageError(f"list {self.url}/{prefix}*: {exc}") from exc

        found: list[str] = []
        for dirpath, dirnames, filenames in os.walk(start, onerror=on_error):
            rel = pathlib.Path(dirpath).relative_to(self.root).as_posix()
            base = "" if rel == "." else rel + "/"
            # Descend only into folders that can hold a matching key.
            dirnames[:] = [d for d in dirnames if (base + d + "/").startswith(prefix) or prefix.startswith(base + d + "/")]
            found.extend(base + name for name in filenames if not name.startswith(_TMP) and (base + name).startswith(prefix))
        return iter(sorted(found))

    def list_info(self, prefix: str) -> Iterator[ObjectInfo]:
        found = []
        for key in self.list(prefix):
            try:
                st = os.stat(self._path(key))
            except FileNotFoundError:
                continue  # deleted since the walk
            found.append(ObjectInfo(key, st.st_size, st.st_mtime))
        return iter(found)

    def delete(self, keys: Sequence[str]) -> None:
        paths = [self._path(key) for key in keys]  # validate all before deleting any
        for key, path in zip(keys, paths):
            try:
                path.unlink()
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                continue
            except OSError as exc:
                if path.is_dir():
                    continue  # a "folder" of other keys, not an object
                raise StorageError(f"delete {self.url}/{key}: {exc}") from exc
            finally:
                self.stats.add(deletes=1)
            folder = path.parent
            while folder != self.root:
                try:
                    folder.rmdir()
                except OSError:
                    break  # not empty (or already gone): stop climbing
                folder = folder.parent
