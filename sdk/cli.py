"""The ``layervault`` command: run the services, and inspect checkpoints.

    layervault coordinator --storage URL [--port 7070]
    layervault agent --coordinator ADDR --storage URL [--socket PATH] [--port 0] [--staging-mib 1024]
    layervault up [--storage URL]                 coordinator + agent in one process (one machine)
    layervault ls [JOB] [--kind K]                committed checkpoints
    layervault show JOB STEP [--kind model|optimizer]
    layervault pull JOB STEP [--kind K] [--layer NAME] -o PATH    layers as numpy .npy files

``ls``, ``show`` and ``pull`` ask the agent (``--agent``/``LAYERVAULT_AGENT``), or read
storage directly with ``--storage URL`` - no service needed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import signal
import sys
import threading
from typing import Sequence

from layervault.errors import LayervaultError

DEFAULT_HOME_STORAGE = pathlib.Path.home() / ".layervault" / "storage"


def _storage(url: str | None):  # -> ObjectStore
    from layervault.agent.storage import StorageError, open_store

    if not url:
        DEFAULT_HOME_STORAGE.mkdir(parents=True, exist_ok=True)
        url = DEFAULT_HOME_STORAGE.as_uri()
    store = open_store(url)
    try:
        store.check()
    except StorageError as exc:
        raise SystemExit(f"layervault: storage {url} is not usable: {exc}")
    return store


def _announce(args: argparse.Namespace, info: dict) -> None:
    print("layervault ready: " + json.dumps(info), flush=True)
    if args.ready_file:
        tmp = pathlib.Path(args.ready_file + ".tmp")
        tmp.write_text(json.dumps(info))
        tmp.replace(args.ready_file)


def _serve_until_signal(servers: list, grace: float) -> None:
    """Serve until SIGTERM/SIGINT, then stop gracefully (in order: agents before the coordinator)."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    # Wake up regularly: a signal delivered to one of the upload threads only marks itself
    # pending, and Python runs the handler once the main thread is back in the interpreter.
    while not stop.wait(0.25):
        pass
    logging.getLogger("layervault").info("shutting down (grace %.0fs)", grace)
    for server in servers:
        server.stop(grace=grace)


def _agent_kwargs(args: argparse.Namespace) -> dict:
    return dict(socket_path=args.socket, host=args.host, port=args.port, staging_bytes=args.staging_mib << 20,
                chunk_size=args.chunk_mib << 20, upload_workers=args.upload_workers, cache_bytes=args.cache_mib << 20)


def cmd_coordinator(args: argparse.Namespace) -> int:
    from layervault.agent.server import start_coordinator

    server = start_coordinator(_storage(args.storage), args.host, args.port, args.commit_timeout)
    _announce(args, {"coordinator": server.address, "pid": os.getpid()})
    _serve_until_signal([server], args.grace)
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    from layervault.agent.server import start_agent

    server = start_agent(_storage(args.storage), args.coordinator, **_agent_kwargs(args))
    _announce(args, {"agent": server.address, "tcp": server.tcp_address, "pid": os.getpid()})
    _serve_until_signal([server], args.grace)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from layervault.agent.server import start_agent, start_coordinator

    store = _storage(args.storage)
    coordinator = start_coordinator(store, "127.0.0.1", args.coordinator_port, args.commit_timeout)
    agent = start_agent(store, coordinator.address, **_agent_kwargs(args))
    _announce(args, {"agent": agent.address, "tcp": agent.tcp_address, "coordinator": coordinator.address,
                     "storage": store.url, "pid": os.getpid()})
    _serve_until_signal([agent, coordinator], args.grace)
    return 0


