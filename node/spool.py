"""The spool: the only owner of the directory layout under ``storage.data_dir``.

Layout (every name is derived from a SHA-256, never from a received value, so no UID such as
``1.2.3/../../x`` can name a path)::

    data_dir/
      spool/tmp/<random>.part             temp receive files (swept at start-up)
      spool/instances/<h[:2]>/<h>.dcm     h = sha256(SOP Instance UID), Part 10 file as received
      quarantine/<h>.dcm + <h>.reason     files the indexer could not use, with the reason
      index.sqlite3                       the index (node.db)

Because the final name depends only on the SOP Instance UID, a re-sent instance is recognised from
the spool alone (no SQL in the receive path): identical bytes, changed content, or another study.

Durability (issue 2 item 3): write the temp file, fsync it, rename it into place, fsync the folder;
only then may the caller answer success. Every OSError becomes a `SpoolError` (transient, 0xA700).
This module does not parse more than the Study Instance UID of an already stored copy, and never logs
attribute values.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from node.errors import (
    ChangedContentRejectedError,
    ConflictingStudyError,
    HeaderError,
    SpoolError,
    SpoolFullError,
)
from node.records import StoreOutcome, StoreStatus

log = logging.getLogger(__name__)

SPOOL_DIR = "spool"
TMP_DIR = "spool/tmp"
INSTANCES_DIR = "spool/instances"
QUARANTINE_DIR = "quarantine"
DATABASE_NAME = "index.sqlite3"
_SUFFIX = ".dcm"


def uid_hash(uid: str) -> str:
    """Hex SHA-256 of a UID (ASCII); the only way a UID ever influences a file name."""
    return hashlib.sha256(uid.encode("ascii", "replace")).hexdigest()


class Spool:
    """Durable, hash-named storage of received instances under ``data_dir``.

    Parameters
    ----------
    data_dir
        ``storage.data_dir``.
    fsync
        ``storage.fsync``: fsync files and folders before a store returns.
    min_free_mb
        ``storage.min_free_mb``: below this many MiB free, `check_free_space` raises.
    on_changed_content
        ``receiver.on_changed_content``: ``keep_newest``, ``keep_first`` or ``reject``.
    """

    def __init__(self, data_dir: Path, *, fsync: bool = True, min_free_mb: int = 0,
                 on_changed_content: str = "keep_newest") -> None:
        self.data_dir = Path(data_dir).resolve()
        self.fsync = fsync
        self.min_free_mb = min_free_mb
        self.on_changed_content = on_changed_content
        self._counter = itertools.count()

    # -- layout ------------------------------------------------------------------------------
    @property
    def database_path(self) -> Path:
        return self.data_dir / DATABASE_NAME

    def prepare(self) -> None:
        """Create the folder tree (idempotent) and make the new folders durable.

        Raises
        ------
        SpoolError
            A folder cannot be created.
        """
        try:
            for sub in (TMP_DIR, INSTANCES_DIR, QUARANTINE_DIR):
                (self.data_dir / sub).mkdir(parents=True, exist_ok=True)
            base = self.data_dir / INSTANCES_DIR
            for i in range(256):
                (base / f"{i:02x}").mkdir(exist_ok=True)
            if self.fsync:
                for d in (base, self.data_dir / SPOOL_DIR, self.data_dir):
                    _fsync_dir(d)
        except OSError as exc:
            raise SpoolError(f"spool folders under {self.data_dir} cannot be created ({exc.strerror})") from exc

    def relative_path_for(self, sop_instance_uid: str) -> str:
        """Path of an instance's file relative to ``data_dir`` (POSIX separators)."""
        h = uid_hash(sop_instance_uid)
        return f"{INSTANCES_DIR}/{h[:2]}/{h}{_SUFFIX}"

    def absolute(self, relative_path: str) -> Path:
        """Resolve a path this module produced; refuses anything that would leave ``data_dir``."""
        path = (self.data_dir / relative_path).resolve()
        if not path.is_relative_to(self.data_dir):
            raise ValueError("path outside the data directory")
        return path

    def iter_instance_paths(self) -> Iterator[str]:
        """Relative paths of every stored instance file (for start-up reconciliation)."""
        base = self.data_dir / INSTANCES_DIR
        if not base.is_dir():
            return
        for sub in sorted(base.iterdir()):
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub):
                if entry.is_file() and entry.name.endswith(_SUFFIX):
                    yield f"{INSTANCES_DIR}/{sub.name}/{entry.name}"

    # -- checks ------------------------------------------------------------------------------
    def free_mb(self) -> float:
        """Free space on the data disk for unprivileged writers, in MiB."""
        st = os.statvfs(self.data_dir)
        return st.f_bavail * st.f_frsize / 1048576.0

    def check_free_space(self) -> None:
        """Raise `SpoolFullError` when less than ``min_free_mb`` MiB are free (or `SpoolError`)."""
        if self.min_free_mb <= 0:
            return
        try:
            free = self.free_mb()
        except OSError as exc:
            raise SpoolError(f"cannot read free space of {self.data_dir} ({exc.strerror})") from exc
        if free < self.min_free_mb:
            raise SpoolFullError(f"free space {free:.0f} MiB is below storage.min_free_mb={self.min_free_mb}")

    # -- store -------------------------------------------------------------------------------
    def store(self, sop_instance_uid: str, study_instance_uid: str, data: bytes) -> tuple[StoreOutcome, str]:
        """Store one encoded Part 10 file durably under its hashed name.

        Parameters
        ----------
        sop_instance_uid, study_instance_uid
            From the already validated header of ``data``.
        data
            Preamble, file meta and dataset exactly as received.

        Returns
        -------
        (outcome, relative_path)

        Raises
        ------
        SpoolError
            Any file-system failure (transient).
        ConflictingStudyError
            The SOP Instance UID is stored under another study (0xC020).
        ChangedContentRejectedError
            Changed content and policy ``reject`` (0xC021).
        """
        rel = self.relative_path_for(sop_instance_uid)
        final = self.data_dir / rel
        outcome = StoreOutcome.NEW
        try:
            existing_size = final.stat().st_size
        except FileNotFoundError:
            existing_size = -1
        except OSError as exc:
            raise SpoolError(f"cannot inspect spool file ({exc.strerror})") from exc
        if existing_size >= 0:
            outcome = self._classify_resend(final, existing_size, study_instance_uid, data)
            if outcome in (StoreOutcome.IDENTICAL, StoreOutcome.KEPT_FIRST):
                # The stored copy may come from a process that crashed between its rename and the
                # folder fsync: make the entry durable before this re-send is acknowledged.
                if self.fsync:
                    try:
                        _fsync_dir(final.parent)
                    except OSError as exc:
                        raise SpoolError(f"cannot sync spool folder ({exc.strerror})") from exc
                return outcome, rel
        self._write_durably(final, data)
        return outcome, rel

    def _classify_resend(self, final: Path, existing_size: int, study_instance_uid: str, data: bytes) -> StoreOutcome:
        try:
            existing = final.read_bytes() if existing_size == len(data) else None
        except OSError as exc:
            raise SpoolError(f"cannot read stored copy ({exc.strerror})") from exc
        if existing is not None and existing == data:
            return StoreOutcome.IDENTICAL
        from node.header import parse_header  # local: only the rare re-send path needs it

        try:
            stored_study = parse_header(final).study_instance_uid
        except HeaderError:
            stored_study = None  # an unusable stored copy never blocks a better one
        except OSError as exc:
            raise SpoolError(f"cannot read stored copy ({exc.strerror})") from exc
        if stored_study is not None and stored_study != study_instance_uid:
            raise ConflictingStudyError(
                StoreStatus.INSTANCE_OF_OTHER_STUDY, "StudyInstanceUID",
                "SOP Instance UID is already stored under another Study Instance UID",
            )
        if self.on_changed_content == "keep_first":
            return StoreOutcome.KEPT_FIRST
        if self.on_changed_content == "reject":
            raise ChangedContentRejectedError(
                StoreStatus.CHANGED_CONTENT_REJECTED, "SOPInstanceUID",
                "changed content for a stored SOP Instance UID (receiver.on_changed_content = reject)",
            )
        return StoreOutcome.REPLACED

    def _write_durably(self, final: Path, data: bytes) -> None:
        tmp = self.data_dir / TMP_DIR / f"{os.getpid()}-{threading.get_ident()}-{next(self._counter)}.part"
        fd = -1
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            if self.fsync:
                os.fdatasync(fd)
            os.close(fd)
            fd = -1
            os.replace(tmp, final)
            if self.fsync:
                _fsync_dir(final.parent)
        except OSError as exc:
            if fd >= 0:
                os.close(fd)
            try:
                tmp.unlink()
            except OSError:
                pass
            raise SpoolError(f"cannot write spool file ({exc.strerror or exc})") from exc

    def remove_new(self, relative_path: str) -> None:
        """Undo a NEW store whose hand-off failed, so a later re-send is stored again (best effort)."""
        try:
            self.absolute(relative_path).unlink()
        except OSError:
            log.warning("event=spool_undo_failed path=%s", relative_path)

    # -- maintenance -------------------------------------------------------------------------
    def sweep_temp(self) -> int:
        """Delete leftover temp files (interrupted receives); return how many were removed."""
        removed = 0
        tmp = self.data_dir / TMP_DIR
        if not tmp.is_dir():
            return 0
        for entry in os.scandir(tmp):
            try:
                os.unlink(entry.path)
                removed += 1
            except OSError as exc:
                log.warning("event=temp_sweep_failed file=%s error=%s", entry.name, exc.strerror)
        return removed

    def quarantine(self, relative_path: str, reason: str) -> str:
        """Move an unusable file to ``quarantine/`` with a ``.reason`` file; return the new relative path."""
        src = self.absolute(relative_path)
        name = src.name if src.name.endswith(_SUFFIX) else uid_hash(relative_path) + _SUFFIX
        dst_rel = f"{QUARANTINE_DIR}/{name}"
        dst = self.data_dir / dst_rel
        try:
            (self.data_dir / QUARANTINE_DIR).mkdir(parents=True, exist_ok=True)
            dst.with_suffix(".reason").write_text(reason + "\n", encoding="utf-8")
            os.replace(src, dst)
            if self.fsync:
                _fsync_dir(dst.parent)
                _fsync_dir(src.parent)
        except OSError as exc:
            raise SpoolError(f"cannot quarantine {relative_path} ({exc.strerror})") from exc
        return dst_rel


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
