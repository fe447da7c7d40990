"""The one S3 server every system writes to, and the boto3 transfers the peers and floors share."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import io
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from s3server import client as s3_client, remove_bucket  # noqa: E402

#: 16 MiB parts, 8 in flight: the fastest boto3 settings measured against SeaweedFS on this box.
PART_BYTES = 16 << 20
CONCURRENCY = 8


@dataclasses.dataclass
class Bucket:
    """A bucket on the bench's SeaweedFS, with a boto3 client tuned for large transfers."""

    name: str

    def __post_init__(self) -> None:
        from boto3.s3.transfer import TransferConfig

        self.client = s3_client(os.environ["AWS_ENDPOINT_URL"], max_pool_connections=2 * CONCURRENCY)
        self.config = TransferConfig(multipart_chunksize=PART_BYTES, max_concurrency=CONCURRENCY)

    def put(self, key: str, data: io.IOBase) -> None:
        self.client.upload_fileobj(data, self.name, key, Config=self.config)

    def get(self, key: str, into: io.IOBase) -> None:
        self.client.download_fileobj(self.name, key, into, Config=self.config)

    def upload_folder(self, folder: pathlib.Path, prefix: str) -> None:
        files = [p for p in folder.rglob("*") if p.is_file()]
        with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
            list(pool.map(lambda p: self.client.upload_file(
                str(p), self.name, f"{prefix}/{p.relative_to(folder)}", Config=self.config), files))

    def download_folder(self, prefix: str, folder: pathlib.Path) -> None:
        keys = [o["Key"] for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix)
                for o in page.get("Contents", [])]
        folder.mkdir(parents=True, exist_ok=True)
        with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
            list(pool.map(lambda k: self.client.download_file(
                self.name, k, str(folder / k[len(prefix) + 1:]), Config=self.config), keys))

    def stored_bytes(self, prefix: str) -> int:
        return sum(o["Size"] for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix)
                   for o in page.get("Contents", []))


@contextlib.contextmanager
def fresh_bucket(name: str):
    """A bucket for one system's runs, emptied and deleted afterwards: SeaweedFS frees a deleted
    bucket's volume, so a full run (some 30 GB written) never fills the disk under the server."""
    bucket = Bucket(name)
    bucket.client.create_bucket(Bucket=name)
    bucket.client.put_object(Bucket=name, Key="warmup", Body=b"x")  # volume growth, outside the timings
    try:
        yield bucket
    finally:
        remove_bucket(bucket.client, name)
