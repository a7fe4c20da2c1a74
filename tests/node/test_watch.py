"""The watched import folder: settled files are stored and indexed like C-STOREs; bad ones set aside."""

from __future__ import annotations

import queue

from node.handlers import Receiver
from node.scp import ThreadQueueSink
from node.spool import Spool
from node.watch import REJECTED_DIR, ImportWatcher
from tests.node.conftest import make_series, wait_for, write_config, write_datasets


def test_files_dropped_in_the_import_folder_are_spooled_and_removed(tmp_path):
    spool = Spool(tmp_path / "data", fsync=False)
    spool.prepare()
    q: queue.Queue = queue.Queue()
    folder = tmp_path / "import"
    existing = write_datasets(make_series(1), folder / "before")  # present at start-up
    watcher = ImportWatcher(folder, Receiver(spool, ThreadQueueSink(q)), settle_seconds=0.2)
    watcher.start()
    try:
        dropped = write_datasets(make_series(2), folder / "later")
        (folder / "notes.txt").write_text("not DICOM")
        wait_for(lambda: q.qsize() == 3, what="three imported instances")
        wait_for(lambda: (folder / REJECTED_DIR / "notes.txt.reason").exists(), what="the rejected file")
    finally:
        watcher.stop()
    assert not any(p.exists() for p in existing + dropped)
    records = [q.get_nowait() for _ in range(3)]
    assert {r.calling_ae_title for r in records} == {"IMPORT"}
    assert all(spool.absolute(r.relative_path).exists() for r in records)


def test_serve_with_import_enabled_indexes_dropped_files(tmp_path, serve_factory):
    from tests.node.conftest import status_json

    folder = tmp_path / "import"
    config = write_config(tmp_path, **{"import": {"enabled": True, "dir": str(folder), "settle_seconds": 0.2}})
    proc = serve_factory(config)
    write_datasets(make_series(3), folder)
    wait_for(lambda: status_json(config)["instances"] == 3, timeout=20, what="indexed imports")
    assert proc.terminate() == 0
