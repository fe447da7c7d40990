"""Save/restore benchmark: layervault vs torch.save + boto3, with the floors, in one run.

    scripts/dev bench [--runs 3] [--layers 22]

The state is the one issue 5 fixes for every comparison: a stack of Linear(2048, 2048)
layers plus Adam after one step (22 layers: 1.11 GB). Storage is SeaweedFS on loopback,
started here, the same server for every system. Each figure is the median (min-max) of
``--runs`` runs; ratios are taken within this run only. Results go to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from s3server import S3Server, client as s3_client  # noqa: E402

GB = 1e9


def make_state(layers: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(layers)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    model(torch.randn(4, 2048)).sum().backward()
    opt.step()
    return model, opt


def state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for s in opt.state_dict()["state"].values():
        total += sum(v.numel() * v.element_size() for v in s.values() if isinstance(v, torch.Tensor))
    return total


def tensors(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = list(model.state_dict().values())
    for s in opt.state_dict()["state"].values():
        out += [v for v in s.values() if isinstance(v, torch.Tensor)]
    return out


def stats(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Up:
    """`layervault up` on S3 in a child process."""

    def __init__(self, storage: str, staging_mib: int, workdir: pathlib.Path) -> None:
        ready = workdir / f"up-{staging_mib}.json"
        ready.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "layervault.cli", "--log-level", "WARNING", "up", "--storage", storage,
             "--socket", str(workdir / f"agent-{staging_mib}.sock"), "--staging-mib", str(staging_mib),
             "--ready-file", str(ready)], stdout=subprocess.DEVNULL, stderr=open(workdir / f"up-{staging_mib}.log", "wb"))
        deadline = time.monotonic() + 120
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"layervault up failed; see {workdir}/up-{staging_mib}.log")
            time.sleep(0.05)
        self.info = json.loads(ready.read_text())

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


def bench_layervault(storage: str, staging_mib: int, runs: int, model, opt, workdir: pathlib.Path) -> dict:
    import layervault as lv
    from layervault.torch import ModelManager, OptimizerManager

    up = Up(storage, staging_mib, workdir)
    try:
        client = lv.AgentClient(up.info["agent"])
        job = f"bench-{staging_mib}"
        mm = ModelManager(lv.ModelConfig(job=job, name="linear-stack"), agent=client)
        om = OptimizerManager(lv.OptimizerConfig(job=job, name="adam"), agent=client)
        blocked, durable, stored = [], [], 0
        for run in range(runs):
            start = time.perf_counter()
            handles = [mm.save(model, step=run), om.save(opt, step=run)]
            blocked.append(time.perf_counter() - start)
            infos = [h.wait(timeout=600) for h in handles]
            durable.append(time.perf_counter() - start)
            stored = sum(i.stored_bytes for i in infos)
        agent_stats = client.stats()
        fresh_model, fresh_opt = make_state(len(model))
        restore = [timed(lambda: (mm.load(fresh_model, step=r), om.load(fresh_opt, step=r))) for r in range(runs)]
        middle = len(model) // 2
        layer = [timed(lambda: mm.load_layer(f"{middle}.weight", step=r)) for r in range(runs)]
        assert torch.equal(fresh_model[middle].weight, model[middle].weight)
        return {"blocked_first": blocked[0], "blocked": blocked[1:] or blocked, "durable": durable, "stored": stored,
                "restore": restore, "layer": layer, "peak_rss": agent_stats.peak_rss_bytes, "pool": agent_stats.pool_size}
    finally:
        up.stop()


def bench_torch_save_boto3(bucket: str, runs: int, model, opt) -> dict:
    from boto3.s3.transfer import TransferConfig

    s3 = s3_client(os.environ["AWS_ENDPOINT_URL"], max_pool_connections=16)
    config = TransferConfig(multipart_chunksize=16 << 20, max_concurrency=8)
    total, restore = [], []
    for run in range(runs):
        start = time.perf_counter()
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buf)
        buf.seek(0)
        s3.upload_fileobj(buf, bucket, f"torch-save/{run}.pt", Config=config)
        total.append(time.perf_counter() - start)
    for run in range(runs):
        start = time.perf_counter()
        buf = io.BytesIO()
        s3.download_fileobj(bucket, f"torch-save/{run}.pt", buf, Config=config)
        buf.seek(0)
        state = torch.load(buf, weights_only=True)
        fresh_model, fresh_opt = make_state(len(model))
        fresh_model.load_state_dict(state["model"])
        fresh_opt.load_state_dict(state["optimizer"])
        restore.append(time.perf_counter() - start)
    return {"blocked": total, "durable": total, "restore": restore}


def bench_dcp(storage: str, bucket: str, runs: int, model, opt, workdir: pathlib.Path) -> dict:
    """DCP save/load: layervault's writer/reader vs FileSystemWriter (+ upload of its folder)."""
    import concurrent.futures
    import shutil
    import warnings

    import torch.distributed.checkpoint as dcp

    import layervault as lv
    from layervault.torch.dcp import AgentStorageReader, AgentStorageWriter

    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    from boto3.s3.transfer import TransferConfig

    s3 = s3_client(os.environ["AWS_ENDPOINT_URL"], max_pool_connections=16)
    config = TransferConfig(multipart_chunksize=16 << 20, max_concurrency=8)
    state = {"model": model.state_dict(), "optim": opt.state_dict()}
    out: dict[str, list[float]] = {k: [] for k in ("lv_sync", "lv_async_blocked", "lv_async_durable", "fs_local",
                                                  "fs_upload", "lv_load", "fs_load_local", "fs_load_s3")}

    def upload_folder(folder: pathlib.Path, prefix: str) -> None:
        files = [p for p in folder.rglob("*") if p.is_file()]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda p: s3.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(folder)}", Config=config), files))

    def download_folder(prefix: str, folder: pathlib.Path) -> None:
        keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
                for o in page.get("Contents", [])]
        folder.mkdir(parents=True, exist_ok=True)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda k: s3.download_file(bucket, k, str(folder / k[len(prefix) + 1:]), Config=config), keys))

    up = Up(storage, 2048, workdir)
    try:
        client = lv.AgentClient(up.info["agent"])
        client.prepare()
        for run in range(runs):
            out["lv_sync"].append(timed(lambda: dcp.save(state, storage_writer=AgentStorageWriter(
                job="bench-dcp", step=run, agent=client))))
            start = time.perf_counter()
            future = dcp.async_save(state, storage_writer=AgentStorageWriter(job="bench-dcp-async", step=run, agent=client))
            out["lv_async_blocked"].append(time.perf_counter() - start)
            future.result()
            out["lv_async_durable"].append(time.perf_counter() - start)
            folder = workdir / f"dcp-fs-{run}"
            out["fs_local"].append(timed(lambda: dcp.save(state, storage_writer=dcp.FileSystemWriter(str(folder)))))
            out["fs_upload"].append(out["fs_local"][-1] + timed(lambda: upload_folder(folder, f"dcp-fs/{run}")))
        for run in range(runs):
            target = {"model": make_state(len(model))[0].state_dict(), "optim": make_state(len(model))[1].state_dict()}
            out["lv_load"].append(timed(lambda: dcp.load(target, storage_reader=AgentStorageReader(
                job="bench-dcp", step=run, agent=client))))
            out["fs_load_local"].append(timed(lambda: dcp.load(target, storage_reader=dcp.FileSystemReader(
                str(workdir / f"dcp-fs-{run}")))))
            fetched = workdir / f"dcp-fs-fetched-{run}"
            out["fs_load_s3"].append(timed(lambda: (download_folder(f"dcp-fs/{run}", fetched), dcp.load(
                target, storage_reader=dcp.FileSystemReader(str(fetched))))))
            shutil.rmtree(fetched, ignore_errors=True)
    finally:
        up.stop()
    return out


