"""All SQL of the receiver: recording instances, study generations, completion with jobs, status reads.

Every state transition is a conditional UPDATE (``... WHERE state = ? AND generation = ?``) that raises
`StateTransitionError` when it matches no row, so a race is loud, never silent. Each write function runs
in one ``BEGIN IMMEDIATE`` transaction. Nothing here touches files or pynetdicom.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import sqlite_utils

from node.completion import SeriesPlan, plan_series
from node.errors import StateTransitionError
from node.records import (
    STUDY_TRANSITIONS,
    JobRecord,
    JobState,
    ReceivedFile,
    SeriesSummary,
    StoreOutcome,
    StudySnapshot,
    StudyState,
)


@contextmanager
def transaction(db: sqlite_utils.Database) -> Iterator[sqlite_utils.Database]:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` (``ROLLBACK`` on any exception)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


@dataclass(frozen=True, slots=True)
class StudyEvent:
    """A study-level event to log after the transaction committed."""

    event: str
    study_instance_uid: str
    generation: int


def _check_study_transition(current: StudyState, target: StudyState) -> None:
    if target not in STUDY_TRANSITIONS[current]:
        raise StateTransitionError(f"study transition {current} -> {target} is not allowed")


def record_instances(db: sqlite_utils.Database, batch: Sequence[ReceivedFile]) -> list[StudyEvent]:
    """Upsert instances, their series and studies; re-open dispatched studies as a new generation.

    A byte-identical re-send (`StoreOutcome.IDENTICAL`/``KEPT_FIRST``) of an indexed instance changes
    nothing (its timers included); of an unindexed one (lost in a crash) it is indexed like a new one.

    Returns
    -------
    list of StudyEvent
        ``study_received`` for new studies, ``study_reopened`` for re-opened ones.

    Raises
    ------
    StateTransitionError
        A concurrent writer changed a study between our read and our conditional UPDATE.
    """
    events: list[StudyEvent] = []
    now = time.time()
    with transaction(db):
        for rec in batch:
            h = rec.header
            if rec.outcome in (StoreOutcome.IDENTICAL, StoreOutcome.KEPT_FIRST):
                row = db.execute("SELECT file_missing FROM instances WHERE sop_instance_uid = ?",
                                 [h.sop_instance_uid]).fetchone()
                if row is not None:
                    if row[0]:
                        db.execute("UPDATE instances SET file_missing = 0 WHERE sop_instance_uid = ?",
                                   [h.sop_instance_uid])
                    continue
            generation = _touch_study(db, h.study_instance_uid, rec.received_at, now, events)
            db.execute(
                """INSERT INTO series (series_instance_uid, study_instance_uid, modality, body_part_examined,
                       series_description, series_number, first_received_at, last_received_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT(series_instance_uid) DO UPDATE SET
                       last_received_at = max(last_received_at, excluded.last_received_at)""",
                [h.series_instance_uid, h.study_instance_uid, h.modality, h.body_part_examined,
                 h.series_description, h.series_number, rec.received_at, rec.received_at],
            )
            position = None if h.image_position_patient is None else "\\".join(
                repr(float(v)) for v in h.image_position_patient)
            db.execute(
                """INSERT INTO instances (sop_instance_uid, series_instance_uid, study_instance_uid,
                       sop_class_uid, transfer_syntax_uid, generation, modality, body_part_examined,
                       series_description, image_type, slice_thickness_mm, instance_number,
                       image_position_patient, rows, columns, number_of_frames, has_pixel_data,
                       size_bytes, path, received_at, calling_ae_title, file_missing)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0)
                   ON CONFLICT(sop_instance_uid) DO UPDATE SET
                       series_instance_uid = excluded.series_instance_uid,
                       sop_class_uid = excluded.sop_class_uid,
                       transfer_syntax_uid = excluded.transfer_syntax_uid,
                       generation = excluded.generation, modality = excluded.modality,
                       body_part_examined = excluded.body_part_examined,
                       series_description = excluded.series_description, image_type = excluded.image_type,
                       slice_thickness_mm = excluded.slice_thickness_mm,
                       instance_number = excluded.instance_number,
                       image_position_patient = excluded.image_position_patient, rows = excluded.rows,
                       columns = excluded.columns, number_of_frames = excluded.number_of_frames,
                       has_pixel_data = excluded.has_pixel_data, size_bytes = excluded.size_bytes,
                       path = excluded.path, received_at = excluded.received_at,
                       calling_ae_title = excluded.calling_ae_title, file_missing = 0""",
                [h.sop_instance_uid, h.series_instance_uid, h.study_instance_uid, h.sop_class_uid,
                 h.transfer_syntax_uid, generation, h.modality, h.body_part_examined, h.series_description,
                 h.image_type, h.slice_thickness_mm, h.instance_number, position, h.rows, h.columns,
                 h.number_of_frames, int(h.has_pixel_data), rec.size_bytes, rec.relative_path,
                 rec.received_at, rec.calling_ae_title],
            )
    return events


def _touch_study(db: sqlite_utils.Database, study_uid: str, received_at: float, now: float,
                 events: list[StudyEvent]) -> int:
    row = db.execute("SELECT state, generation FROM studies WHERE study_instance_uid = ?", [study_uid]).fetchone()
    if row is None:
        db.execute(
            """INSERT INTO studies (study_instance_uid, state, generation, first_received_at,
                   generation_started_at, last_received_at, updated_at)
               VALUES (?, ?, 1, ?, ?, ?, ?)""",
            [study_uid, StudyState.RECEIVING.value, received_at, received_at, received_at, now],
        )
        events.append(StudyEvent("study_received", study_uid, 1))
        return 1
    state, generation = StudyState(row[0]), int(row[1])
    if state is StudyState.RECEIVING:
        db.execute(
            """UPDATE studies SET last_received_at = max(last_received_at, ?), updated_at = ?
               WHERE study_instance_uid = ? AND state = ?""",
            [received_at, now, study_uid, StudyState.RECEIVING.value],
        )
        return generation
    _check_study_transition(state, StudyState.RECEIVING)
    # A late instance (arrival now, whatever its file time) re-opens the study as a new generation.
    start = max(received_at, now)
    cur = db.execute(
        """UPDATE studies SET state = ?, generation = generation + 1, generation_started_at = ?,
               last_received_at = ?, completed_at = NULL, completion_reason = NULL, updated_at = ?
           WHERE study_instance_uid = ? AND state = ? AND generation = ?""",
        [StudyState.RECEIVING.value, start, start, now, study_uid, state.value, generation],
    )
    if cur.rowcount != 1:
        raise StateTransitionError(f"study re-open raced (generation {generation})")
    events.append(StudyEvent("study_reopened", study_uid, generation + 1))
    return generation + 1


def list_receiving_studies(db: sqlite_utils.Database) -> list[StudySnapshot]:
    """Snapshots of every study generation in RECEIVING, with its current instance count."""
    rows = db.execute(
        """SELECT s.study_instance_uid, s.generation, s.generation_started_at, s.last_received_at,
                  (SELECT count(*) FROM instances i WHERE i.study_instance_uid = s.study_instance_uid
                       AND i.generation = s.generation AND i.file_missing = 0)
           FROM studies s WHERE s.state = ?""",
        [StudyState.RECEIVING.value],
    ).fetchall()
    return [StudySnapshot(r[0], int(r[1]), float(r[2]), float(r[3]), int(r[4])) for r in rows]


@dataclass(frozen=True, slots=True)
class CompletionOutcome:
    """What `complete_study` created: job ids and the skipped series with reasons."""

    job_ids: tuple[int, ...]
    skipped: tuple[SeriesPlan, ...]


def complete_study(db: sqlite_utils.Database, snapshot: StudySnapshot, reason: str) -> CompletionOutcome:
    """Mark a generation DISPATCHED and create its jobs (one per image series) in one transaction.

    The UPDATE is conditional on the snapshot's generation *and* last arrival time, so an instance
    indexed after the snapshot was taken makes it fail instead of completing a study too early.

    Raises
    ------
    StateTransitionError
        The study is no longer in the snapshot's state (retry at the next tick).
    """
    now = time.time()
    with transaction(db):
        cur = db.execute(
            """UPDATE studies SET state = ?, completed_at = ?, completion_reason = ?, updated_at = ?
               WHERE study_instance_uid = ? AND state = ? AND generation = ? AND last_received_at = ?""",
            [StudyState.DISPATCHED.value, now, reason, now, snapshot.study_instance_uid,
             StudyState.RECEIVING.value, snapshot.generation, snapshot.last_received_at],
        )
        if cur.rowcount != 1:
            raise StateTransitionError("study changed since its snapshot; completion deferred")
        rows = db.execute(
            """SELECT series_instance_uid, max(modality), count(*), sum(has_pixel_data), max(number_of_frames)
               FROM instances WHERE study_instance_uid = ? AND generation = ? AND file_missing = 0
               GROUP BY series_instance_uid""",
            [snapshot.study_instance_uid, snapshot.generation],
        ).fetchall()
        plans = plan_series(SeriesSummary(r[0], r[1] or "", int(r[2]), int(r[3] or 0), int(r[4] or 1)) for r in rows)
        job_ids = []
        skipped = []
        for plan in plans:
            if plan.skip_reason is None:
                cur = db.execute(
                    """INSERT INTO jobs (study_instance_uid, series_instance_uid, generation, state,
                           created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)""",
                    [snapshot.study_instance_uid, plan.series_instance_uid, snapshot.generation,
                     JobState.PENDING.value, now, now],
                )
                job_ids.append(int(cur.lastrowid))
            else:
                db.execute(
                    """INSERT OR REPLACE INTO skipped_series (series_instance_uid, study_instance_uid,
                           generation, reason, created_at) VALUES (?, ?, ?, ?, ?)""",
                    [plan.series_instance_uid, snapshot.study_instance_uid, snapshot.generation,
                     plan.skip_reason.value, now],
                )
                skipped.append(plan)
    return CompletionOutcome(tuple(job_ids), tuple(skipped))


def indexed_paths(db: sqlite_utils.Database) -> dict[str, tuple[str, bool]]:
    """``{relative path: (sop_instance_uid, file_missing)}`` of every indexed instance."""
    return {r[0]: (r[1], bool(r[2])) for r in
            db.execute("SELECT path, sop_instance_uid, file_missing FROM instances").fetchall()}


def flag_missing_files(db: sqlite_utils.Database, sop_instance_uids: Sequence[str]) -> int:
    """Flag instances whose spool file vanished (``file_missing = 1``); return how many changed."""
    changed = 0
    with transaction(db):
        for uid in sop_instance_uids:
            changed += db.execute(
                "UPDATE instances SET file_missing = 1 WHERE sop_instance_uid = ? AND file_missing = 0", [uid]
            ).rowcount
    return changed


def record_quarantine(db: sqlite_utils.Database, path: str, reason: str) -> None:
    """Record a quarantined file with its reason."""
    with transaction(db):
        db.execute("INSERT INTO quarantine (path, reason, quarantined_at) VALUES (?, ?, ?)",
                   [path, reason, time.time()])


def transition_job(db: sqlite_utils.Database, job_id: int, from_state: JobState, to_state: JobState,
                   reason: str = "") -> None:
    """Move one job along `node.records.JOB_TRANSITIONS` with a conditional UPDATE.

    Raises
    ------
    StateTransitionError
        The transition is not allowed, or the job is not in ``from_state``.
    """
    from node.records import JOB_TRANSITIONS

    if to_state not in JOB_TRANSITIONS[from_state]:
        raise StateTransitionError(f"job transition {from_state} -> {to_state} is not allowed")
    with transaction(db):
        cur = db.execute(
            "UPDATE jobs SET state = ?, reason = ?, updated_at = ? WHERE job_id = ? AND state = ?",
            [to_state.value, reason, time.time(), job_id, from_state.value],
        )
        if cur.rowcount != 1:
            raise StateTransitionError(f"job {job_id} is not {from_state}")


@dataclass(frozen=True, slots=True)
class StudyStatus:
    """One line of the status table (no patient data)."""

    study_instance_uid: str
    state: str
    generation: int
    modalities: str
    series: int
    instances: int
    last_received_at: float
    completed_at: float | None


@dataclass(frozen=True, slots=True)
class StatusReport:
    """Counts for ``edge-node status``."""

    studies: int
    series: int
    instances: int
    missing_files: int
    quarantined: int
    skipped_series: int
    jobs: dict[str, int] = field(default_factory=dict)
    recent: tuple[StudyStatus, ...] = ()

    def as_json(self) -> dict[str, Any]:
        return {
            "studies": self.studies, "series": self.series, "instances": self.instances,
            "missing_files": self.missing_files, "quarantined": self.quarantined,
            "skipped_series": self.skipped_series, "jobs": dict(self.jobs),
            "recent_studies": [
                {"study_instance_uid": s.study_instance_uid, "state": s.state, "generation": s.generation,
                 "modalities": s.modalities.split("\\") if s.modalities else [], "series": s.series,
                 "instances": s.instances, "last_received_at": s.last_received_at,
                 "completed_at": s.completed_at}
                for s in self.recent
            ],
        }


def get_status(db: sqlite_utils.Database, recent: int = 10) -> StatusReport:
    """Counts of studies, series, instances and jobs by state, plus the most recent studies."""
    one = lambda sql: int(db.execute(sql).fetchone()[0])  # noqa: E731
    jobs = {s.value: 0 for s in JobState}
    for state, n in db.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall():
        jobs[state] = int(n)
    rows = db.execute(
        """SELECT s.study_instance_uid, s.state, s.generation,
                  (SELECT group_concat(DISTINCT modality) FROM series r WHERE r.study_instance_uid = s.study_instance_uid),
                  (SELECT count(*) FROM series r WHERE r.study_instance_uid = s.study_instance_uid),
                  (SELECT count(*) FROM instances i WHERE i.study_instance_uid = s.study_instance_uid AND i.file_missing = 0),
                  s.last_received_at, s.completed_at
           FROM studies s ORDER BY s.last_received_at DESC LIMIT ?""",
        [recent],
    ).fetchall()
    studies = tuple(StudyStatus(r[0], r[1], int(r[2]), (r[3] or "").replace(",", "\\"), int(r[4]), int(r[5]),
                                float(r[6]), r[7]) for r in rows)
    return StatusReport(
        studies=one("SELECT count(*) FROM studies"),
        series=one("SELECT count(*) FROM series"),
        instances=one("SELECT count(*) FROM instances WHERE file_missing = 0"),
        missing_files=one("SELECT count(*) FROM instances WHERE file_missing = 1"),
        quarantined=one("SELECT count(*) FROM quarantine"),
        skipped_series=one("SELECT count(*) FROM skipped_series"),
        jobs=jobs,
        recent=studies,
    )


# -- jobs, for the analysis worker ---------------------------------------------------------------
_JOB_COLUMNS = ("job_id, study_instance_uid, series_instance_uid, generation, state, attempts, created_at, "
                "updated_at, reason")


def _job(row: Sequence[Any]) -> JobRecord:
    return JobRecord(int(row[0]), row[1], row[2], int(row[3]), JobState(row[4]), int(row[5]), float(row[6]),
                     float(row[7]), row[8] or "")


def claim_next_job(db: sqlite_utils.Database) -> JobRecord | None:
    """Atomically take the oldest PENDING job (PENDING → RUNNING, attempts + 1); ``None`` when there is none.

    Safe with several workers: the claim is a conditional UPDATE inside ``BEGIN IMMEDIATE``.
    """
    now = time.time()
    with transaction(db):
        row = db.execute(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state = ? ORDER BY created_at, job_id LIMIT 1",
            [JobState.PENDING.value],
        ).fetchone()
        if row is None:
            return None
        cur = db.execute(
            "UPDATE jobs SET state = ?, attempts = attempts + 1, updated_at = ? WHERE job_id = ? AND state = ?",
            [JobState.RUNNING.value, now, row[0], JobState.PENDING.value],
        )
        if cur.rowcount != 1:
            raise StateTransitionError(f"job {row[0]} was claimed concurrently")
        row = db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE job_id = ?", [row[0]]).fetchone()
    return _job(row)


def mark_job_retry(db: sqlite_utils.Database, job_id: int, reason: str, next_attempt_at: float) -> None:
    """RUNNING → RETRY_WAIT (transient failure), due again at ``next_attempt_at`` (epoch s)."""
    transition_job(db, job_id, JobState.RUNNING, JobState.RETRY_WAIT, reason)
    with transaction(db):
        db.execute("UPDATE jobs SET next_attempt_at = ? WHERE job_id = ?", [next_attempt_at, job_id])


def release_due_retries(db: sqlite_utils.Database, now: float | None = None) -> int:
    """RETRY_WAIT → PENDING for every job whose ``next_attempt_at`` has come; return how many."""
    now = time.time() if now is None else now
    with transaction(db):
        return int(db.execute(
            "UPDATE jobs SET state = ?, updated_at = ? WHERE state = ? AND next_attempt_at <= ?",
            [JobState.PENDING.value, now, JobState.RETRY_WAIT.value, now],
        ).rowcount)


def requeue_running_jobs(db: sqlite_utils.Database) -> int:
    """RUNNING → PENDING for jobs of a worker that died (call at worker start); return how many."""
    with transaction(db):
        return int(db.execute(
            "UPDATE jobs SET state = ?, reason = 'worker restarted', updated_at = ? WHERE state = ?",
            [JobState.PENDING.value, time.time(), JobState.RUNNING.value],
        ).rowcount)


def list_job_instance_paths(db: sqlite_utils.Database, job: JobRecord) -> list[str]:
    """Spool paths (relative to ``data_dir``) of the job's series, files present, by instance number."""
    rows = db.execute(
        """SELECT path FROM instances WHERE series_instance_uid = ? AND generation <= ? AND file_missing = 0
           ORDER BY instance_number, sop_instance_uid""",
        [job.series_instance_uid, job.generation],
    ).fetchall()
    return [r[0] for r in rows]
