"""C-STORE/C-ECHO behaviour of the SCP with exact statuses, against an in-process node on 127.0.0.1."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from node.records import StoreStatus
from node.scp import STORAGE_TRANSFER_SYNTAXES, storage_sop_class_uids, supported_contexts
from tests.node.conftest import (
    CT_IMAGE_STORAGE,
    associate_result,
    make_ct,
    make_series,
    send,
    wait_for,
    write_datasets,
)


def test_store_returns_success_and_indexes_every_instance(node):
    series = make_series(4)
    assert send(node.port, series) == [0x0000] * 4
    node.wait_indexed(4)
    assert node.count("SELECT count(*) FROM studies") == 1
    assert node.count("SELECT count(*) FROM series") == 1
    row = node.db().execute(
        "SELECT modality, body_part_examined, series_description, image_type, slice_thickness_mm, "
        "instance_number, image_position_patient, transfer_syntax_uid, size_bytes, calling_ae_title, has_pixel_data "
        "FROM instances WHERE sop_instance_uid = ?", [series[2].SOPInstanceUID]).fetchone()
    assert row[:6] == ("CT", "CHEST", "test chest", "ORIGINAL\\PRIMARY\\AXIAL", 1.0, 3)
    assert row[6] == "-16.0\\-16.0\\2.0"
    assert row[7] == "1.2.840.10008.1.2.1" and row[8] > 8192 and row[9] == "TEST_SCU" and row[10] == 1


def test_stored_file_is_named_by_uid_hash_and_holds_the_received_bytes(node, tmp_path):
    ds = make_ct(generate_uid(), generate_uid(), 0)
    [path] = write_datasets([ds], tmp_path / "src")
    assert send(node.port, [path], raw_files=True) == [0]
    stored = node.spool.absolute(node.spool.relative_path_for(ds.SOPInstanceUID))
    assert stored.name.startswith(node.spool.relative_path_for(ds.SOPInstanceUID).rsplit("/", 1)[1][:8])
    assert ds.SOPInstanceUID not in str(stored)
    assert pydicom.dcmread(stored).PixelData == ds.PixelData


def test_echo_returns_success(node):
    from pynetdicom import AE

    ae = AE(ae_title="TEST_SCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="EDGE_NODE")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_resent_identical_instance_succeeds_and_changes_nothing(node):
    series = make_series(2)
    assert send(node.port, series) == [0, 0]
    node.wait_indexed(2)
    before = node.db().execute("SELECT received_at FROM instances ORDER BY sop_instance_uid").fetchall()
    path = node.spool.absolute(node.spool.relative_path_for(series[0].SOPInstanceUID))
    mtime = path.stat().st_mtime_ns
    assert send(node.port, series) == [0, 0]
    node.wait_indexed(2)
    assert node.db().execute("SELECT received_at FROM instances ORDER BY sop_instance_uid").fetchall() == before
    assert path.stat().st_mtime_ns == mtime


def test_changed_content_keeps_newest_and_logs_it(node, caplog):
    ds = make_ct(generate_uid(), generate_uid(), 0, seed=1)
    changed = make_ct(ds.StudyInstanceUID, ds.SeriesInstanceUID, 0, sop_uid=ds.SOPInstanceUID, seed=2)
    assert send(node.port, [ds]) == [0]
    with caplog.at_level(logging.INFO, logger="node.handlers"):
        assert send(node.port, [changed]) == [0]
    stored = pydicom.dcmread(node.spool.absolute(node.spool.relative_path_for(ds.SOPInstanceUID)))
    assert stored.PixelData == changed.PixelData
    assert "event=instance_replaced" in caplog.text


def test_changed_content_with_reject_policy_returns_c021(node_factory):
    node = node_factory(receiver={"on_changed_content": "reject"})
    ds = make_ct(generate_uid(), generate_uid(), 0, seed=1)
    changed = make_ct(ds.StudyInstanceUID, ds.SeriesInstanceUID, 0, sop_uid=ds.SOPInstanceUID, seed=2)
    assert send(node.port, [ds, changed]) == [0x0000, StoreStatus.CHANGED_CONTENT_REJECTED]
    stored = pydicom.dcmread(node.spool.absolute(node.spool.relative_path_for(ds.SOPInstanceUID)))
    assert stored.PixelData == ds.PixelData


def test_changed_content_with_keep_first_policy_keeps_stored_copy(node_factory):
    node = node_factory(receiver={"on_changed_content": "keep_first"})
    ds = make_ct(generate_uid(), generate_uid(), 0, seed=1)
    changed = make_ct(ds.StudyInstanceUID, ds.SeriesInstanceUID, 0, sop_uid=ds.SOPInstanceUID, seed=2)
    assert send(node.port, [ds, changed]) == [0, 0]
    stored = pydicom.dcmread(node.spool.absolute(node.spool.relative_path_for(ds.SOPInstanceUID)))
    assert stored.PixelData == ds.PixelData


def test_same_sop_instance_uid_under_another_study_returns_c020_and_warns(node, caplog):
    ds = make_ct(generate_uid(), generate_uid(), 0)
    other = make_ct(generate_uid(), generate_uid(), 0, sop_uid=ds.SOPInstanceUID)
    with caplog.at_level(logging.WARNING, logger="node.handlers"):
        assert send(node.port, [ds, other]) == [0x0000, 0xC020]
    assert "attribute=StudyInstanceUID" in caplog.text
    node.wait_indexed(1)
    assert node.db().execute("SELECT study_instance_uid FROM instances").fetchone()[0] == ds.StudyInstanceUID


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize(
    ("keyword", "value", "status"),
    [
        ("StudyInstanceUID", None, 0xC010),
        ("StudyInstanceUID", "1.2.3/../../x", 0xC010),
        ("SeriesInstanceUID", None, 0xC011),
        ("SeriesInstanceUID", "1.2.abc", 0xC011),
    ],
)
def test_missing_or_malformed_uid_returns_c0xx_and_logs_the_attribute(node, caplog, keyword, value, status):
    ds = make_ct(generate_uid(), generate_uid(), 0)
    if value is None:
        delattr(ds, keyword)
    else:
        setattr(ds, keyword, value)
    with caplog.at_level(logging.WARNING, logger="node.handlers"):
        assert send(node.port, [ds]) == [status]
    assert f"attribute={keyword}" in caplog.text
    assert not list(node.spool.iter_instance_paths())


def test_sop_instance_uid_differing_from_command_returns_c013(node, tmp_path):
    from pydicom.filewriter import write_file_meta_info

    ds = make_ct(generate_uid(), generate_uid(), 0)
    [written] = write_datasets([ds], tmp_path / "src")
    _, offset = _split(written)
    meta = ds.file_meta
    meta.MediaStorageSOPInstanceUID = generate_uid()  # becomes the command's Affected SOP Instance UID
    path = tmp_path / "mismatch.dcm"
    with open(path, "wb") as fh:
        fh.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(fh, meta, enforce_standard=True)
        fh.write(written.read_bytes()[offset:])
    assert send(node.port, [path], raw_files=True) == [0xC013]
    assert not list(node.spool.iter_instance_paths())


def _split(path: Path) -> tuple[object, int]:
    from pynetdicom.dsutils import split_dataset

    return split_dataset(path)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_path_traversal_uid_writes_nothing_outside_data_dir(node, tmp_path):
    before = {p for p in tmp_path.rglob("*")}
    data_dir = node.spool.data_dir
    evil = "1.2.3/../../../../x"
    ds = make_ct(generate_uid(), generate_uid(), 0)
    ds.SOPInstanceUID = evil
    ds.file_meta.MediaStorageSOPInstanceUID = evil
    statuses = send(node.port, [ds])
    assert statuses == [0xC012]
    after = {p for p in tmp_path.rglob("*")}
    assert all(p.is_relative_to(data_dir) for p in after - before)
    assert not list(node.spool.iter_instance_paths())


def test_store_returns_a700_when_disk_is_below_min_free_mb(node_factory):
    node = node_factory(storage={"min_free_mb": 1 << 40})
    assert send(node.port, make_series(2)) == [0xA700, 0xA700]
    assert not list(node.spool.iter_instance_paths())


def test_store_returns_a700_when_spool_is_not_writable(node):
    tmp_dir = node.spool.data_dir / "spool" / "tmp"
    for entry in tmp_dir.iterdir():
        entry.unlink()
    tmp_dir.rmdir()
    tmp_dir.write_bytes(b"not a directory")  # every temp file open now fails (ENOTDIR), also as root
    assert send(node.port, make_series(2)) == [0xA700, 0xA700]
    assert not list(node.spool.iter_instance_paths())


def test_store_returns_a700_when_spool_write_raises_oserror(node, monkeypatch):
    class ReadOnlyOs:
        """The spool's view of `os` on a file system that turned read-only (EROFS on rename)."""

        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def replace(src, dst):
            raise OSError(30, "Read-only file system")

    monkeypatch.setattr("node.spool.os", ReadOnlyOs())
    assert send(node.port, make_series(1)) == [0xA700]
    assert not list((node.spool.data_dir / "spool" / "tmp").iterdir())


