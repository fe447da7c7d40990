"""``layervault verify | diff | rm | gc``: checking and pruning checkpoints from the command line.

    layervault verify JOB STEP [--kind K] --storage URL        re-read every object; exit 1 on damage
    layervault diff JOB STEP1 STEP2 [--kind K]                 which layers changed
    layervault rm JOB STEP [--kind K] --storage URL [--yes]    delete one checkpoint (shared objects stay)
    layervault gc [JOB] --storage URL [--min-age S] [--dry-run] delete objects no checkpoint refers to

verify, rm and gc read and write storage directly, so they need ``--storage`` and no
running service; diff also works through the agent. Deletes follow references (see
``layervault.agent.lifecycle``): an object another checkpoint shares is never deleted.
Run against a live deployment, rm and gc do not know the coordinator's in-flight saves:
gc's ``--min-age`` (default: 600 s, the default commit timeout) keeps their objects, and a
commit re-checks the base of an incremental save, so a racing rm fails that save rather
than corrupting it. The coordinator's own retention knows its saves in flight.
"""

from __future__ import annotations

import argparse
import json
import sys

from layervault.errors import InvalidArgumentError

DEFAULT_GC_MIN_AGE = 600.0


def retention_arg(text: str):  # -> Retention, for argparse's type=
    from layervault.agent.retention import Retention

    try:
        return Retention.parse(text)
    except InvalidArgumentError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _open(args: argparse.Namespace):  # -> (store, catalog)
    from layervault.agent.catalog import Catalog
    from layervault.agent.storage import open_store

    if not args.storage:
        raise InvalidArgumentError(f"`layervault {args.command}` works on storage directly: pass --storage URL")
    store = open_store(args.storage)
    return store, Catalog(store)


def _manifest(args: argparse.Namespace, step: int):
    selector = {"step": str(step)}
    if args.storage:
        _, catalog = _open(args)
        return catalog.resolve(args.job, args.kind, selector)[1]
    from layervault.client import AgentClient

    return AgentClient(args.agent).resolve(args.job, args.kind, selector)


def cmd_verify(args: argparse.Namespace) -> int:
    from layervault.agent.verify import verify_checkpoint
    from layervault.progress import ByteProgress

    store, catalog = _open(args)
    _, manifest = catalog.resolve(args.job, args.kind, {"step": str(args.step)})
    progress = ByteProgress.for_terminal(sum(s.raw_bytes for s in manifest.shards), "verify ")
    result = verify_checkpoint(store, manifest, on_chunk=progress.add if progress else None)
    if progress:
        progress.close()
    label = f"{manifest.job}/{manifest.kind} step {manifest.step}"
    if args.json:
        print(json.dumps({"checkpoint": label, "chunks": result.chunks, "raw_bytes": result.raw_bytes,
                          "bad": [vars(b) for b in result.bad]}, indent=1))
    elif result.ok:
        print(f"{label}: OK, {result.chunks} objects, {result.raw_bytes} bytes verified")
    else:
        print(f"{label}: {len(result.bad)} bad of {result.chunks} objects:")
        for bad in result.bad:
            print(f"  {bad}")
    return 0 if result.ok else 1


def cmd_diff(args: argparse.Namespace) -> int:
    from layervault.agent.diff import diff_manifests

    old, new = _manifest(args, args.step1), _manifest(args, args.step2)
    changes = diff_manifests(old, new)
    if args.json:
        print(json.dumps([vars(c) for c in changes], indent=1))
        return 0
    counts: dict[str, int] = {}
    for change in changes:
        counts[change.status] = counts.get(change.status, 0) + 1
        if change.status != "same" or args.all:
            how = f"  (by {change.how})" if change.how else ""
            print(f"{change.status:<8} {change.name}{how}")
    print(f"{args.job}/{args.kind} step {args.step1} -> {args.step2}: "
          + ", ".join(f"{counts.get(s, 0)} {s}" for s in ("same", "changed", "added", "removed")))
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from layervault.agent.lifecycle import delete_checkpoint

    store, catalog = _open(args)
    _, manifest = catalog.resolve(args.job, args.kind, {"step": str(args.step)})
    label = f"{args.job}/{args.kind} step {args.step}"
    if not args.yes:
        if not sys.stdin.isatty():
            raise InvalidArgumentError(f"refusing to delete {label} without confirmation: pass --yes")
        answer = input(f"delete {label} ({len(manifest.shards)} shards, committed {manifest.committed_at})? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return 1
    result = delete_checkpoint(store, catalog, args.job, args.kind, args.step)
    latest = f"latest is now step {result.latest}" if result.latest is not None else "no checkpoint of it is left"
    print(f"deleted {label}: {len(result.deleted)} objects; {result.shared} objects shared with other "
          f"checkpoints kept; {latest}")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from layervault.agent.lifecycle import collect_garbage

    store, catalog = _open(args)
    result = collect_garbage(store, catalog, args.job or "", args.min_age, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    if args.json:
        print(json.dumps({**vars(result)}, indent=1))
        return 0
    for key in result.deleted if args.dry_run else ():
        print(key)
    print(f"{verb} {len(result.deleted)} unreferenced objects ({result.deleted_bytes} bytes); kept "
          f"{result.referenced} referenced, {result.young} younger than {args.min_age:.0f}s")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register verify, diff, rm and gc on the ``layervault`` parser."""

    def common(p: argparse.ArgumentParser, job: str = "required") -> None:
        if job == "required":
            p.add_argument("job")
        p.add_argument("--storage", help="s3://bucket/prefix or file:///path")
        p.add_argument("--json", action="store_true")

    p = sub.add_parser("verify", help="re-read every object of a checkpoint and check its checksums")
    common(p)
    p.add_argument("step", type=int)
    p.add_argument("--kind", choices=["model", "optimizer"], default="model")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("diff", help="which layers differ between two checkpoints of a job")
    common(p)
    p.add_argument("step1", type=int)
    p.add_argument("step2", type=int)
    p.add_argument("--kind", choices=["model", "optimizer"], default="model")
    p.add_argument("--all", action="store_true", help="also list the layers that are the same")
    p.add_argument("--agent", help="agent address, when not reading --storage")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("rm", help="delete one committed checkpoint (objects other checkpoints share stay)")
    common(p)
    p.add_argument("step", type=int)
    p.add_argument("--kind", choices=["model", "optimizer"], default="model")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("gc", help="delete objects that no committed checkpoint refers to")
    p.add_argument("job", nargs="?", help="only this job (default: all jobs)")
    common(p, job="optional")
    p.add_argument("--min-age", type=float, default=DEFAULT_GC_MIN_AGE,
                   help="spare objects younger than this many seconds (saves in flight); default 600")
    p.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")
    p.set_defaults(func=cmd_gc)
