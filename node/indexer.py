"""The indexer: one thread, its own connection, batched upserts of `ReceivedFile` records.

It drains the bounded queue fed by the SCP processes (and the import folder), up to `BATCH_SIZE`
records per transaction. At start-up, before any association is accepted, `reconcile` makes the index
agree with the spool, which is the truth of what was received: leftover temp files are removed, spool
files without a row are indexed (their received time is the file's mtime), files that cannot be used are
quarantined with the reason, and rows whose file vanished are flagged ``file_missing`` and logged.
It never writes instance files itself (that is `node.spool`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

from node import state
from node.db import connect
from node.errors import HeaderError
from node.header import parse_header
from node.records import ReceivedFile, StoreOutcome
from node.spool import Spool

log = logging.getLogger(__name__)

BATCH_SIZE = 256


@dataclass(frozen=True, slots=True)
class ReconcileReport:
    """What start-up reconciliation did (counts)."""

    temp_removed: int
    indexed: int
    quarantined: int
    missing: int


def _log_study_events(events: list[state.StudyEvent]) -> None:
    for e in events:
        log.info("event=%s study_instance_uid=%s generation=%d", e.event, e.study_instance_uid, e.generation)


def reconcile(spool: Spool, db: Any) -> ReconcileReport:
    """Make the index agree with the spool (see the module docstring); safe to run at every start."""
    temp_removed = spool.sweep_temp()
    known = state.indexed_paths(db)
    on_disk = set()
    batch: list[ReceivedFile] = []
    quarantined = 0
    indexed = 0
    for rel in spool.iter_instance_paths():
        on_disk.add(rel)
        if rel in known and not known[rel][1]:
            continue
        path = spool.absolute(rel)
        try:
            header = parse_header(path)
            if spool.relative_path_for(header.sop_instance_uid) != rel:
                raise HeaderError(0, "SOPInstanceUID", "file name does not match its SOP Instance UID")
            st = path.stat()
        except HeaderError as exc:
            reason = f"{exc.attribute or 'dataset'}: {exc}"
            qrel = spool.quarantine(rel, reason)
            state.record_quarantine(db, qrel, reason)
            log.warning("event=quarantined path=%s reason=%r", qrel, reason)
            quarantined += 1
            continue
        except OSError as exc:
            log.warning("event=reconcile_unreadable path=%s error=%s", rel, exc.strerror)
            continue
        batch.append(ReceivedFile(header=header, relative_path=rel, size_bytes=st.st_size,
                                  received_at=st.st_mtime, calling_ae_title="", outcome=StoreOutcome.NEW))
        if len(batch) >= BATCH_SIZE:
            _log_study_events(state.record_instances(db, batch))
            indexed += len(batch)
            batch = []
    if batch:
        _log_study_events(state.record_instances(db, batch))
        indexed += len(batch)
    vanished = [uid for rel, (uid, missing) in known.items() if rel not in on_disk and not missing]
    missing = state.flag_missing_files(db, vanished) if vanished else 0
    for uid in vanished:
        log.warning("event=instance_file_missing sop_instance_uid=%s", uid)
    report = ReconcileReport(temp_removed, indexed, quarantined, missing)
    log.info("event=reconciled temp_removed=%d indexed=%d quarantined=%d missing=%d",
             report.temp_removed, report.indexed, report.quarantined, report.missing)
    return report


class Indexer:
    """Consumes ``source`` (a queue of `ReceivedFile`) in a thread until `stop`.

    Parameters
    ----------
    spool
        For the database path.
    source
        A `queue.Queue` or `multiprocessing.Queue`.
    """

    def __init__(self, spool: Spool, source: Any) -> None:
        self.spool = spool
        self.source = source
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="indexer", daemon=True)
        self.indexed = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Index everything still queued, then stop the thread."""
        self._stop.set()
        self._thread.join(timeout)

    def _take_batch(self) -> list[ReceivedFile]:
        try:
            first = self.source.get(timeout=0.2)
        except (queue.Empty, EOFError, OSError):
            return []
        batch = [first]
        while len(batch) < BATCH_SIZE:
            try:
                batch.append(self.source.get_nowait())
            except (queue.Empty, EOFError, OSError):
                break
        return batch

    def _run(self) -> None:
        db = connect(self.spool.database_path)
        try:
            while True:
                batch = self._take_batch()
                if not batch:
                    if self._stop.is_set():
                        return
                    continue
                self._record_with_retry(db, batch)
        finally:
            db.conn.close()

    def _record_with_retry(self, db: Any, batch: list[ReceivedFile]) -> None:
        delay = 0.1
        for attempt in range(1, 6):
            try:
                _log_study_events(state.record_instances(db, batch))
                self.indexed += len(batch)
                return
            except Exception as exc:  # outermost loop of the thread: log, back off, retry
                log.error("event=index_failed attempt=%d instances=%d error_type=%s error=%r", attempt,
                          len(batch), type(exc).__name__, str(exc)[:200])
                time.sleep(delay)
                delay = min(delay * 4, 5.0)
        # The files are in the spool: the next start-up reconciliation indexes them.
        log.error("event=index_gave_up instances=%d action=reconcile_at_next_start", len(batch))
