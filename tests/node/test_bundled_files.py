"""pydicom's bundled test files (compressed, big endian, implicit VR, SR, RT) are stored byte-exact."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.filewriter import write_file_meta_info
from pydicom.data import get_testdata_file
from pynetdicom.dsutils import split_dataset

from tests.node.conftest import send

FILES = [
    "JPEG2000.dcm",  # JPEG 2000
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
    "MR_small_RLE.dcm",  # RLE lossless
    "MR_small_bigendian.dcm",  # explicit VR big endian
    "MR_small_implicit.dcm",  # implicit VR little endian
    "JPEG-lossy.dcm",  # JPEG extended
    "JPEG-LL.dcm",  # JPEG lossless SV1
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline
    "test-SR.dcm",  # Comprehensive SR
    "rtplan.dcm",  # RT Plan
    "rtdose.dcm",  # RT Dose
]


def _dataset_bytes(path: Path) -> bytes:
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def _with_consistent_meta(source: Path, dest: Path) -> Path:
    """Some bundled files (rtplan, rtdose) carry a Media Storage SOP Instance UID that differs from
    the dataset's; a sender takes the command's UID from the meta, which we would rightly refuse
    (0xC013). Rewrite only the meta; the dataset bytes stay as they are."""
    meta, offset = split_dataset(source)
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    if meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID:
        return source
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    with open(dest, "wb") as fh:
        fh.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(fh, meta, enforce_standard=True)
        fh.write(source.read_bytes()[offset:])
    return dest


@pytest.mark.parametrize("name", FILES)
def test_bundled_file_is_stored_byte_exact(node_factory, tmp_path, name):
    source = _with_consistent_meta(Path(get_testdata_file(name)), tmp_path / name)
    node = node_factory(sub=name.replace(".", "_"), scheduler=False)
    assert send(node.port, [source], raw_files=True) == [0x0000]
    node.wait_indexed(1)
    rel = node.db().execute("SELECT path FROM instances").fetchone()[0]
    stored = node.spool.absolute(rel)
    assert _dataset_bytes(stored) == _dataset_bytes(source)
