"""Loading a series: exact geometry, HU, ordering, and every way a series can be unusable."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.uid import JPEG2000Lossless, RLELossless

from pipeline.errors import InputRejectedError, TransientPipelineError
from pipeline.load import group_series, load_series
from tests.pipeline.conftest import (
    AXIAL,
    CORONAL,
    SAGITTAL,
    chest_phantom_hu,
    ct_slice_dataset,
    hu_to_stored,
    new_series_ids,
    slice_positions,
    write_ct_series,
    write_enhanced_ct,
)

OBLIQUE = (
    math.cos(math.radians(20)),
    math.sin(math.radians(20)),
    0.0,
    -math.sin(math.radians(20)) * math.cos(math.radians(10)),
    math.cos(math.radians(20)) * math.cos(math.radians(10)),
    -math.sin(math.radians(10)),
)


@pytest.fixture
def stored() -> np.ndarray:
    return hu_to_stored(chest_phantom_hu((8, 32, 32)))


def _expected_voxel_lps(paths: list[Path], k: int, j: int, i: int) -> np.ndarray:
    """Patient position of pixel (row j, column i) of slice file k, straight from its header."""
    ds = pydicom.dcmread(paths[k], stop_before_pixels=True)
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
    return ipp + iop[:3] * column_spacing * i + iop[3:] * row_spacing * j


def _assert_reason(excinfo: pytest.ExceptionInfo[InputRejectedError], reason: str) -> None:
    assert excinfo.value.reason == reason, str(excinfo.value)
    assert excinfo.value.message


def test_affine_maps_every_voxel_to_its_header_position_for_an_oblique_shuffled_series(
    tmp_path: Path, stored: np.ndarray
) -> None:
    order = [5, 2, 7, 0, 3, 6, 1, 4]
    paths = write_ct_series(
        tmp_path, stored, orientation=OBLIQUE, pixel_spacing=(0.7, 0.9), spacing_mm=3.0, write_order=order
    )
    series = load_series(paths)
    volume = series.volume
    assert volume.shape_zyx == (8, 32, 32)
    np.testing.assert_allclose(volume.spacing_mm, (3.0, 0.7, 0.9), rtol=1e-6)
    for k, j, i in [(0, 0, 0), (7, 31, 31), (3, 5, 17), (6, 20, 2)]:
        np.testing.assert_allclose(
            volume.index_to_lps(np.array([k, j, i])), _expected_voxel_lps(paths, k, j, i), atol=1e-4
        )
    first_position = [float(v) for v in pydicom.dcmread(paths[0]).ImagePositionPatient]
    np.testing.assert_array_equal(volume.affine_lps[:3, 3], first_position)
    assert [f.sop_instance_uid for f in series.frames] == [
        pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths
    ]
    assert all(f.frame_number is None for f in series.frames)


def test_hounsfield_units_are_stored_values_times_slope_plus_intercept(
    tmp_path: Path, stored: np.ndarray
) -> None:
    paths = write_ct_series(tmp_path, stored, slope=0.5, intercept=-1000.0)
    series = load_series(paths)
    assert series.volume.array_zyx.dtype == np.float32
    expected = (stored.astype(np.float64) * 0.5 - 1000.0).astype(np.float32)
    np.testing.assert_array_equal(series.volume.array_zyx, expected)


def test_reversed_instance_order_is_sorted_along_the_slice_normal(tmp_path: Path, stored: np.ndarray) -> None:
    paths = write_ct_series(tmp_path, stored, write_order=list(range(7, -1, -1)))
    series = load_series(sorted(paths, reverse=True))
    np.testing.assert_array_equal(series.volume.array_zyx, stored.astype(np.float32) - 1024)
    z = [f.image_position_lps_mm[2] for f in series.frames]
    assert z == sorted(z)
    assert [Path(p).name for p in series.files] == [p.name for p in paths]


@pytest.mark.parametrize("orientation", [CORONAL, SAGITTAL], ids=["coronal", "sagittal"])
def test_non_axial_stacks_ascend_along_their_normal(
    tmp_path: Path, stored: np.ndarray, orientation: tuple
) -> None:
    paths = write_ct_series(tmp_path, stored, orientation=orientation, write_order=[3, 1, 0, 2, 7, 5, 6, 4])
    series = load_series(paths)
    normal = np.cross(orientation[:3], orientation[3:])
    along = [np.dot(f.image_position_lps_mm, normal) for f in series.frames]
    assert along == sorted(along)
    np.testing.assert_allclose(series.volume.affine_lps[:3, 2], normal * 2.5, atol=1e-9)


def test_datasets_are_headers_without_pixel_data_in_volume_order(tmp_path: Path, stored: np.ndarray) -> None:
    paths = write_ct_series(tmp_path, stored, write_order=[7, 6, 5, 4, 3, 2, 1, 0])
    series = load_series(paths)
    assert len(series.datasets) == 8
    assert all("PixelData" not in ds for ds in series.datasets)
    assert [ds.SOPInstanceUID for ds in series.datasets] == [f.sop_instance_uid for f in series.frames]
    assert series.study_instance_uid == series.datasets[0].StudyInstanceUID
    assert series.frame_of_reference_uid == series.datasets[0].FrameOfReferenceUID
    assert series.modality == "CT"


def test_headers_keep_the_character_set_and_a_japanese_patient_name(
    tmp_path: Path, stored: np.ndarray
) -> None:
    ids = new_series_ids(patient_name="山田^太郎")
    paths = write_ct_series(tmp_path, stored[:3], ids=ids, specific_character_set="ISO_IR 192")
    series = load_series(paths)
    header = series.datasets[0]
    assert header.SpecificCharacterSet == "ISO_IR 192"
    assert str(header.PatientName) == "山田^太郎"


@pytest.mark.parametrize("transfer_syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "jpeg2000"])
def test_compressed_series_decode_to_the_same_hounsfield_units(
    tmp_path: Path, stored: np.ndarray, transfer_syntax: str
) -> None:
    paths = write_ct_series(tmp_path, stored, transfer_syntax=transfer_syntax)
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == transfer_syntax
    series = load_series(paths)
    np.testing.assert_array_equal(series.volume.array_zyx, stored.astype(np.float32) - 1024)


def test_enhanced_multiframe_ct_uses_per_frame_position_and_rescale(
    tmp_path: Path, stored: np.ndarray
) -> None:
    frame_order = [4, 0, 7, 2, 5, 1, 6, 3]
    slopes = [1.0, 2.0, 1.0, 0.5, 1.0, 1.0, 2.0, 1.0]
    intercepts = [-1024.0, -2048.0, -1000.0, -512.0, -1024.0, -1024.0, -2048.0, -1024.0]
    path = write_enhanced_ct(
        tmp_path / "enhanced.dcm",
        stored,
        orientation=OBLIQUE,
        slopes=slopes,
        intercepts=intercepts,
        frame_order=frame_order,
    )
    series = load_series([path])
    assert [f.frame_number for f in series.frames] == [frame_order.index(k) + 1 for k in range(8)]
    for k in range(8):
        expected = (stored[k].astype(np.float64) * slopes[k] + intercepts[k]).astype(np.float32)
        np.testing.assert_array_equal(series.volume.array_zyx[k], expected)
    positions = slice_positions(8, orientation=OBLIQUE)
    for k in (0, 3, 7):
        np.testing.assert_allclose(series.volume.index_to_lps(np.array([k, 0, 0])), positions[k], atol=1e-4)
    assert len(series.datasets) == 1 and "PixelData" not in series.datasets[0]


def test_identical_duplicate_slices_are_dropped_with_a_note(tmp_path: Path, stored: np.ndarray) -> None:
    paths = write_ct_series(tmp_path / "a", stored)
    head = pydicom.dcmread(paths[3])
    head.SOPInstanceUID = pydicom.uid.generate_uid()
    head.file_meta.MediaStorageSOPInstanceUID = head.SOPInstanceUID
    duplicate = tmp_path / "a" / "duplicate.dcm"
    head.save_as(duplicate)
    series = load_series([*paths, duplicate])
    assert series.volume.shape_zyx == (8, 32, 32)
    assert any("duplicate" in note for note in series.notes)
    assert len(series.datasets) == 8


def test_conflicting_duplicates_are_rejected(tmp_path: Path, stored: np.ndarray) -> None:
    paths = write_ct_series(tmp_path / "a", stored)
    other = pydicom.dcmread(paths[3])
    other.SOPInstanceUID = pydicom.uid.generate_uid()
    other.file_meta.MediaStorageSOPInstanceUID = other.SOPInstanceUID
    other.PixelData = (stored[3] + 7).tobytes()
    other.save_as(tmp_path / "a" / "conflict.dcm")
    with pytest.raises(InputRejectedError) as excinfo:
        load_series([*paths, tmp_path / "a" / "conflict.dcm"])
    _assert_reason(excinfo, "conflicting_duplicates")


def test_one_sop_instance_uid_at_two_positions_is_rejected(tmp_path: Path, stored: np.ndarray) -> None:
    paths = write_ct_series(tmp_path / "a", stored)
    moved = pydicom.dcmread(paths[3])
    moved.SOPInstanceUID = pydicom.dcmread(paths[2]).SOPInstanceUID
    moved.save_as(paths[3])
    with pytest.raises(InputRejectedError) as excinfo:
        load_series(paths)
    _assert_reason(excinfo, "conflicting_duplicates")


def test_the_same_file_given_twice_is_loaded_once(tmp_path: Path, stored: np.ndarray) -> None:
    paths = write_ct_series(tmp_path / "a", stored)
    series = load_series([*paths, paths[0], tmp_path / "a"])
    assert series.volume.shape_zyx == (8, 32, 32)
    assert series.notes == ()


def test_missing_slice_is_rejected(tmp_path: Path, stored: np.ndarray) -> None:
    paths = write_ct_series(tmp_path, stored)
    with pytest.raises(InputRejectedError) as excinfo:
        load_series(paths[:4] + paths[5:])
    _assert_reason(excinfo, "missing_slices")
    assert "1 slice(s) missing" in excinfo.value.message


def test_irregular_spacing_beyond_tolerance_is_rejected(tmp_path: Path, stored: np.ndarray) -> None:
    positions = slice_positions(8)
    positions[5] = (positions[5][0], positions[5][1], positions[5][2] + 0.6)  # 2.5 mm → 3.1 / 1.9 mm
    paths = write_ct_series(tmp_path, stored, positions=positions)
    with pytest.raises(InputRejectedError) as excinfo:
        load_series(paths)
    _assert_reason(excinfo, "irregular_spacing")


def test_spacing_jitter_within_tolerance_is_accepted(tmp_path: Path, stored: np.ndarray) -> None:
    positions = slice_positions(8)
    positions[5] = (positions[5][0], positions[5][1], positions[5][2] + 0.1)  # 4 % of 2.5 mm
    paths = write_ct_series(tmp_path, stored, positions=positions)
    series = load_series(paths, spacing_tolerance=0.1)
    np.testing.assert_allclose(series.volume.spacing_mm[0], 2.5)
    assert series.frames[5].image_position_lps_mm[2] == pytest.approx(positions[5][2])
    with pytest.raises(InputRejectedError):
        load_series(paths, spacing_tolerance=0.01)


def test_gantry_tilt_is_rejected_with_the_angle(tmp_path: Path, stored: np.ndarray) -> None:
    tilt = math.radians(15.0)
    positions = [(-12.8, -12.8 + k * 2.5 * math.tan(tilt), -100.0 + k * 2.5) for k in range(8)]
    paths = write_ct_series(tmp_path, stored, positions=positions)
    with pytest.raises(InputRejectedError) as excinfo:
        load_series(paths)
    _assert_reason(excinfo, "gantry_tilt")
    assert "15.00°" in excinfo.value.message


def test_one_slice_shifted_in_plane_is_rejected_as_inconsistent(tmp_path: Path, stored: np.ndarray) -> None:
    positions = slice_positions(8)
    positions[4] = (positions[4][0] + 5.0, positions[4][1], positions[4][2])
    paths = write_ct_series(tmp_path, stored, positions=positions)
    with pytest.raises(InputRejectedError) as excinfo:
        load_series(paths)
    _assert_reason(excinfo, "inconsistent_positions")


def test_localizer_image_type_is_excluded_with_a_note(tmp_path: Path, stored: np.ndarray) -> None:
    ids = new_series_ids()
    paths = write_ct_series(tmp_path / "axial", stored, ids=ids)
    scout = ct_slice_dataset(
        stored[0],
        position=(-12.8, -12.8, -100.0),
        ids=ids,
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
    )
    scout.save_as(tmp_path / "scout.dcm", enforce_file_format=True)
    series = load_series([tmp_path / "scout.dcm", *paths])
    assert series.volume.shape_zyx == (8, 32, 32)
    assert any("localizer" in note for note in series.notes)
    assert scout.SOPInstanceUID not in {f.sop_instance_uid for f in series.frames}


def test_off_orientation_scouts_without_localizer_type_are_excluded_with_a_note(
    tmp_path: Path, stored: np.ndarray
) -> None:
    ids = new_series_ids()
    paths = write_ct_series(tmp_path / "axial", stored, ids=ids)
    for n, orientation in enumerate((CORONAL, SAGITTAL)):
        ds = ct_slice_dataset(stored[0], position=(0.0, 0.0, -80.0), orientation=orientation, ids=ids)
        ds.save_as(tmp_path / f"scout{n}.dcm", enforce_file_format=True)
    series = load_series([*paths, tmp_path / "scout0.dcm", tmp_path / "scout1.dcm"])
    assert series.volume.shape_zyx == (8, 32, 32)
    assert any("differs from the main stack" in note for note in series.notes)


def test_a_dose_screen_without_geometry_is_excluded_with_a_note(tmp_path: Path, stored: np.ndarray) -> None:
    ids = new_series_ids()
    paths = write_ct_series(tmp_path / "axial", stored, ids=ids)
    screen = ct_slice_dataset(
        stored[0], position=(0.0, 0.0, 0.0), ids=ids, image_type=("DERIVED", "SECONDARY", "OTHER")
    )
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        delattr(screen, keyword)
    screen.save_as(tmp_path / "dose.dcm", enforce_file_format=True)
    series = load_series([tmp_path / "dose.dcm", *paths])
    assert series.volume.shape_zyx == (8, 32, 32)
    assert any("without Image Position" in note for note in series.notes)


def test_mixed_orientations_are_rejected(tmp_path: Path, stored: np.ndarray) -> None:
    ids = new_series_ids()
    axial = write_ct_series(tmp_path / "axial", stored[:5], ids=ids)
    coronal = write_ct_series(tmp_path / "coronal", stored[:5], ids=ids, orientation=CORONAL)
    with pytest.raises(InputRejectedError) as excinfo:
        load_series([*axial, *coronal])
    _assert_reason(excinfo, "mixed_orientations")


def test_mixed_image_sizes_are_rejected(tmp_path: Path, stored: np.ndarray) -> None:
    ids = new_series_ids()
    big = write_ct_series(tmp_path / "big", stored[:4], ids=ids)
    small = write_ct_series(
        tmp_path / "small", stored[4:, :16, :16], ids=ids, origin=(-12.8, -12.8, -90.0)
    )
    with pytest.raises(InputRejectedError) as excinfo:
        load_series([*big, *small])
    _assert_reason(excinfo, "mixed_image_sizes")


def test_a_single_slice_is_rejected(tmp_path: Path, stored: np.ndarray) -> None:
    paths = write_ct_series(tmp_path, stored[:1])
    with pytest.raises(InputRejectedError) as excinfo:
        load_series(paths)
    _assert_reason(excinfo, "too_few_slices")


def test_instances_without_pixel_data_are_rejected(tmp_path: Path, stored: np.ndarray) -> None:
    paths = write_ct_series(tmp_path, stored[:3])
    ds = pydicom.dcmread(paths[1])
    del ds.PixelData
    ds.save_as(paths[1])
    with pytest.raises(InputRejectedError) as excinfo:
        load_series(paths)
    _assert_reason(excinfo, "no_pixel_data")


def test_corrupt_compressed_pixel_data_is_rejected(tmp_path: Path, stored: np.ndarray) -> None:
    from pydicom.encaps import encapsulate, generate_frames

    paths = write_ct_series(tmp_path, stored[:3], transfer_syntax=JPEG2000Lossless)
    ds = pydicom.dcmread(paths[1])
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[: len(frame) // 2]])
    ds.save_as(paths[1])
    with pytest.raises(InputRejectedError) as excinfo:
        load_series(paths)
    _assert_reason(excinfo, "undecodable_pixel_data")
    assert "JPEG 2000" in excinfo.value.message


def test_a_file_that_is_not_dicom_is_rejected_and_a_vanished_file_is_transient(
    tmp_path: Path, stored: np.ndarray
) -> None:
    paths = write_ct_series(tmp_path, stored[:3])
    (tmp_path / "notes.txt").write_text("not DICOM")
    with pytest.raises(InputRejectedError) as excinfo:
        load_series([*paths, tmp_path / "notes.txt"])
    _assert_reason(excinfo, "unreadable_file")
    with pytest.raises(TransientPipelineError):
        load_series([*paths, tmp_path / "gone.dcm"])


def test_non_image_instances_in_the_series_are_set_aside_with_a_note(
    tmp_path: Path, stored: np.ndarray
) -> None:
    paths = write_ct_series(tmp_path, stored)
    report = pydicom.dcmread(paths[0])
    for keyword in ("PixelData", "Rows", "Columns", "ImagePositionPatient"):
        delattr(report, keyword)
    report.SOPClassUID = report.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"
    report.SOPInstanceUID = report.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    report.save_as(tmp_path / "report.dcm")
    series = load_series([*paths, tmp_path / "report.dcm"])
    assert series.volume.shape_zyx == (8, 32, 32)
    assert any("non-image" in note for note in series.notes)
    with pytest.raises(InputRejectedError) as excinfo:
        load_series([tmp_path / "report.dcm"])
    _assert_reason(excinfo, "no_pixel_data")


def test_files_of_two_series_are_rejected(tmp_path: Path, stored: np.ndarray) -> None:
    first = write_ct_series(tmp_path / "one", stored[:3])
    second = write_ct_series(tmp_path / "two", stored[:3])
    with pytest.raises(InputRejectedError) as excinfo:
        load_series([*first, *second])
    _assert_reason(excinfo, "mixed_series")


def test_missing_image_position_is_rejected(tmp_path: Path, stored: np.ndarray) -> None:
    paths = write_ct_series(tmp_path, stored[:3])
    ds = pydicom.dcmread(paths[2])
    del ds.ImagePositionPatient
    ds.save_as(paths[2])
    with pytest.raises(InputRejectedError) as excinfo:
        load_series(paths)
    _assert_reason(excinfo, "missing_geometry")


def test_group_series_sorts_files_by_series_and_ignores_other_files(
    tmp_path: Path, stored: np.ndarray
) -> None:
    one = write_ct_series(tmp_path / "in" / "one", stored[:3])
    two = write_ct_series(tmp_path / "in" / "nested" / "deeper" / "two", stored[:2])
    (tmp_path / "in" / "notes.txt").write_text("not DICOM")
    (tmp_path / "in" / "empty.dcm").write_bytes(b"")
    groups = group_series([tmp_path / "in", one[0]])
    uid_one = pydicom.dcmread(one[0]).SeriesInstanceUID
    uid_two = pydicom.dcmread(two[0]).SeriesInstanceUID
    assert set(groups) == {uid_one, uid_two}
    assert sorted(groups[uid_one]) == sorted(one)
    assert sorted(groups[uid_two]) == sorted(two)


def test_a_folder_loads_like_its_files_skipping_what_is_not_dicom(
    tmp_path: Path, stored: np.ndarray
) -> None:
    paths = write_ct_series(tmp_path / "series", stored)
    (tmp_path / "series" / "README.txt").write_text("not DICOM")
    from_folder = load_series([tmp_path / "series"])
    from_files = load_series(paths)
    np.testing.assert_array_equal(from_folder.volume.array_zyx, from_files.volume.array_zyx)
    np.testing.assert_array_equal(from_folder.volume.affine_lps, from_files.volume.affine_lps)


def test_every_rejection_reason_the_loader_raises_is_documented_in_its_module_docstring() -> None:
    import inspect
    import re

    import pipeline.load as load_module

    source = inspect.getsource(load_module)
    raised = set(re.findall(r'InputRejectedError\(\s*"([a-z_]+)"', source))
    assert raised >= {"missing_slices", "gantry_tilt", "conflicting_duplicates", "no_pixel_data"}
    documented = set(re.findall(r"``([a-z_]+)``", load_module.__doc__ or ""))
    assert raised <= documented, f"undocumented reasons: {sorted(raised - documented)}"


def _rotation(alpha: float, beta: float, gamma: float) -> np.ndarray:
    ca, sa, cb, sb, cg, sg = (f(v) for v in (alpha, beta, gamma) for f in (math.cos, math.sin))
    rz = np.array([[ca, -sa, 0], [sa, ca, 0], [0, 0, 1]])
    ry = np.array([[cb, 0, sb], [0, 1, 0], [-sb, 0, cb]])
    rx = np.array([[1, 0, 0], [0, cg, -sg], [0, sg, cg]])
    return rz @ ry @ rx


@settings(max_examples=25, deadline=None)
@given(
    angles=st.tuples(*[st.floats(-math.pi, math.pi, allow_nan=False)] * 3),
    n_slices=st.integers(2, 6),
    spacing_mm=st.floats(0.5, 8.0, allow_nan=False),
    pixel_spacing=st.tuples(st.floats(0.2, 3.0, allow_nan=False), st.floats(0.2, 3.0, allow_nan=False)),
    order_seed=st.integers(0, 1000),
)
def test_any_orientation_and_file_order_gives_an_affine_that_reproduces_every_header(
    angles: tuple[float, float, float],
    n_slices: int,
    spacing_mm: float,
    pixel_spacing: tuple[float, float],
    order_seed: int,
) -> None:
    import tempfile

    rotation = _rotation(*angles)
    orientation = tuple(float(v) for v in (*rotation[:, 0], *rotation[:, 1]))
    stored = np.random.default_rng(order_seed).integers(0, 2000, size=(n_slices, 4, 5)).astype(np.int16)
    order = list(np.random.default_rng(order_seed).permutation(n_slices))
    with tempfile.TemporaryDirectory() as folder:
        paths = write_ct_series(
            Path(folder),
            stored,
            orientation=orientation,
            spacing_mm=spacing_mm,
            pixel_spacing=pixel_spacing,
            write_order=order,
        )
        series = load_series([Path(folder)])
        for k in range(n_slices):
            for j, i in ((0, 0), (3, 4), (1, 2)):
                np.testing.assert_allclose(
                    series.volume.index_to_lps(np.array([k, j, i])),
                    _expected_voxel_lps(paths, k, j, i),
                    atol=1e-3,
                )
        np.testing.assert_array_equal(series.volume.array_zyx, stored.astype(np.float32) - 1024)
