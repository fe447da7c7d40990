"""Finishing the saves of an earlier process of this agent, from its journals.

Runs once when the agent starts, before it serves: for every pool folder in the state
directory (see :mod:`layervault.agent.journal`), each journal becomes a save session again,
under the same attempt id and rank. Its chunks that were durable stay as they are; the
others are cut again from the old pool, mapped read-only, and uploaded under chunk
indices no earlier process used. The session then reports to the coordinator exactly as a
fresh one does; the coordinator accepts the report by attempt id and rank, whichever
agent process sends it. When the last resumed save of a pool is reported, the pool file,
its hold link and its folder are deleted.

What is not resumed, each with a log line: a journal that cannot be read (corrupt, other
format version: deleted), a save whose staged bytes are gone (pool file deleted, or
shorter than recorded: the coordinator is told the attempt failed), and an attempt the
coordinator no longer knows (it restarted, or the commit deadline passed: dropped when the
report is refused). A save whose agent died before the hand-off finished was never
journaled; it fails for its rank, as it always did.
"""

from __future__ import annotations

import logging
import mmap
import pathlib
import threading
from typing import Callable

from layervault.agent.journal import JournalError, JournalFile, SaveJournal, StateDir, pending_pieces
from layervault.agent.save_session import SaveSession
from layervault.agent.staging import JOURNAL_SUFFIX, map_pool_readonly, pool_owner_alive
from layervault.errors import InvalidArgumentError

log = logging.getLogger("layervault.agent")

#: Builds and registers the session of a resumed save; ``on_closed`` runs once its outcome is reported.
SessionFactory = Callable[[SaveJournal, JournalFile, "AdoptedPool", Callable[[SaveSession], None]], SaveSession]
#: Tells the coordinator a journaled attempt of this rank failed (best effort).
AbortAttempt = Callable[[SaveJournal, str], None]


class AdoptedPool:
    """A dead agent's staging pool while its journaled saves finish.

    Mapped read-only, and only if some piece still has to be uploaded from it. Nothing is
    allocated from it, so ``free`` has nothing to do. Deleted with its hold link and
    journal folder when its last user lets go.
    """

    def __init__(self, state: StateDir, path: pathlib.Path) -> None:
        self.state = state
        self.path = path
        self.size = 0
        self.view: memoryview | None = None
        self._mmap: mmap.mmap | None = None
        self._users = 1  # the scan itself, until every journal of the folder has been looked at
        self._lock = threading.Lock()

    def map(self, size: int) -> None:
        """Map the pool (raises OSError or InvalidArgumentError when its bytes are gone)."""
        if self.view is None:
            self._mmap, self.view = map_pool_readonly(str(self.path), size)
            self.size = size

    def free(self, offset: int, length: int) -> None:
        """Extents of a dead agent's pool are never handed out again."""

    def acquire(self) -> None:
        with self._lock:
            self._users += 1

    def release(self, session: SaveSession | None = None) -> None:
        if session is not None and session.error is not None:
            log.warning("%s: the resumed save did not commit: %s", session.label, session.error)
        with self._lock:
            self._users -= 1
            if self._users:
                return
        if self.view is not None:
            self.view.release()
            try:
                self._mmap.close()  # type: ignore[union-attr]
            except BufferError:
                pass  # a slice is still referenced; the mapping goes when it does
        self.path.unlink(missing_ok=True)
        self.state.release(self.path)
        log.info("pool %s of an earlier agent process released", self.path.name)


def resume_saves(state: StateDir, live_pool: pathlib.Path, new_session: SessionFactory, abort: AbortAttempt) -> int:
    """Resume every journaled save in ``state``; returns how many were resumed."""
    resumed = 0
    for folder in state.pool_folders():
        pool_path = state.pool_of(folder)
        if pool_path == live_pool:
            continue
        if pool_path.exists() and pool_owner_alive(pool_path):
            log.warning("journals in %s belong to pool %s of a running agent; left alone", folder, pool_path)
            continue
        pool = AdoptedPool(state, pool_path)
        try:
            for path in sorted(folder.glob("*" + JOURNAL_SUFFIX)):
                resumed += _resume_one(JournalFile(path), pool, new_session, abort)
        finally:
            pool.release()
    return resumed


def _resume_one(journal: JournalFile, pool: AdoptedPool, new_session: SessionFactory, abort: AbortAttempt) -> int:
    try:
        plan, durable = journal.read()
        if plan.pool_path != str(pool.path):
            raise JournalError(f"journal {journal.path} names pool {plan.pool_path}, but lies in the folder of {pool.path}")
    except JournalError as exc:
        log.error("%s; skipped and deleted: that save is not resumed", exc)
        journal.remove()
        return 0
    todo = pending_pieces(plan, durable)
    if todo:
        try:
            pool.map(plan.pool_size)
        except (OSError, InvalidArgumentError) as exc:
            reason = (f"the agent restarted and the staged bytes of {len(todo)} pieces are gone "
                      f"(pool {pool.path}: {exc.strerror if isinstance(exc, OSError) else exc})")
            log.warning("%s: not resumed: %s; the save fails", plan.label, reason)
            abort(plan, reason)
            journal.remove()
            return 0
    plan.generation += 1  # before any upload: a second restart must not reuse this one's chunk keys
    try:
        journal.reopen_log()
    except OSError as exc:
        log.error("%s: not resumed: cannot append to %s: %s", plan.label, journal.durable_path, exc)
        abort(plan, f"the agent restarted and could not reopen its journal: {exc}")
        journal.remove()
        return 0
    if not journal.write(plan):
        abort(plan, "the agent restarted and could not rewrite its journal")
        return 0
    pool.acquire()
    try:
        session = new_session(plan, journal, pool, pool.release)
    except InvalidArgumentError as exc:  # e.g. the job token it was saved with is gone
        pool.release()
        log.warning("%s: not resumed: %s; the save fails", plan.label, exc)
        abort(plan, f"the agent restarted and could not resume the save: {exc}")
        journal.remove()
        return 0
    try:
        uploads = session.resume(plan, durable)
    except Exception as exc:  # noqa: BLE001 - one bad journal must not keep the agent from starting
        log.exception("%s: resuming failed", plan.label)
        session.abort(f"the agent restarted and could not resume the save: {exc}")
        return 0
    log.info("%s: resumed after an agent restart: %d chunks already durable, %d of %d pieces to upload",
             plan.label, len({(c.entry, c.ref.raw_offset) for c in durable}), uploads, len(plan.pieces))
    return 1