def test_store_returns_a700_when_indexer_queue_is_full(node_factory):
    node = node_factory(receiver={"queue_size": 1})
    node.indexer.stop()  # nothing drains the queue any more
    series = make_series(3)
    assert send(node.port, series) == [0x0000, 0xA700, 0xA700]
    # the refused instances were not left behind: a re-send later is stored normally
    assert len(list(node.spool.iter_instance_paths())) == 1


def test_unexpected_handler_error_answers_a700_never_c211(node, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("bug")

    monkeypatch.setattr("node.handlers.parse_header", boom)
    assert send(node.port, make_series(1)) == [0xA700]


def test_unknown_calling_ae_is_rejected_and_logged(node, caplog):
    with caplog.at_level(logging.INFO, logger="node.scp"):
        assert associate_result(node.port, calling_ae="INTRUDER") == (False, (0x01, 0x01, 0x03))
        wait_for(lambda: "reason=unknown_calling_ae_title" in caplog.text, what="the rejection log line")
    assert "calling_ae=INTRUDER" in caplog.text


def test_wrong_called_ae_title_is_rejected(node):
    assert associate_result(node.port, called_ae="SOMEBODY_ELSE") == (False, (0x01, 0x01, 0x07))


def test_caller_from_another_host_is_rejected(node_factory):
    node = node_factory(receiver={"allowed_callers": [{"ae_title": "TEST_SCU", "host": "10.1.2.3"}]})
    assert associate_result(node.port) == (False, (0x01, 0x01, 0x03))


def test_caller_from_its_configured_host_is_accepted(node_factory):
    node = node_factory(receiver={"allowed_callers": [{"ae_title": "TEST_SCU", "host": "127.0.0.1"}]})
    assert associate_result(node.port) == (True, None)


def test_accept_any_caller_admits_unknown_ae(node_factory):
    node = node_factory(receiver={"accept_any_caller": True, "allowed_callers": []})
    assert associate_result(node.port, calling_ae="ANYBODY") == (True, None)


def test_association_beyond_max_associations_is_rejected_transient(node_factory):
    from pynetdicom import AE

    node = node_factory(receiver={"max_associations": 1})
    ae = AE(ae_title="TEST_SCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    first = ae.associate("127.0.0.1", node.port, ae_title="EDGE_NODE")
    try:
        assert first.is_established
        assert associate_result(node.port) == (False, (0x02, 0x03, 0x02))
    finally:
        first.release()
    # the slot is freed when the server side of the first association has ended
    wait_for(lambda: associate_result(node.port)[0], what="a free association slot")


def test_all_storage_sop_classes_and_syntaxes_are_offered_but_not_deflated():
    uids = storage_sop_class_uids()
    assert len(uids) > 128
    assert CT_IMAGE_STORAGE in uids
    assert "1.2.840.10008.5.1.4.1.1.66.4" in uids  # Segmentation
    assert "1.2.840.10008.5.1.4.1.1.88.22" in uids  # Enhanced SR
    assert "1.2.840.10008.5.1.4.1.1.104.1" in uids  # Encapsulated PDF
    assert "1.2.840.10008.1.2.1.99" not in STORAGE_TRANSFER_SYNTAXES
    assert len(supported_contexts()) == len(uids) + 1


def test_deflated_transfer_syntax_is_not_accepted(node):
    from pynetdicom import AE

    ae = AE(ae_title="TEST_SCU")
    ae.add_requested_context(CT_IMAGE_STORAGE, "1.2.840.10008.1.2.1.99")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="EDGE_NODE")
    assert assoc.is_established
    try:
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        assert CT_IMAGE_STORAGE not in accepted
    finally:
        assoc.release()


def test_files_of_many_associations_land_only_under_data_dir(node, tmp_path):
    for _ in range(2):
        assert send(node.port, make_series(2)) == [0, 0]
    outside = [p for p in tmp_path.rglob("*.dcm") if not p.is_relative_to(node.spool.data_dir)]
    assert outside == []
    assert os.listdir(node.spool.data_dir / "spool" / "tmp") == []


def test_hand_encoded_file_meta_equals_pynetdicoms():
    from pydicom.dataset import FileMetaDataset
    from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
    from pynetdicom.dsutils import encode_file_meta as reference

    from node.handlers import encode_file_meta

    for sop_uid in ("1.2.3.45", "1.2.3.456"):  # odd and even lengths (padding)
        meta = FileMetaDataset()
        meta.FileMetaInformationVersion = b"\x00\x01"
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
        meta.ImplementationClassUID = PYNETDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = PYNETDICOM_IMPLEMENTATION_VERSION
        expected = b"\0" * 128 + b"DICM" + reference(meta)
        assert encode_file_meta(CT_IMAGE_STORAGE, sop_uid, "1.2.840.10008.1.2.1") == expected


def test_unparseable_dataset_returns_c001(node, tmp_path):
    from pydicom.filewriter import write_file_meta_info

    ds = make_ct(generate_uid(), generate_uid(), 0)
    path = tmp_path / "garbage.dcm"
    with open(path, "wb") as fh:
        fh.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(fh, ds.file_meta, enforce_standard=True)
        fh.write(b"\x08\x00\x18\x00ZZ\x04\x001.23")  # an element with a VR that does not exist
    assert send(node.port, [path], raw_files=True) == [0xC001]
