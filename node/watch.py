"""The watched import folder: a second way in besides C-STORE (``[import]`` in the config).

A watchdog observer notes every file created, modified or moved into ``import.dir`` (recursively);
a settle thread takes a file once its size and mtime have not changed for ``import.settle_seconds``
(a copy in progress is never taken half-written), stores it through the spool exactly like a C-STORE
(same checks, same durability), hands the same `ReceivedFile` to the indexer (calling AE ``IMPORT``)
and only then deletes the source file. Files that cannot be used are moved to ``import.dir/.rejected/``
with a ``.reason`` file; transient trouble (spool, disk, queue) leaves the file in place for a later
try. Files already in the folder at start-up are picked up too.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from node.errors import RejectedInstanceError, TransientStoreError
from node.handlers import Receiver

log = logging.getLogger(__name__)

IMPORT_CALLING_AE = "IMPORT"
REJECTED_DIR = ".rejected"


class ImportWatcher:
    """Watch ``folder`` and feed settled files to ``receiver``.

    Parameters
    ----------
    folder
        ``import.dir`` (created when missing).
    receiver
        The same store path the SCP uses.
    settle_seconds
        ``import.settle_seconds``: how long size and mtime must stay unchanged.
    """

    def __init__(self, folder: Path, receiver: Receiver, settle_seconds: float) -> None:
        self.folder = Path(folder).resolve()
        self.receiver = receiver
        self.settle_seconds = settle_seconds
        self._seen: dict[Path, tuple[int, int, float]] = {}  # path -> (size, mtime_ns, first seen unchanged)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="import-settle", daemon=True)
        self._observer: Any = None
        self.imported = 0

    def start(self) -> None:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        watcher = self

        class _Handler(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                if event.is_directory:
                    return
                path = getattr(event, "dest_path", "") or event.src_path
                watcher.note(Path(os.fsdecode(path)))

        self.folder.mkdir(parents=True, exist_ok=True)
        self._observer = Observer()
        self._observer.schedule(_Handler(), str(self.folder), recursive=True)
        self._observer.start()
        self.rescan()
        self._thread.start()
        log.info("event=import_watching dir=%s settle_seconds=%s", self.folder, self.settle_seconds)

    def stop(self) -> None:
        self._stop.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(10)
        self._thread.join(10)

    def note(self, path: Path) -> None:
        """Remember a candidate file (called from the observer thread)."""
        if not path.is_relative_to(self.folder) or REJECTED_DIR in path.relative_to(self.folder).parts:
            return
        with self._lock:
            self._seen.setdefault(path, (-1, -1, 0.0))

    def rescan(self) -> None:
        """Note every file currently in the folder (start-up, and as a safety net for missed events)."""
        for root, dirs, files in os.walk(self.folder):
            dirs[:] = [d for d in dirs if d != REJECTED_DIR]
            for name in files:
                self.note(Path(root) / name)

    def _run(self) -> None:
        last_rescan = time.monotonic()
        while not self._stop.wait(min(0.5, max(self.settle_seconds / 2, 0.05))):
            try:
                if time.monotonic() - last_rescan > 30:
                    self.rescan()
                    last_rescan = time.monotonic()
                for path in self._settled():
                    self._import(path)
            except Exception as exc:  # outermost loop of the thread
                log.error("event=import_failed error_type=%s", type(exc).__name__)

    def _settled(self) -> list[Path]:
        now = time.monotonic()
        ready = []
        with self._lock:
            for path, (size, mtime, since) in list(self._seen.items()):
                try:
                    st = path.stat()
                except FileNotFoundError:
                    del self._seen[path]
                    continue
                if (st.st_size, st.st_mtime_ns) != (size, mtime):
                    self._seen[path] = (st.st_size, st.st_mtime_ns, now)
                elif now - since >= self.settle_seconds:
                    ready.append(path)
        return ready

    def _import(self, path: Path) -> None:
        try:
            data = path.read_bytes()
            if data[128:132] != b"DICM":
                raise RejectedInstanceError(0, "", "not a DICOM Part 10 file (no DICM prefix)")
            self.receiver.receive_instance(data, _sop_instance_uid(data), IMPORT_CALLING_AE)
        except TransientStoreError as exc:
            log.warning("event=import_deferred reason=%s", type(exc).__name__)
            return  # stays noted; tried again at the next tick
        except RejectedInstanceError as exc:
            self._reject(path, f"{exc.attribute or 'file'}: {exc}")
            return
        except OSError as exc:
            log.warning("event=import_unreadable file=%s error=%s", path.name, exc.strerror)
            with self._lock:
                self._seen.pop(path, None)
            return
        path.unlink(missing_ok=True)
        with self._lock:
            self._seen.pop(path, None)
        self.imported += 1

    def _reject(self, path: Path, reason: str) -> None:
        target_dir = self.folder / REJECTED_DIR
        target_dir.mkdir(exist_ok=True)
        target = target_dir / path.name
        os.replace(path, target)
        target.with_name(target.name + ".reason").write_text(reason + "\n", encoding="utf-8")
        with self._lock:
            self._seen.pop(path, None)
        log.warning("event=import_rejected file=%s reason=%r", path.name, reason)


def _sop_instance_uid(data: bytes) -> str:
    """The SOP Instance UID the file itself declares (its header, parsed by the receiver, must agree)."""
    from node.header import parse_header

    return parse_header(data).sop_instance_uid
