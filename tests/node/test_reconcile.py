"""Start-up reconciliation of the index with the spool (the spool is the truth)."""

from __future__ import annotations

import io

from node.db import connect
from node.indexer import reconcile
from node.migrations import migrate
from node.spool import Spool
from node.state import get_status
from tests.node.conftest import make_series


def _encoded(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _spool_and_db(tmp_path):
    spool = Spool(tmp_path / "data", fsync=False)
    spool.prepare()
    db = connect(spool.database_path)
    migrate(db)
    return spool, db


def test_reconcile_indexes_spool_files_the_index_lacks(tmp_path):
    spool, db = _spool_and_db(tmp_path)
    for ds in make_series(3):
        spool.store(ds.SOPInstanceUID, ds.StudyInstanceUID, _encoded(ds))
    report = reconcile(spool, db)
    assert report.indexed == 3
    assert get_status(db).instances == 3
    assert reconcile(spool, db).indexed == 0  # idempotent: indexed exactly once


def test_reconcile_flags_and_logs_rows_whose_files_vanished(tmp_path, caplog):
    spool, db = _spool_and_db(tmp_path)
    series = make_series(2)
    for ds in series:
        spool.store(ds.SOPInstanceUID, ds.StudyInstanceUID, _encoded(ds))
    reconcile(spool, db)
    spool.absolute(spool.relative_path_for(series[0].SOPInstanceUID)).unlink()
    report = reconcile(spool, db)
    assert report.missing == 1
    assert get_status(db).missing_files == 1
    assert f"event=instance_file_missing sop_instance_uid={series[0].SOPInstanceUID}" in caplog.text


def test_reconcile_removes_leftover_temp_files(tmp_path):
    spool, db = _spool_and_db(tmp_path)
    (spool.data_dir / "spool" / "tmp" / "123-4-5.part").write_bytes(b"half a file")
    assert reconcile(spool, db).temp_removed == 1
    assert list((spool.data_dir / "spool" / "tmp").iterdir()) == []


def test_reconcile_quarantines_unusable_files_with_the_reason(tmp_path):
    spool, db = _spool_and_db(tmp_path)
    bogus = spool.data_dir / spool.relative_path_for("1.2.3.4")
    bogus.write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    report = reconcile(spool, db)
    assert report.quarantined == 1
    assert not bogus.exists()
    reasons = list((spool.data_dir / "quarantine").glob("*.reason"))
    assert len(reasons) == 1 and reasons[0].read_text().strip()
    assert get_status(db).quarantined == 1
