"""Schema migrations of the index, applied in order and recorded in ``_migrations``.

Each migration is a function of a `sqlite_utils.Database`; a new schema change is a new function
appended to `MIGRATIONS`, never an edit of an applied one. Times are epoch seconds (REAL). The index
holds no patient names, IDs, birth dates or accession numbers.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import sqlite_utils


def _m001_initial(db: sqlite_utils.Database) -> None:
    db.executescript(
        """
        CREATE TABLE studies (
            study_instance_uid TEXT PRIMARY KEY,
            state TEXT NOT NULL,
            generation INTEGER NOT NULL DEFAULT 1,
            first_received_at REAL NOT NULL,
            generation_started_at REAL NOT NULL,
            last_received_at REAL NOT NULL,
            completed_at REAL,
            completion_reason TEXT,
            updated_at REAL NOT NULL
        );
        CREATE INDEX studies_state ON studies(state);
        CREATE TABLE series (
            series_instance_uid TEXT PRIMARY KEY,
            study_instance_uid TEXT NOT NULL REFERENCES studies(study_instance_uid),
            modality TEXT NOT NULL DEFAULT '',
            body_part_examined TEXT NOT NULL DEFAULT '',
            series_description TEXT NOT NULL DEFAULT '',
            series_number INTEGER,
            first_received_at REAL NOT NULL,
            last_received_at REAL NOT NULL
        );
        CREATE INDEX series_study ON series(study_instance_uid);
        CREATE TABLE instances (
            sop_instance_uid TEXT PRIMARY KEY,
            series_instance_uid TEXT NOT NULL REFERENCES series(series_instance_uid),
            study_instance_uid TEXT NOT NULL REFERENCES studies(study_instance_uid),
            sop_class_uid TEXT NOT NULL,
            transfer_syntax_uid TEXT NOT NULL,
            generation INTEGER NOT NULL,
            modality TEXT NOT NULL DEFAULT '',
            body_part_examined TEXT NOT NULL DEFAULT '',
            series_description TEXT NOT NULL DEFAULT '',
            image_type TEXT NOT NULL DEFAULT '',
            slice_thickness_mm REAL,
            instance_number INTEGER,
            image_position_patient TEXT,
            rows INTEGER,
            columns INTEGER,
            number_of_frames INTEGER NOT NULL DEFAULT 1,
            has_pixel_data INTEGER NOT NULL,
            size_bytes INTEGER NOT NULL,
            path TEXT NOT NULL,
            received_at REAL NOT NULL,
            calling_ae_title TEXT NOT NULL DEFAULT '',
            file_missing INTEGER NOT NULL DEFAULT 0
        );
        CREATE INDEX instances_series ON instances(series_instance_uid);
        CREATE INDEX instances_study_generation ON instances(study_instance_uid, generation);
        CREATE TABLE jobs (
            job_id INTEGER PRIMARY KEY AUTOINCREMENT,
            study_instance_uid TEXT NOT NULL REFERENCES studies(study_instance_uid),
            series_instance_uid TEXT NOT NULL REFERENCES series(series_instance_uid),
            generation INTEGER NOT NULL,
            state TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at REAL,
            reason TEXT NOT NULL DEFAULT '',
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            UNIQUE (series_instance_uid, generation)
        );
        CREATE INDEX jobs_state ON jobs(state);
        CREATE TABLE skipped_series (
            series_instance_uid TEXT NOT NULL REFERENCES series(series_instance_uid),
            study_instance_uid TEXT NOT NULL,
            generation INTEGER NOT NULL,
            reason TEXT NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (series_instance_uid, generation)
        );
        CREATE TABLE quarantine (
            quarantine_id INTEGER PRIMARY KEY AUTOINCREMENT,
            path TEXT NOT NULL,
            reason TEXT NOT NULL,
            quarantined_at REAL NOT NULL
        );
        """
    )


MIGRATIONS: list[tuple[str, Callable[[sqlite_utils.Database], None]]] = [
    ("001_initial", _m001_initial),
]


def migrate(db: sqlite_utils.Database) -> list[str]:
    """Apply every migration not yet recorded; return the names applied (in one transaction each)."""
    db.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
    done = {row[0] for row in db.execute("SELECT name FROM _migrations").fetchall()}
    applied = []
    for name, fn in MIGRATIONS:
        if name in done:
            continue
        db.execute("BEGIN IMMEDIATE")
        try:
            # executescript would commit implicitly; run the statements one by one inside our transaction
            fn(_ScriptInTransaction(db))  # type: ignore[arg-type]
            db.execute("INSERT INTO _migrations (name, applied_at) VALUES (?, ?)", [name, time.time()])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        applied.append(name)
    return applied


class _ScriptInTransaction:
    """Adapter giving a migration `executescript` that runs statement by statement (no implicit COMMIT)."""

    def __init__(self, db: sqlite_utils.Database) -> None:
        self._db = db

    def executescript(self, script: str) -> None:
        for statement in script.split(";"):
            if statement.strip():
                self._db.execute(statement)

    def __getattr__(self, name: str) -> object:
        return getattr(self._db, name)
