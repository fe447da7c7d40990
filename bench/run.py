"""Save/restore benchmark of issue 5: layervault vs its peers, the floors, scaling, gRPC path.

    scripts/dev bench [--runs 3] [--layers 22] [--scaling-sizes 0.25,0.5,1,2] [--scaling-ranks 1,2,4]
    scripts/dev bench --layers 2 --runs 1 --scaling-sizes 0.05      # a quick check

The state is the one issue 5 fixes for every comparison: a stack of Linear(2048, 2048)
layers plus Adam after one step (22 layers: 1.11 GB). Storage is SeaweedFS on loopback,
started here, the same server for every system. Each figure is the median (min-max) of
``--runs`` runs; ratios are taken within this run only. Results go to bench/RESULTS.md.

Modules: state (the state, probes, result record), s3 (the bucket), floors, grpc_floor, peers,
layervault_runs, scaling, report.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import sys
import tempfile

BENCH = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from s3 import ROOT, fresh_bucket  # noqa: E402  (also puts tests/ on sys.path for s3server)

from s3server import S3Server  # noqa: E402

#: Checked 2026-12 in a side folder (pip install --target) against torch 2.13.
TORCHSNAPSHOT_WHY = (
    "torchsnapshot 0.1.0 (its last release, 2022-10) imports and takes a local snapshot with torch 2.13, but its "
    "S3 plugin needs aiobotocore, and aiobotocore 3.10.0 pins botocore>=1.43.115,<1.43.118 while layervault runs "
    "boto3/botocore 1.44.8; the plugin also takes no endpoint or addressing options (only AWS_ENDPOINT_URL). "
    "It would need its own environment with an older botocore, so it is left out of this run."
)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="runs per system (medians of these)")
    parser.add_argument("--layers", type=int, default=22, help="Linear(2048, 2048) layers of the main state")
    parser.add_argument("--scaling", action=argparse.BooleanOptionalAction, default=True, help="the scaling table")
    parser.add_argument("--scaling-sizes", type=_floats, default=[0.25, 0.5, 1, 2], help="GiB, comma-separated")
    parser.add_argument("--scaling-ranks", type=_ints, default=[1, 2, 4], help="comma-separated")
    parser.add_argument("--scaling-skip", default="2x4",
                        help="cells left out to keep the run short, SIZExRANKS comma-separated ('' for none)")
    parser.add_argument("--no-peers", dest="peers", action="store_false", help="layervault and floors only")
    parser.add_argument("--out", default=str(ROOT / "bench" / "RESULTS.md"))
    args = parser.parse_args()

    import torch.multiprocessing as mp

    import floors
    import grpc_floor
    import layervault_runs
    import peers
    from report import BenchRun, render
    from scaling import scaling
    from state import GB, make_state, state_bytes, tensors

    mp.set_sharing_strategy("file_system")
    skip = {(float(a), int(b)) for a, b in (c.split("x") for c in args.scaling_skip.split(",") if c)}
    model, opt = make_state(args.layers)
    size = state_bytes(model, opt)
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="layervault-bench-"))
    skipped: dict[str, str] = {"torchsnapshot": TORCHSNAPSHOT_WHY}
    try:
        with S3Server() as server:
            os.environ.update({"AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": "layervault",
                               "AWS_SECRET_ACCESS_KEY": "layervault", "AWS_DEFAULT_REGION": "us-east-1"})
            buckets = iter(range(1_000))

            def run_in_fresh_bucket(fn):  # fn(bucket, storage URL) -> result
                with fresh_bucket(f"bench-{next(buckets)}") as bucket:
                    return fn(bucket, f"s3://{bucket.name}/lv")

            print(f"state: {size / GB:.3f} GB ({args.layers} x Linear(2048, 2048) + Adam), {args.runs} runs", flush=True)
            floor = run_in_fresh_bucket(lambda b, _: floors.floors(b, args.runs, model, opt))
            floor["grpc"] = grpc_floor.floor(tensors(model, opt), args.runs, workdir)
            print("floors done", flush=True)
            systems = []

            def add(fn, label: str) -> None:
                result = run_in_fresh_bucket(fn)
                if isinstance(result, str):
                    skipped[label] = result
                    print(f"{label}: skipped: {result}", flush=True)
                else:
                    systems.append(result)
                    print(f"{result.name} done", flush=True)

            if args.peers:
                add(lambda b, _: peers.torch_save_boto3(b, args.runs, model, opt), "torch.save + boto3")
                for asynchronous in (False, True):
                    add(lambda b, _: peers.dcp_filesystem(b, args.runs, model, opt, workdir, asynchronous), "FileSystemWriter")
                for asynchronous in (False, True):
                    kind = "async_save" if asynchronous else "save"
                    add(lambda b, _: peers.s3_connector(b, args.runs, model, opt, asynchronous), f"s3torchconnector ({kind})")
                add(lambda b, _: peers.s3_connector(b, args.runs, model, opt, True, background_staging=True),
                    "s3torchconnector (async_save, background staging)")
            for staging in (2048, 256):
                add(lambda _, url: layervault_runs.managers(url, staging, args.runs, model, opt, workdir), "layervault")
            add(lambda _, url: layervault_runs.managers(url, 2048, args.runs, model, opt, workdir, background=True),
                "layervault (background staging)")
            for asynchronous in (False, True):
                add(lambda _, url: layervault_runs.dcp_writer(url, args.runs, model, opt, workdir, asynchronous),
                    "layervault DCP")
            grpc = run_in_fresh_bucket(lambda _, url: layervault_runs.grpc_handoff(url, args.runs, model, opt, workdir))
            print(f"gRPC path done: {size / GB / sorted(grpc)[len(grpc) // 2]:.2f} GB/s", flush=True)
            cells = []
            if args.scaling:
                del model, opt  # the ranks need the memory
                cells = run_in_fresh_bucket(lambda _, url: scaling(url, args.scaling_sizes, args.scaling_ranks, workdir, skip))
        note = f"Left out to keep the run short: {', '.join(f'{s:g} GiB x {r} ranks' for s, r in sorted(skip))}." if skip else ""
        run = BenchRun(args.layers, args.runs, size, floor, systems, skipped, grpc, cells, note)
        text = render(run)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print("\n" + text)
    pathlib.Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