def _checkpoints(args: argparse.Namespace):  # -> list[CheckpointInfo]
    if args.storage:
        from layervault.agent.catalog import Catalog
        from layervault.agent.manifest import checkpoint_info
        from layervault.agent.storage import open_store

        catalog = Catalog(open_store(args.storage))
        return [checkpoint_info(m, k) for k, m in catalog.checkpoints(args.job or "", args.kind or "")]
    from layervault.client import AgentClient

    return AgentClient(args.agent).list(args.job or "", args.kind or "")


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def cmd_ls(args: argparse.Namespace) -> int:
    rows = _checkpoints(args)
    if args.json:
        from google.protobuf import json_format

        print(json.dumps([json_format.MessageToDict(r, preserving_proto_field_name=True) for r in rows], indent=1))
        return 0
    if not rows:
        print("no committed checkpoints" + (f" for job {args.job!r}" if args.job else ""))
        return 0
    print(f"{'JOB':<20} {'KIND':<10} {'STEP':>8} {'NAME':<16} {'WORLD':>5} {'LAYERS':>6} {'RAW':>10} {'STORED':>10}  KEYS")
    for r in rows:
        keys = " ".join(f"{k}={v}" for k, v in sorted(r.keys.items()) if k != "step")
        print(f"{r.id.job:<20} {r.id.kind:<10} {r.id.step:>8} {r.config_name:<16} {r.world_size:>5} {r.entries:>6} "
              f"{_human(r.raw_bytes):>10} {_human(r.stored_bytes):>10}  {keys}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    selector = {"step": str(args.step)}
    if args.storage:
        from layervault.agent.catalog import Catalog
        from layervault.agent.storage import open_store

        _, manifest = Catalog(open_store(args.storage)).resolve(args.job, args.kind, selector)
    else:
        from layervault.client import AgentClient

        manifest = AgentClient(args.agent).resolve(args.job, args.kind, selector)
    if args.json:
        from layervault.agent.manifest import encode_manifest

        print(encode_manifest(manifest).decode())
        return 0
    cfg = manifest.config
    raw = sum(s.raw_bytes for s in manifest.shards)
    stored = sum(s.stored_bytes for s in manifest.shards)
    print(f"checkpoint   {manifest.job}/{manifest.kind} step {manifest.step}  (committed {manifest.committed_at}, attempt {manifest.save_id})")
    print(f"config       name={cfg.name} framework={cfg.framework} compressor={cfg.compressor} "
          + " ".join(f"{k}={v}" for k, v in sorted(cfg.additional.items())))
    print("keys         " + " ".join(f"{k}={v}" for k, v in sorted(manifest.keys.items())))
    print(f"world size   {manifest.world_size}")
    print(f"size         {_human(raw)} raw, {_human(stored)} stored ({raw / stored if stored else 1:.3f}x), {len(manifest.shards)} shards")
    print(f"\n{'LAYER':<44} {'DTYPE':<9} {'SHAPE':<18} {'RANK':>4} {'RAW':>10} {'STORED':>10} {'CHUNKS':>6}  CODEC")
    for s in manifest.shards:
        shape = "x".join(map(str, s.layout.local_shape)) or "scalar"
        print(f"{s.name:<44} {s.layout.dtype:<9} {shape:<18} {s.rank:>4} {_human(s.raw_bytes):>10} "
              f"{_human(s.stored_bytes):>10} {len(s.chunks):>6}  {'+'.join(s.codec) or 'none'}")
    return 0


_PULL_BATCH_BYTES = 256 << 20  # layers fetched per round trip, so a large checkpoint never sits in memory whole


class _Puller:
    """Fetches whole layers of one checkpoint as numpy arrays, through the agent or from storage."""

    def __init__(self, args: argparse.Namespace) -> None:
        selector = {} if args.step == "latest" else {"step": str(args.step)}
        self.store = self.client = None
        if args.storage:
            from layervault.agent.catalog import Catalog
            from layervault.agent.storage import open_store

            self.store = open_store(args.storage)
            _, self.manifest = Catalog(self.store).resolve(args.job, args.kind, selector)
        else:
            from layervault.client import AgentClient

            self.client = AgentClient(args.agent)
            self.manifest = self.client.resolve(args.job, args.kind, selector)

    def names(self) -> list[str]:
        return list(dict.fromkeys(s.name for s in self.manifest.shards))

    def batches(self, names: list[str]) -> list[list[str]]:
        size: dict[str, int] = {}
        for shard in self.manifest.shards:
            size[shard.name] = size.get(shard.name, 0) + shard.raw_bytes
        out: list[list[str]] = [[]]
        total = 0
        for name in names:
            if out[-1] and total + size[name] > _PULL_BATCH_BYTES:
                out.append([])
                total = 0
            out[-1].append(name)
            total += size[name]
        return out

    def fetch(self, names: list[str]):  # -> dict[str, np.ndarray]
        from layervault.arrays import assemble, shard_sinks
        from layervault.errors import NotFoundError

        wanted = set(names)
        indices = [i for i, s in enumerate(self.manifest.shards) if s.name in wanted]
        missing = wanted - {self.manifest.shards[i].name for i in indices}
        if missing:
            m = self.manifest
            raise NotFoundError(f"{m.job}/{m.kind} step {m.step} has no layer {', '.join(map(repr, sorted(missing)[:5]))}")
        sinks = shard_sinks(self.manifest, indices)
        if self.client is not None:
            self.client.restore(self.manifest, names, sinks)
        else:
            self._read_storage(indices, sinks)
        return assemble(self.manifest, sinks)

    def _read_storage(self, indices: list[int], sinks: dict, window: int = 16) -> None:
        """Chunks straight from storage, verified and decoded as the agent would, ``window`` at a time."""
        import collections
        from concurrent.futures import ThreadPoolExecutor

        from layervault.agent.restore import fetch_chunk

        work = collections.deque((i, c) for i in indices for c in self.manifest.shards[i].chunks)
        in_flight: collections.deque = collections.deque()
        with ThreadPoolExecutor(8, thread_name_prefix="lv-pull") as pool:
            while work or in_flight:
                while work and len(in_flight) < window:
                    index, chunk = work.popleft()
                    future = pool.submit(fetch_chunk, self.store, self.manifest, self.manifest.shards[index], chunk)
                    in_flight.append((index, chunk.raw_offset, future))
                index, offset, future = in_flight.popleft()
                sinks[index].write(offset, memoryview(future.result()))


def _write_npy(path: pathlib.Path, name: str, array) -> None:
    import numpy as np

    from layervault.arrays import npy_compatible

    out = npy_compatible(array)
    with open(path, "wb") as f:
        np.save(f, out, allow_pickle=False)
    widened = ""
    if out is not array:
        widened = f" (stored {array.dtype.name}, widened to {out.dtype.name}: .npy has no {array.dtype.name})"
    print(f"{name}  {array.dtype.name} {list(array.shape)} -> {path}{widened}")


def cmd_pull(args: argparse.Namespace) -> int:
    from layervault.agent.keys import layer_segment

    if args.step != "latest" and not args.step.isdigit():
        raise ValueError(f"STEP must be a non-negative integer or 'latest', got {args.step!r}")
    puller = _Puller(args)
    out = pathlib.Path(args.output)
    if args.layer is not None:
        if out.is_dir():
            out = out / f"{layer_segment(args.layer)}.npy"
        _write_npy(out, args.layer, puller.fetch([args.layer])[args.layer])
        return 0
    out.mkdir(parents=True, exist_ok=True)
    for batch in puller.batches(puller.names()):
        for name, array in puller.fetch(batch).items():
            _write_npy(out / f"{layer_segment(name)}.npy", name, array)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="layervault", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default=os.environ.get("LAYERVAULT_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True)

    def service(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.add_argument("--storage", help="s3://bucket/prefix or file:///path (default for up: ~/.layervault/storage)")
        p.add_argument("--ready-file", help="write the bound addresses as JSON here once serving")
        p.add_argument("--commit-timeout", type=float, default=600.0, help="seconds a save may take to commit")
        p.add_argument("--grace", type=float, default=30.0,
                       help="on SIGTERM: seconds to let in-flight hand-offs and uploads finish before aborting them")
        return p

    p = service("coordinator", "run the coordinator")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=7070)
    p.set_defaults(func=cmd_coordinator)

    for name, help_, func in (("agent", "run a node agent", cmd_agent), ("up", "run coordinator + agent (one machine)", cmd_up)):
        from layervault.agent.server import default_socket_path

        p = service(name, help_)
        if name == "agent":
            p.add_argument("--coordinator", required=True, help="coordinator address host:port")
        else:
            p.add_argument("--coordinator-port", type=int, default=0)
        p.add_argument("--socket", default=default_socket_path(), help="unix socket for the node's ranks")
        p.add_argument("--host", default="127.0.0.1", help="TCP interface (0.0.0.0 for other nodes)")
        p.add_argument("--port", type=int, default=0, help="TCP port (0: any free port)")
        p.add_argument("--staging-mib", type=int, default=1024, help="staging budget (shared memory) in MiB")
        p.add_argument("--chunk-mib", type=int, default=4, help="chunk (object) size in MiB")
        p.add_argument("--upload-workers", type=int, default=8)
        p.add_argument("--cache-mib", type=int, default=256, help="node-local cache of restored chunks in MiB")
        p.set_defaults(func=func)

    for name, func in (("ls", cmd_ls), ("show", cmd_show)):
        p = sub.add_parser(name, help="list checkpoints" if name == "ls" else "show one checkpoint")
        if name == "ls":
            p.add_argument("job", nargs="?")
            p.add_argument("--kind", choices=["model", "optimizer"])
        else:
            p.add_argument("job")
            p.add_argument("step", type=int)
            p.add_argument("--kind", choices=["model", "optimizer"], default="model")
        p.add_argument("--storage", help="read storage directly (no service needed)")
        p.add_argument("--agent", help="agent address (default: LAYERVAULT_AGENT or the default socket)")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=func)

    p = sub.add_parser("pull", help="write layers of a checkpoint as numpy .npy files",
                       description="Write one layer (--layer NAME -o FILE.npy) or every layer (-o DIR: one .npy per layer, "
                                   "names percent-encoded) of a checkpoint, whatever framework saved it. bfloat16 and "
                                   "float8 layers are widened to float32 (exactly): .npy has no such dtypes.")
    p.add_argument("job")
    p.add_argument("step", help="step number, or 'latest'")
    p.add_argument("--kind", choices=["model", "optimizer"], default="model")
    p.add_argument("--layer", help="the one layer (entry) to write; all layers when omitted")
    p.add_argument("-o", "--output", required=True,
                   help="the .npy file (with --layer; or a directory to put it in), else a directory")
    p.add_argument("--storage", help="read storage directly (no service needed)")
    p.add_argument("--agent", help="agent address (default: LAYERVAULT_AGENT or the default socket)")
    p.set_defaults(func=cmd_pull)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from layervault.agent.storage import StorageError

    try:
        return args.func(args)
    except (LayervaultError, StorageError, ValueError, OSError) as exc:  # user-facing: a message, not a traceback
        print(f"layervault: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
