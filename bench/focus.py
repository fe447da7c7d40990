"""Time to durable and full restore of the layervault ModelManager row alone, per agent setting.

    /tmp/lvenv/bin/python bench/focus.py [--runs 3] [--layers 22] [--chunk-mib 4] [--upload-workers 8]
        [--cache-mib 256] [--handoff-wait-ms 250] [--compressor lz4|none] [--profile-agent DIR]

The full bench (bench/run.py) takes many minutes; tuning one knob of the agent needs only the
layervault row, measured the same way (same state, SeaweedFS on loopback, one `layervault up`
child), so a configuration costs about a minute. ``--profile-agent`` records the agent with
py-spy during the saves and during the restores (two speedscope files in DIR; py-spy must be
installed, it is a profiling aid, not a dependency). Prints medians (min-max) of ``--runs``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

BENCH = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from s3 import fresh_bucket  # noqa: E402  (also puts tests/ on sys.path for s3server)

from s3server import S3Server  # noqa: E402


@contextlib.contextmanager
def profiled(pid: int, out: pathlib.Path | None):
    """py-spy on ``pid`` for the ``with`` block, written to ``out`` (nothing when ``out`` is None)."""
    if out is None:
        yield
        return
    spy = subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--format", "speedscope", "--threads",
                            "--output", str(out), "--rate", "100", "--nonblocking"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # py-spy attaches
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        spy.wait(60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--layers", type=int, default=22, help="Linear(2048, 2048) layers of the state")
    parser.add_argument("--staging-mib", type=int, default=2048)
    parser.add_argument("--chunk-mib", type=int, default=None, help="agent chunk size (default: the agent's)")
    parser.add_argument("--upload-workers", type=int, default=None, help="(default: the agent's)")
    parser.add_argument("--cache-mib", type=int, default=None, help="restore cache (default: the agent's)")
    parser.add_argument("--handoff-wait-ms", type=int, default=None, help="(default: the agent's)")
    parser.add_argument("--compressor", choices=["lz4", "none"], default="lz4",
                        help="lz4: the agent's per-layer chooser; none: store raw")
    parser.add_argument("--profile-agent", type=pathlib.Path, default=None, help="folder for py-spy profiles")
    args = parser.parse_args()

    import torch

    import layervault as lv
    from layervault.torch import ModelManager, OptimizerManager

    from agent_process import Up
    from state import GB, make_state, state_bytes, stats

    options = [f"--{name.replace('_', '-')}={value}" for name in ("chunk_mib", "upload_workers", "cache_mib", "handoff_wait_ms")
               if (value := getattr(args, name)) is not None]
    model, opt = make_state(args.layers)
    size = state_bytes(model, opt)
    if args.profile_agent:
        args.profile_agent.mkdir(parents=True, exist_ok=True)
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="layervault-focus-"))
    try:
        with S3Server() as server:
            os.environ.update({"AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": "layervault",
                               "AWS_SECRET_ACCESS_KEY": "layervault", "AWS_DEFAULT_REGION": "us-east-1"})
            with fresh_bucket("focus") as bucket, Up(f"s3://{bucket.name}/lv", args.staging_mib, workdir,
                                                       options=options) as up:
                client = lv.AgentClient(up.info["agent"])
                mm = ModelManager(lv.ModelConfig(job="focus", name="m", compressor=args.compressor), agent=client)
                om = OptimizerManager(lv.OptimizerConfig(job="focus", name="o", compressor=args.compressor), agent=client)
                durable, restore = [], []
                with profiled(up.proc.pid, args.profile_agent and args.profile_agent / "agent-save.json"):
                    for run in range(args.runs):
                        start = time.perf_counter()
                        handles = [mm.save(model, step=run), om.save(opt, step=run)]
                        infos = [h.wait(timeout=600) for h in handles]
                        durable.append(time.perf_counter() - start)
                stored = sum(i.stored_bytes for i in infos)
                fresh_model, fresh_opt = make_state(args.layers)
                with profiled(up.proc.pid, args.profile_agent and args.profile_agent / "agent-restore.json"):
                    for run in range(args.runs):
                        start = time.perf_counter()
                        mm.load(fresh_model, step=run)
                        om.load(fresh_opt, step=run)
                        restore.append(time.perf_counter() - start)
                for (name, want), got in zip(model.state_dict().items(), fresh_model.state_dict().values()):
                    if not torch.equal(want, got):
                        raise SystemExit(f"restored {name} with wrong bytes")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"state {size / GB:.3f} GB, stored {stored / GB:.3f} GB, agent {' '.join(options) or 'defaults'}, "
          f"compressor {args.compressor}")
    print(f"time to durable: {stats(durable)} s   runs: {' '.join(f'{d:.3f}' for d in durable)}")
    print(f"full restore:    {stats(restore)} s   runs: {' '.join(f'{r:.3f}' for r in restore)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
