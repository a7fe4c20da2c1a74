"""SQLite connections for the index: WAL, busy_timeout, foreign keys; one connection per thread.

Only `node.state` and `node.migrations` run SQL on these connections. ``synchronous=NORMAL`` is safe
with WAL: the spool, not the index, is the durable record of what was received, and start-up
reconciliation re-indexes anything a power cut took from the last transactions.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import sqlite_utils

BUSY_TIMEOUT_MS = 10_000


def connect(path: Path, *, read_only: bool = False) -> sqlite_utils.Database:
    """Open the index database.

    Parameters
    ----------
    path
        ``data_dir/index.sqlite3``.
    read_only
        Open with ``mode=ro`` (for ``edge-node status``); the file must exist.
    """
    if read_only:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000,
                               check_same_thread=False)
    else:
        conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False,
                               isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    if not read_only:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = ON")
    return sqlite_utils.Database(conn)
