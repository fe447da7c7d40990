"""Shared fixtures: the real S3 server, fresh buckets, and a store URL for each backend.

``store_url`` is parametrized over ``file`` and ``s3``; the ``s3`` case asks for the
server lazily, so a run that deselects S3 (``-m "not s3"``) never starts SeaweedFS.
The S3 fixtures put the endpoint and credentials into ``os.environ`` the standard AWS way,
so code under test, and agent processes started by tests, find the server exactly as
they would find a production one.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from layervault.agent.storage import ObjectStore, open_store
from s3server import ACCESS_KEY, REGION, SECRET_KEY, S3Server, remove_bucket


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A running S3 endpoint for the whole session, published through the AWS_* variables."""
    saved = {k: os.environ.get(k) for k in
             ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    server = S3Server()
    server.start()
    try:
        os.environ["AWS_ENDPOINT_URL"] = server.endpoint
        if server.external and saved["AWS_ACCESS_KEY_ID"]:
            # Another S3 (MinIO, AWS): keep the credentials and region the caller set for it.
            os.environ.setdefault("AWS_DEFAULT_REGION", REGION)
        else:
            os.environ["AWS_ACCESS_KEY_ID"] = ACCESS_KEY
            os.environ["AWS_SECRET_ACCESS_KEY"] = SECRET_KEY
            os.environ["AWS_DEFAULT_REGION"] = REGION
        yield server
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[str]:
    """A new, empty bucket for one test; emptied and deleted afterwards."""
    s3 = s3_server.admin
    name = f"lv-test-{uuid.uuid4().hex[:16]}"
    s3.create_bucket(Bucket=name)
    try:
        yield name
    finally:
        try:
            remove_bucket(s3, name)
        except Exception as exc:  # noqa: BLE001 - cleanup must not hide the test's own result
            print(f"could not remove test bucket {name}: {exc}")


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.s3)])
def store_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """``file:///<tmp>/store`` or ``s3://<fresh bucket>/<prefix>``, one test per backend."""
    if request.param == "file":
        return (tmp_path_factory.mktemp("store") / "root").as_uri()
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/lv-prefix"


@pytest.fixture
def store(store_url: str) -> Iterator[ObjectStore]:
    """The store behind ``store_url``, closed after the test."""
    opened = open_store(store_url)
    try:
        yield opened
    finally:
        opened.close()