def floors(bucket: str, runs: int, model, opt) -> dict:
    from boto3.s3.transfer import TransferConfig

    src = tensors(model, opt)
    dst = [torch.empty_like(t) for t in src]
    for d, s in zip(dst, src):
        d.copy_(s)  # pre-fault
    copy = [timed(lambda: [d.copy_(s) for d, s in zip(dst, src)]) for _ in range(runs)]
    blob = b"".join(t.numpy().tobytes() for t in src)
    s3 = s3_client(os.environ["AWS_ENDPOINT_URL"], max_pool_connections=16)
    config = TransferConfig(multipart_chunksize=16 << 20, max_concurrency=8)
    put = [timed(lambda: s3.upload_fileobj(io.BytesIO(blob), bucket, "floor/raw", Config=config)) for _ in range(runs)]
    get = [timed(lambda: s3.download_fileobj(bucket, "floor/raw", io.BytesIO(), Config=config)) for _ in range(runs)]
    return {"copy": copy, "put": put, "get": get}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--out", default=str(ROOT / "bench" / "RESULTS.md"))
    args = parser.parse_args()
    model, opt = make_state(args.layers)
    size = state_bytes(model, opt)
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="layervault-bench-"))
    with S3Server() as server:
        os.environ.update({"AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": "layervault",
                           "AWS_SECRET_ACCESS_KEY": "layervault", "AWS_DEFAULT_REGION": "us-east-1"})
        s3 = s3_client(server.endpoint)
        bucket = "bench"
        s3.create_bucket(Bucket=bucket)
        s3.put_object(Bucket=bucket, Key="warmup", Body=b"x")
        print(f"state: {size / GB:.3f} GB ({args.layers} x Linear(2048, 2048) + Adam), {args.runs} runs", flush=True)
        floor = floors(bucket, args.runs, model, opt)
        print("floors done", flush=True)
        peer = bench_torch_save_boto3(bucket, args.runs, model, opt)
        print("torch.save + boto3 done", flush=True)
        lv_big = bench_layervault(f"s3://{bucket}/lv", 2048, args.runs, model, opt, workdir)
        print("layervault (2 GiB staging) done", flush=True)
        lv_small = bench_layervault(f"s3://{bucket}/lv", 256, args.runs, model, opt, workdir)
        print("layervault (256 MiB staging) done", flush=True)
        dcp_results = bench_dcp(f"s3://{bucket}/lv", bucket, args.runs, model, opt, workdir)
        print("torch.distributed.checkpoint done", flush=True)

    med = statistics.median
    lines = [
        "# layervault benchmark results",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.node()} ({os.cpu_count()} cores), "
        f"torch {torch.__version__}; state {size / GB:.3f} GB = {args.layers} x Linear(2048, 2048) + Adam after one step; "
        f"SeaweedFS S3 on loopback; median (min-max) of {args.runs} runs, seconds.",
        "",
        "| system | blocked (first save) | blocked (later saves) | time to durable | restore (model+optimizer) | one layer | stored GB |",
        "|---|---|---|---|---|---|---|",
        f"| torch.save + boto3 multipart | {peer['blocked'][0]:.3f} | {stats(peer['blocked'])} | {stats(peer['durable'])} | {stats(peer['restore'])} | - | {size / GB:.3f} |",
    ]
    for label, r in (("layervault, 2 GiB staging", lv_big), ("layervault, 256 MiB staging", lv_small)):
        lines.append(f"| {label} | {r['blocked_first']:.3f} | {stats(r['blocked'])} | {stats(r['durable'])} | "
                     f"{stats(r['restore'])} | {stats(r['layer'])} | {r['stored'] / GB:.3f} |")
    lines += [
        "",
        "Floors in the same run:",
        "",
        f"- memcpy of the state into pre-faulted memory: {stats(floor['copy'])} s ({size / GB / med(floor['copy']):.1f} GB/s)",
        f"- raw boto3 multipart PUT of the same bytes: {stats(floor['put'])} s ({size / GB / med(floor['put']):.2f} GB/s)",
        f"- raw boto3 parallel ranged GET of the same bytes: {stats(floor['get'])} s ({size / GB / med(floor['get']):.2f} GB/s)",
        "",
        "Ratios (median / median):",
        "",
        f"- blocked, layervault 2 GiB staging (later saves) / memcpy floor: {med(lv_big['blocked']) / med(floor['copy']):.2f}x",
        f"- blocked, layervault 2 GiB staging / torch.save+boto3: {med(lv_big['blocked']) / med(peer['blocked']):.3f}",
        f"- time to durable, layervault / torch.save+boto3: {med(lv_big['durable']) / med(peer['durable']):.2f} (2 GiB staging), "
        f"{med(lv_small['durable']) / med(peer['durable']):.2f} (256 MiB staging)",
        f"- time to durable, layervault 2 GiB / raw PUT floor: {med(lv_big['durable']) / med(floor['put']):.2f}",
        f"- restore, layervault / torch.save+boto3: {med(lv_big['restore']) / med(peer['restore']):.2f}; "
        f"layervault / raw GET floor: {med(lv_big['restore']) / med(floor['get']):.2f}",
        f"- one layer / full restore: {med(lv_big['layer']) / med(lv_big['restore']):.3f}",
        f"- stored / raw bytes: {lv_big['stored'] / size:.3f}",
        f"- agent peak RSS with 256 MiB staging: {lv_small['peak_rss'] / 2**20:.0f} MiB "
        f"(pool {lv_small['pool'] / 2**20:.0f} MiB, counted in RSS as it is pre-faulted shared memory); "
        f"with 2 GiB staging: {lv_big['peak_rss'] / 2**20:.0f} MiB",
    ]
    d = dcp_results
    lines += [
        "",
        "## torch.distributed.checkpoint (one process, same state as {\"model\", \"optim\"})",
        "",
        "| system | blocked | time to durable in S3 | full load |",
        "|---|---|---|---|",
        f"| dcp.save + AgentStorageWriter | {stats(d['lv_sync'])} | {stats(d['lv_sync'])} | {stats(d['lv_load'])} (AgentStorageReader) |",
        f"| dcp.async_save + AgentStorageWriter | {stats(d['lv_async_blocked'])} | {stats(d['lv_async_durable'])} | - |",
        f"| dcp.save + FileSystemWriter, local disk | {stats(d['fs_local'])} | (not in S3) | {stats(d['fs_load_local'])} (FileSystemReader, local) |",
        f"| FileSystemWriter + upload of its folder | {stats(d['fs_local'])} | {stats(d['fs_upload'])} | {stats(d['fs_load_s3'])} (download + FileSystemReader) |",
        "",
        f"- time to durable, AgentStorageWriter / (FileSystemWriter + upload): {med(d['lv_sync']) / med(d['fs_upload']):.2f}",
        f"- full load, AgentStorageReader / (download + FileSystemReader): {med(d['lv_load']) / med(d['fs_load_s3']):.2f}",
        "- resharded loads (N ranks -> M ranks) are measured for bytes, not time, in tests/test_dcp.py",
    ]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    pathlib.Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
