"""Storage backends: one conformance suite run against every backend, then per-backend cases.

The conformance tests take the ``store`` fixture, which is parametrized over ``file`` and
``s3`` (a real SeaweedFS server), so both backends must behave the same to pass.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from layervault.agent.storage import (
    ByteRange,
    LocalStore,
    ObjectNotFound,
    ObjectStore,
    StorageError,
    open_store,
)
from layervault.agent.storage.retry import RetryPolicy
from layervault.agent.storage.s3 import S3Store

# -- the conformance suite (every backend) --------------------------------------------------


def test_put_get_roundtrip_of_bytes_and_memoryview(store: ObjectStore) -> None:
    store.put("a/b/bytes", b"hello bytes")
    body = bytearray(b"..hello memoryview..")
    store.put("a/b/view", memoryview(body)[2:-2])
    store.put("a/empty", b"")
    assert store.get("a/b/bytes") == b"hello bytes"
    assert store.get("a/b/view") == b"hello memoryview"
    assert store.get("a/empty") == b""


def test_ranged_get(store: ObjectStore) -> None:
    data = bytes(range(256)) * 4
    store.put("ranged", data)
    for start, stop in [(0, 1), (0, 1024), (10, 20), (255, 513), (1000, 1024), (512, 512), (0, 0), (1024, 1024)]:
        assert store.get("ranged", ByteRange(start, stop)) == data[start:stop], (start, stop)
    # A range past the end is cut at the end, like a slice.
    assert store.get("ranged", ByteRange(1000, 5000)) == data[1000:]
    assert store.get("ranged", ByteRange(2000, 3000)) == b""


def test_put_overwrites(store: ObjectStore) -> None:
    store.put("k", b"first")
    store.put("k", b"second, longer")
    store.put("k", b"third")
    assert store.get("k") == b"third"


def test_put_if_absent_creates_once(store: ObjectStore) -> None:
    assert store.put_if_absent("m/manifest.json", b"one") is True
    assert store.put_if_absent("m/manifest.json", b"two") is False
    assert store.get("m/manifest.json") == b"one"
    assert list(store.list("m/")) == ["m/manifest.json"]


def test_put_if_absent_race_has_exactly_one_winner(store: ObjectStore) -> None:
    barrier = threading.Barrier(8)

    def create(i: int) -> bool:
        barrier.wait()
        return store.put_if_absent("race/manifest.json", f"writer {i}".encode())

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(create, range(8)))
    if store.supports_conditional_put:
        assert results.count(True) == 1, results
        assert store.get("race/manifest.json") == f"writer {results.index(True)}".encode()
    else:
        assert results.count(True) >= 1


def test_get_of_missing_key_is_object_not_found(store: ObjectStore) -> None:
    store.put("present", b"1")
    for key in ["absent", "present/below", "nofolder/absent"]:
        with pytest.raises(ObjectNotFound, match=key) as info:
            store.get(key)
        assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, StorageError)
    with pytest.raises(ObjectNotFound):
        store.get("absent", ByteRange(0, 0))
    with pytest.raises(ObjectNotFound):
        store.get("absent", ByteRange(0, 10))


def test_exists(store: ObjectStore) -> None:
    store.put("dir/obj", b"x")
    assert store.exists("dir/obj")
    assert not store.exists("dir/other")
    assert not store.exists("dir")  # a "folder" of keys is not an object
    store.delete(["dir/obj"])
    assert not store.exists("dir/obj")


def test_list_by_string_prefix_sorted_and_nested(store: ObjectStore) -> None:
    keys = ["job/model/2/manifest.json", "job/model/10/manifest.json", "job/model/2/layers/w/0.0",
            "job/model/2/layers/w/0.1", "job/model-latest", "job/optim/2/manifest.json", "joby", "a.b", "a/b", "a-b"]
    for key in keys:
        store.put(key, key.encode())
    assert list(store.list("")) == sorted(keys)
    assert list(store.list("job/model/")) == sorted(k for k in keys if k.startswith("job/model/"))
    assert list(store.list("job/model")) == sorted(k for k in keys if k.startswith("job/model"))
    assert list(store.list("job/model/2/layers/w/0.")) == ["job/model/2/layers/w/0.0", "job/model/2/layers/w/0.1"]
    assert list(store.list("job/model/1")) == ["job/model/10/manifest.json"]
    assert list(store.list("jo")) == sorted(k for k in keys if k.startswith("jo"))
    assert list(store.list("a")) == ["a-b", "a.b", "a/b"]  # byte order, as S3 lists
    assert list(store.list("nothing/here/")) == []
    assert list(store.list("job/model/2/manifest.json/")) == []


def test_keys_with_encoded_and_unicode_characters(store: ObjectStore) -> None:
    keys = ["layers/enc%2Eblock%200.weight/0.0", "layers/\u00e9t\u00e9/0.0", "layers/a b+c=d/0.0"]
    for key in keys:
        store.put(key, key.encode())
    assert list(store.list("layers/")) == sorted(keys)
    for key in keys:
        assert store.get(key) == key.encode()


def test_delete(store: ObjectStore) -> None:
    for key in ["d/1", "d/2", "d/sub/3", "keep"]:
        store.put(key, b"x")
    store.delete(["d/1", "d/sub/3", "d/never-existed", "nope/nope"])
    assert list(store.list("")) == ["d/2", "keep"]
    store.delete(["d/1"])  # again: idempotent
    store.delete([])
    store.delete(["d/2", "keep"])
    assert list(store.list("")) == []
    store.put("d/sub/3", b"back")  # folders emptied by the delete come back on demand
    assert store.get("d/sub/3") == b"back"


def test_stats_count_calls_and_bytes(store: ObjectStore) -> None:
    before = store.stats.snapshot()
    store.put("s/a", b"x" * 100)
    store.get("s/a", ByteRange(10, 30))
    store.get("s/a")
    list(store.list("s/"))
    store.put_if_absent("s/b", b"yy")
    store.put_if_absent("s/b", b"zz")
    store.delete(["s/a", "s/missing"])
    after = store.stats.snapshot()
    delta = {name: after[name] - before[name] for name in after}
    assert delta == {"puts": 3, "put_bytes": 102, "gets": 2, "get_bytes": 120, "deletes": 2, "lists": 1, "retries": 0}


def test_ranged_get_counts_only_the_range(store: ObjectStore) -> None:
    store.put("big", os.urandom(1 << 20))
    before = store.stats.snapshot()
    assert len(store.get("big", ByteRange(4096, 4096 + 1000))) == 1000
    after = store.stats.snapshot()
    assert (after["gets"] - before["gets"], after["get_bytes"] - before["get_bytes"]) == (1, 1000)


def test_check_passes_and_leaves_nothing(store: ObjectStore) -> None:
    store.check()
    assert list(store.list("")) == []


def test_large_object_roundtrip(store: ObjectStore) -> None:
    data = os.urandom(20 << 20)
    store.put("large/blob", data)
    assert store.get("large/blob") == data
    start, stop = (4 << 20) - 10, (8 << 20) + 10  # across the server's internal chunk edges
    assert store.get("large/blob", ByteRange(start, stop)) == data[start:stop]


def test_concurrent_puts_from_8_threads(store: ObjectStore) -> None:
    def work(thread: int) -> None:
        for i in range(16):
            store.put(f"c/{thread}/{i}", f"{thread}:{i}".encode() * 100)
            store.put("c/shared", f"{thread}:{i}".encode())  # everyone overwrites one key

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(8)))
    expected = sorted(f"c/{t}/{i}" for t in range(8) for i in range(16))
    assert list(store.list("c/")) == sorted([*expected, "c/shared"])
    for key in expected:
        thread, i = key.split("/")[1:]
        assert store.get(key) == f"{thread}:{i}".encode() * 100
    assert store.get("c/shared").split(b":")[1] == b"15"


def test_puts_and_deletes_racing_in_one_folder(store: ObjectStore) -> None:
    # A delete removes the folders it empties while another thread writes into them.
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            store.put("churn/deep/a", b"a")
            store.delete(["churn/deep/a"])

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        for i in range(30):
            store.put(f"churn/deep/b{i}", b"b")
    finally:
        stop.set()
        thread.join()
    assert list(store.list("churn/deep/b")) == sorted(f"churn/deep/b{i}" for i in range(30))


@pytest.mark.parametrize("key", ["../x", "/abs", "a//b", "a/../../b", "a/./b", "", "a/", "a\\b", "a\x00b"])
def test_keys_that_could_escape_are_refused(store: ObjectStore, key: str) -> None:
    with pytest.raises(ValueError):
        store.put(key, b"x")
    with pytest.raises(ValueError):
        store.get(key)
    with pytest.raises(ValueError):
        store.delete([key])


# -- local folder ---------------------------------------------------------------------------


def test_local_store_writes_nothing_outside_its_folder(tmp_path) -> None:
    store = LocalStore(tmp_path / "root")
    for key in ["../x", "/abs", "a//b", ".tmp-1234", "a/.tmp-x/b"]:
        with pytest.raises(ValueError):
            store.put(key, b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]
    assert list((tmp_path / "root").iterdir()) == []


def test_local_store_leaves_no_temp_files_and_removes_empty_folders(tmp_path) -> None:
    root = tmp_path / "root"
    store = LocalStore(root)
    store.put("a/b/c", b"1")
    assert store.put_if_absent("a/b/c", b"2") is False
    store.put("a/b/c", b"3")
    assert [p.name for p in (root / "a" / "b").iterdir()] == ["c"]
    (root / "a" / "b" / ".tmp-leftover").write_bytes(b"crash debris")
    assert list(store.list("")) == ["a/b/c"]
    (root / "a" / "b" / ".tmp-leftover").unlink()
    store.delete(["a/b/c"])
    assert root.is_dir() and list(root.iterdir()) == []


def test_local_store_conflicting_object_and_folder_is_a_storage_error(tmp_path) -> None:
    store = LocalStore(tmp_path)
    store.put("a/b", b"x")
    with pytest.raises(StorageError, match="/a: one key names an object and another a folder"):
        store.put("a", b"y")
    with pytest.raises(StorageError, match="/a/b/c: one key names an object"):
        store.put("a/b/c", b"y")
    with pytest.raises(StorageError, match="/a: one key names an object"):
        store.put_if_absent("a", b"y")
    assert store.get("a/b") == b"x"


def test_local_store_needs_an_absolute_root() -> None:
    with pytest.raises(ValueError, match="absolute"):
        LocalStore("relative/folder")


# -- S3 -------------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.s3
def test_seaweedfs_honours_if_none_match(s3_bucket: str) -> None:
    store = open_store(f"s3://{s3_bucket}/p")
    assert isinstance(store, S3Store)
    assert store.supports_conditional_put is True
    assert list(store.list("")) == []  # the probe cleaned up after itself


@pytest.mark.s3
def test_s3_fallback_without_conditional_put(s3_bucket: str) -> None:
    store = S3Store(s3_bucket, "p", conditional_put=False)
    assert store.supports_conditional_put is False
    assert store.put_if_absent("m", b"one") is True
    assert store.put_if_absent("m", b"two") is False
    assert store.get("m") == b"one"


@pytest.mark.s3
def test_s3_prefixes_isolate_stores_in_one_bucket(s3_bucket: str) -> None:
    first, second, whole = (open_store(f"s3://{s3_bucket}/{p}") for p in ("team/a", "team/ab", ""))
    first.put("k", b"1")
    second.put("k", b"2")
    assert list(first.list("")) == ["k"]
    assert first.get("k") == b"1" and second.get("k") == b"2"
    assert list(whole.list("")) == ["team/a/k", "team/ab/k"]
    first.delete(["k"])
    assert list(whole.list("")) == ["team/ab/k"]


@pytest.mark.s3
def test_s3_not_found_names_bucket_and_key(s3_bucket: str) -> None:
    store = open_store(f"s3://{s3_bucket}/pre")
    with pytest.raises(ObjectNotFound) as info:
        store.get("layers/w/0.0")
    assert s3_bucket in str(info.value) and "pre/layers/w/0.0" in str(info.value)


@pytest.mark.s3
def test_s3_missing_bucket(s3_server) -> None:
    bucket = f"lv-missing-{uuid.uuid4().hex[:12]}"
    store = open_store(f"s3://{bucket}/p")
    with pytest.raises(StorageError, match=bucket) as info:
        store.check()
    # The operation that failed, the bucket and the prefix, each by name.
    assert f"HeadBucket in bucket {bucket!r} (prefix 'p')" in str(info.value)
    assert "does not exist" in str(info.value)
    with pytest.raises(ObjectNotFound, match=bucket):
        store.get("k")
    with pytest.raises(StorageError, match=bucket):
        store.list("")  # an error, never an empty listing
    with pytest.raises(StorageError, match=bucket):
        store.put("k", b"x")


@pytest.mark.s3
def test_s3_create_bucket_is_idempotent(s3_server) -> None:
    store = S3Store(f"lv-create-{uuid.uuid4().hex[:12]}", "x")
    store.create_bucket()
    store.create_bucket()
    store.check()
    store.put("k", b"v")
    assert store.get("k") == b"v"


@pytest.mark.s3
def test_s3_delete_in_batches(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import layervault.agent.storage.s3 as s3_module

    monkeypatch.setattr(s3_module, "_DELETE_BATCH", 3)
    store = open_store(f"s3://{s3_bucket}/p")
    keys = [f"k{i}" for i in range(8)]
    for key in keys:
        store.put(key, b"x")
    store.delete([*keys[:7], "missing"])
    assert list(store.list("")) == ["k7"]
    assert store.stats.deletes == 8


@pytest.mark.s3
def test_s3_multipart_put(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import layervault.agent.storage.s3 as s3_module

    monkeypatch.setattr(s3_module, "MULTIPART_THRESHOLD", 5 << 20)
    store = S3Store(s3_bucket, "p", multipart_part_size=5 << 20)
    data = os.urandom(12 << 20)
    store.put("multi", data)
    assert store.get("multi") == data
    etag = store._client.head_object(Bucket=s3_bucket, Key="p/multi")["ETag"]
    assert "-" in etag  # a multipart ETag ends in -<parts>


def test_s3_unreachable_endpoint_fails_fast_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in [("AWS_ACCESS_KEY_ID", "x"), ("AWS_SECRET_ACCESS_KEY", "x"), ("AWS_DEFAULT_REGION", "us-east-1")]:
        monkeypatch.setenv(name, value)
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    store = open_store("s3://some-bucket/p", endpoint_url=endpoint, connect_timeout=1, read_timeout=2,
                       retry=RetryPolicy(attempts=1))
    started = time.monotonic()
    for action in (store.check, lambda: store.get("k"), lambda: store.put("k", b"x"), lambda: list(store.list(""))):
        with pytest.raises(StorageError, match=endpoint.replace(".", r"\.")) as info:
            action()
        assert not isinstance(info.value, ObjectNotFound)
        if action is store.check:  # the operation that failed, the bucket and the prefix, each by name
            assert "HeadBucket in bucket 'some-bucket' (prefix 'p')" in str(info.value)
    assert time.monotonic() - started < 10


# -- URLs -----------------------------------------------------------------------------------


def test_open_store_parses_urls(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    local = open_store(tmp_path.as_uri())
    assert isinstance(local, LocalStore) and local.root == tmp_path.resolve()
    assert isinstance(open_store(str(tmp_path / "plain")), LocalStore)
    assert open_store(f"file://localhost{tmp_path}").url == tmp_path.resolve().as_uri()
    for url, bucket, prefix in [("s3://bkt", "bkt", ""), ("s3://bkt/", "bkt", ""),
                                ("s3://bkt/a/b/", "bkt", "a/b"), ("s3://bkt/ckpt", "bkt", "ckpt")]:
        store = open_store(url)
        assert isinstance(store, S3Store)
        assert (store.bucket, store.prefix) == (bucket, prefix)
        assert store.url == (f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}")


@pytest.mark.parametrize("url", ["", "http://host/bucket", "s3://", "s3:///prefix-only", "relative/path",
                                 "file://host/path", "file:relative", "s3://bkt/a/../b", "s3://bad_bucket!/x",
                                 "s3://bkt/p?versionId=1", "gs://bucket/x"])
def test_open_store_rejects_bad_urls(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with pytest.raises(ValueError):
        open_store(url)
