"""The receiver's fast header reader agrees with pydicom's on real-world files, or defers to it."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from node.errors import HeaderError
from node.header import _fast_header, _header_from_dataset, parse_header
from node.records import StoreStatus


def _pydicom_header(data: bytes):  # type: ignore[no-untyped-def]
    ds = pydicom.dcmread(io.BytesIO(data), defer_size=4096, force=True)
    return _header_from_dataset(ds)


def _corpus() -> list[Path]:
    """pydicom's bundled test files and the pydicom-data package, from disk (never downloaded)."""
    folders = [Path(pydicom.__file__).parent / "data" / "test_files"]
    try:
        import data_store  # the pydicom-data package

        folders.append(Path(data_store.__file__).parent)
    except ImportError:
        pass
    return sorted(p for folder in folders for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in (".dcm", "") and p.stat().st_size < 64_000_000)


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on the corpus's deliberately odd values
def test_fast_reader_matches_pydicom_on_every_file_it_accepts() -> None:
    accepted = 0
    for path in _corpus():
        data = path.read_bytes()
        fast = _fast_header(data)
        if fast is None:
            continue
        accepted += 1
        assert fast == _pydicom_header(data), path.name
    # Most of pydicom's corpus is little endian Part 10 with valid UIDs: the fast path must take it.
    assert accepted >= 50, accepted


def test_fast_reader_defers_on_big_endian_and_truncated_data() -> None:
    big_endian = Path(get_testdata_file("MR_small_bigendian.dcm")).read_bytes()
    assert _fast_header(big_endian) is None
    assert parse_header(big_endian).modality == "MR"  # pydicom's path takes it
    ct = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    assert _fast_header(ct) is not None
    for cut in (140, 300, 700):
        assert _fast_header(ct[:cut]) is None


def test_missing_uid_gets_the_same_status_through_either_path() -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.SeriesInstanceUID
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    assert _fast_header(data) is None
    with pytest.raises(HeaderError) as caught:
        parse_header(data)
    assert caught.value.status == StoreStatus.BAD_SERIES_INSTANCE_UID


def test_sequences_of_undefined_length_are_skipped() -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    inner = Dataset()
    inner.CodeValue = "T-D3000"
    inner.ConceptNameCodeSequence = Sequence([Dataset()])
    ds.AnatomicRegionSequence = Sequence([inner, Dataset()])
    ds.is_undefined_length_sequence_item = True
    buffer = io.BytesIO()
    ds["AnatomicRegionSequence"].is_undefined_length = True
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    fast = _fast_header(data)
    assert fast is not None and fast == _pydicom_header(data)
