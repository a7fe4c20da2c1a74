"""Loading pydicom's bundled files: real scanner headers, compressed transfer syntaxes, enhanced CT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from pipeline.errors import InputRejectedError
from pipeline.load import load_series


def _bundled(name: str) -> Path:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} is not bundled with this pydicom/pydicom-data")
    return Path(str(path))


def _stack_copies(source: Path, folder: Path, n: int = 3, spacing_mm: float = 5.0) -> list[Path]:
    """``n`` copies of one bundled image, moved along its normal: a small series with its real header
    and its pixel data untouched (still in the file's transfer syntax)."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid, frame_of_reference = generate_uid(), generate_uid()
    paths = []
    for k in range(n):
        ds = pydicom.dcmread(source)
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        normal = np.cross(iop[:3], iop[3:])
        ipp = np.array([float(v) for v in ds.ImagePositionPatient]) + k * spacing_mm * normal
        ds.ImagePositionPatient = [pydicom.valuerep.DSfloat(float(v), auto_format=True) for v in ipp]
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = ds.get("FrameOfReferenceUID") or frame_of_reference
        ds.InstanceNumber = k + 1
        path = folder / f"{k:03d}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


def test_ct_small_geometry_and_hounsfield_units_match_its_header(tmp_path: Path) -> None:
    source = _bundled("CT_small.dcm")
    paths = _stack_copies(source, tmp_path, n=3, spacing_mm=5.0)
    series = load_series(paths[::-1])
    ds = pydicom.dcmread(source)
    stored = ds.pixel_array.astype(np.float64)
    expected = (stored * float(ds.RescaleSlope) + float(ds.RescaleIntercept)).astype(np.float32)
    for k in range(3):
        np.testing.assert_array_equal(series.volume.array_zyx[k], expected)
    iop = [float(v) for v in ds.ImageOrientationPatient]
    row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
    affine = series.volume.affine_lps
    np.testing.assert_allclose(affine[:3, 0], np.array(iop[:3]) * column_spacing)
    np.testing.assert_allclose(affine[:3, 1], np.array(iop[3:]) * row_spacing)
    np.testing.assert_allclose(affine[:3, 3], [float(v) for v in ds.ImagePositionPatient])
    np.testing.assert_allclose(series.volume.spacing_mm, (5.0, row_spacing, column_spacing), rtol=1e-6)


@pytest.mark.parametrize(
    "compressed",
    ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"],
)
def test_compressed_bundled_images_decode_like_their_uncompressed_original(
    tmp_path: Path, compressed: str
) -> None:
    reference = load_series(_stack_copies(_bundled("MR_small.dcm"), tmp_path / "plain", n=2))
    series = load_series(_stack_copies(_bundled(compressed), tmp_path / "compressed", n=2))
    assert pydicom.dcmread(series.files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID.is_compressed
    np.testing.assert_array_equal(series.volume.array_zyx, reference.volume.array_zyx)


@pytest.mark.parametrize(
    "name",
    [
        "bad_sequence.dcm",  # JPEG Lossless (process 14), a malformed private sequence
        "J2K_pixelrep_mismatch.dcm",  # JPEG 2000 whose signedness disagrees with Pixel Representation
        "693_J2KI.dcm",  # lossy JPEG 2000
        "explicit_VR-UN.dcm",  # elements with VR UN in an explicit VR file
    ],
)
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_quirky_scanner_files_load_with_hounsfield_units_from_their_header(tmp_path: Path, name: str) -> None:
    source = _bundled(name)
    series = load_series(_stack_copies(source, tmp_path, n=2))
    ds = pydicom.dcmread(source)
    slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
    expected = (ds.pixel_array.astype(np.float64) * slope + intercept).astype(np.float32)
    assert series.volume.shape_zyx == (2, int(ds.Rows), int(ds.Columns))
    np.testing.assert_array_equal(series.volume.array_zyx[1], expected)


def test_jpeg2000_ct_decodes_like_the_uncompressed_ct(tmp_path: Path) -> None:
    reference = load_series(_stack_copies(_bundled("693_UNCR.dcm"), tmp_path / "plain", n=2))
    series = load_series(_stack_copies(_bundled("693_J2KR.dcm"), tmp_path / "j2k", n=2))
    assert series.volume.shape_zyx == (2, 512, 512)
    np.testing.assert_array_equal(series.volume.array_zyx, reference.volume.array_zyx)


def test_bundled_enhanced_ct_loads_each_frame_with_its_plane_position(tmp_path: Path) -> None:
    source = _bundled("eCT_Supplemental.dcm")
    series = load_series([source])
    ds = pydicom.dcmread(source)
    positions = [
        [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        for item in ds.PerFrameFunctionalGroupsSequence
    ]
    # Image Orientation (-1,0,0 / 0,1,0): the normal points to -z, so ascending k runs from z=-149 to -159.
    assert [f.frame_number for f in series.frames] == [2, 1]
    np.testing.assert_allclose(series.volume.affine_lps[:3, 3], positions[1])
    np.testing.assert_allclose(series.volume.index_to_lps(np.array([1, 0, 0])), positions[0], atol=1e-9)
    stored = ds.pixel_array.astype(np.float64)
    np.testing.assert_array_equal(series.volume.array_zyx[0], (stored[1] - 1024.0).astype(np.float32))
    assert series.datasets[0].SOPClassUID == "1.2.840.10008.5.1.4.1.1.2.1"


def test_truncated_pixel_data_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(InputRejectedError) as excinfo:
        load_series(_stack_copies(_bundled("MR_truncated.dcm"), tmp_path, n=2))
    assert excinfo.value.reason == "undecodable_pixel_data"


def test_multiframe_without_functional_groups_is_rejected() -> None:
    with pytest.raises(InputRejectedError) as excinfo:
        load_series([_bundled("emri_small.dcm")])
    assert excinfo.value.reason == "unsupported_multiframe"


def test_image_without_frame_of_reference_is_rejected(tmp_path: Path) -> None:
    paths = _stack_copies(_bundled("CT_small.dcm"), tmp_path, n=2)
    ds = pydicom.dcmread(paths[1])
    del ds.FrameOfReferenceUID
    ds.save_as(paths[1])
    with pytest.raises(InputRejectedError) as excinfo:
        load_series(paths)
    assert excinfo.value.reason == "missing_frame_of_reference"
