"""The tools a user would otherwise use, each on the same state and the same S3 server.

- ``torch.save`` to a buffer + boto3 multipart upload;
- DCP ``save`` / ``async_save`` with ``FileSystemWriter`` to local disk, then an upload of
  its folder (durable only once that upload ends; restore = download + ``FileSystemReader``);
- s3torchconnector's DCP ``S3StorageWriter`` / ``S3StorageReader``, sync and async.

Each returns :class:`SystemResult` rows; a peer that cannot run here returns a reason instead.
"""

from __future__ import annotations

import io
import pathlib
import shutil
import time
import warnings

import torch
import torch.distributed.checkpoint as dcp

from s3 import Bucket
from state import PeakRss, SystemResult, dcp_state, fresh_dcp_target, make_state, timed, timed_dcp_save

warnings.filterwarnings("ignore", message="torch.distributed is disabled")

#: The layer every one-layer restore reads: the middle of the stack.
def middle_key(layers: int) -> str:
    return f"{layers // 2}.weight"


def torch_save_boto3(bucket: Bucket, runs: int, model: torch.nn.Module, opt: torch.optim.Optimizer) -> SystemResult:
    result = SystemResult("torch.save + boto3 multipart")
    for run in range(runs):
        with PeakRss() as rss:
            start = time.perf_counter()
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buf)
            buf.seek(0)
            bucket.put(f"torch-save/{run}.pt", buf)
            del buf
            result.blocked.append(time.perf_counter() - start)
        result.durable.append(result.blocked[-1])
        result.trainer_rss.append(rss.increase)
    result.stored = bucket.stored_bytes("torch-save/0.pt")
    for run in range(runs):
        start = time.perf_counter()
        buf = io.BytesIO()
        bucket.get(f"torch-save/{run}.pt", buf)
        buf.seek(0)
        state = torch.load(buf, weights_only=True)
        fresh_model, fresh_opt = make_state(len(model))
        fresh_model.load_state_dict(state["model"])
        fresh_opt.load_state_dict(state["optimizer"])
        result.restore.append(time.perf_counter() - start)
    return result


def dcp_filesystem(bucket: Bucket, runs: int, model: torch.nn.Module, opt: torch.optim.Optimizer,
                   workdir: pathlib.Path, asynchronous: bool) -> SystemResult:
    """DCP to local disk, then the folder uploaded: blocked is what DCP blocks, durable ends with the upload."""
    kind = "async_save" if asynchronous else "save"
    result = SystemResult(f"dcp.{kind} + FileSystemWriter + folder upload")
    state = dcp_state(model, opt)
    prefix = f"dcp-fs-{kind}"
    for run in range(runs):
        folder = workdir / f"{prefix}-{run}"
        timed_dcp_save(state, dcp.FileSystemWriter(str(folder)), asynchronous, result,
                       then=lambda: bucket.upload_folder(folder, f"{prefix}/{run}"))
        shutil.rmtree(folder, ignore_errors=True)  # a restore must come from S3
    result.stored = bucket.stored_bytes(f"{prefix}/0/")
    for run in range(runs):
        target = fresh_dcp_target(len(model))
        fetched = workdir / f"{prefix}-fetched-{run}"
        result.restore.append(timed(lambda: (bucket.download_folder(f"{prefix}/{run}", fetched),
                                             dcp.load(target, storage_reader=dcp.FileSystemReader(str(fetched))))))
        shutil.rmtree(fetched, ignore_errors=True)
    result.note = "no one-layer restore from S3 without downloading the folder"
    return result


def s3_connector(bucket: Bucket, runs: int, model: torch.nn.Module, opt: torch.optim.Optimizer,
                 asynchronous: bool, background_staging: bool = False) -> SystemResult | str:
    """s3torchconnector's DCP writer/reader; a string says why it could not run here.

    ``background_staging``: async_save with DCP's staging on its own thread as well."""
    try:
        from s3torchconnector import S3ClientConfig
        from s3torchconnector.dcp import S3StorageReader, S3StorageWriter
    except ImportError as exc:
        return f"s3torchconnector not installed ({exc}); `pip install -e .[bench]`"
    import os

    region = os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
    # SeaweedFS on loopback has no virtual-host DNS names: path-style addressing.
    config = S3ClientConfig(force_path_style=True)
    kind = "async_save" if asynchronous else "save"
    prefix = f"s3tc-{kind}{'-bg' if background_staging else ''}"
    result = SystemResult(f"dcp.{kind} + s3torchconnector S3StorageWriter{', background staging' if background_staging else ''}")
    state = dcp_state(model, opt)

    def path(run: int) -> str:
        return f"s3://{bucket.name}/{prefix}/{run}"

    try:
        for run in range(runs):
            writer = S3StorageWriter(region, path(run), s3client_config=config)
            timed_dcp_save(state, writer, asynchronous, result, background_staging=background_staging)
        result.stored = bucket.stored_bytes(f"{prefix}/0/")
        key = middle_key(len(model))
        for run in range(runs):
            target = fresh_dcp_target(len(model))
            result.restore.append(timed(lambda: dcp.load(
                target, storage_reader=S3StorageReader(region, path(run), s3client_config=config))))
            one = {"model": {key: torch.empty_like(model.state_dict()[key])}}
            result.layer.append(timed(lambda: dcp.load(
                one, storage_reader=S3StorageReader(region, path(run), s3client_config=config))))
            if not torch.equal(one["model"][key], model.state_dict()[key]):
                return f"s3torchconnector restored layer {key} of run {run} with wrong bytes"
    except Exception as exc:  # noqa: BLE001 - any failure of a peer is reported, the bench goes on
        return f"s3torchconnector failed against SeaweedFS: {type(exc).__name__}: {exc}"
    return result
