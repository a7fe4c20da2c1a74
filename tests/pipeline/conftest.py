"""Generated DICOM series for the pipeline tests: a small synthetic chest CT and the writers for it.

The writers are plain functions (import them with ``from tests.pipeline.conftest import ...``) so a test
can build any variant it needs (oblique, shuffled, gappy, tilted, compressed, enhanced multi-frame);
the fixtures at the bottom hand out the common ones. Everything is written into ``tmp_path``; names and
IDs are obviously synthetic.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.valuerep import DSfloat
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    generate_uid,
)

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def chest_phantom_hu(
    shape_zyx: tuple[int, int, int] = (16, 32, 32), *, nodule: bool = True, seed: int = 0
) -> NDArray[np.float32]:
    """A crude chest in HU: air outside, a soft-tissue ellipse, two lungs, optionally a nodule.

    Array ``[k, j, i]``; values -1000 (air), ~40 (tissue), ~-850 (lung), ~30 (nodule), with noise of
    a few HU so the histogram is not degenerate.
    """
    nz, ny, nx = shape_zyx
    z, y, x = np.meshgrid(
        np.linspace(-1, 1, nz), np.linspace(-1, 1, ny), np.linspace(-1, 1, nx), indexing="ij"
    )
    hu = np.full(shape_zyx, -1000.0, dtype=np.float32)
    body = (x / 0.9) ** 2 + (y / 0.7) ** 2 <= 1.0
    hu[body] = 40.0
    for centre in (-0.42, 0.42):
        lung = ((x - centre) / 0.3) ** 2 + (y / 0.45) ** 2 + (z / 1.3) ** 2 <= 1.0
        hu[lung & body] = -850.0
    if nodule:
        blob = ((x - 0.42) / 0.1) ** 2 + (y / 0.1) ** 2 + (z / 0.25) ** 2 <= 1.0
        hu[blob] = 30.0
    rng = np.random.default_rng(seed)
    hu += rng.normal(0.0, 5.0, size=shape_zyx).astype(np.float32)
    return np.clip(hu, -1024, 3071).astype(np.float32)


def _ds(values: Sequence[float]) -> list[DSfloat]:
    """Decimal strings as precise as the 16 characters of DS allow."""
    return [DSfloat(float(v), auto_format=True) for v in values]


def _file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def _patient_study(ds: Dataset, ids: dict[str, str], specific_character_set: str | None) -> None:
    if specific_character_set:
        ds.SpecificCharacterSet = specific_character_set
    ds.PatientName = ids.get("patient_name", "Synthetic^Phantom")
    ds.PatientID = ids.get("patient_id", "PHANTOM-0001")
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = ids["study_instance_uid"]
    ds.SeriesInstanceUID = ids["series_instance_uid"]
    ds.FrameOfReferenceUID = ids["frame_of_reference_uid"]
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.SeriesDate = "20260101"
    ds.SeriesTime = "120000"
    ds.ContentDate = "20260101"
    ds.ContentTime = "120000"
    ds.AccessionNumber = "ACC0001"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.Modality = "CT"
    ds.Manufacturer = "Synthetic"
    ds.PositionReferenceIndicator = ""
    ds.BodyPartExamined = "CHEST"


def _pixel_module(ds: Dataset, stored: NDArray[Any]) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(stored.shape[-2]), int(stored.shape[-1])
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if stored.dtype == np.int16 else 0
    ds.PixelData = np.ascontiguousarray(stored).tobytes()


def new_series_ids(**overrides: str) -> dict[str, str]:
    """Fresh Study/Series/Frame of Reference UIDs (and synthetic patient fields) for one series."""
    ids = {
        "study_instance_uid": generate_uid(),
        "series_instance_uid": generate_uid(),
        "frame_of_reference_uid": generate_uid(),
    }
    ids.update(overrides)
    return ids


def ct_slice_dataset(
    stored: NDArray[Any],
    *,
    position: Sequence[float],
    orientation: Sequence[float] = AXIAL,
    pixel_spacing: tuple[float, float] = (0.8, 0.8),
    slice_thickness: float = 2.5,
    slope: float = 1.0,
    intercept: float = -1024.0,
    ids: dict[str, str],
    instance_number: int = 1,
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    sop_instance_uid: str | None = None,
    specific_character_set: str | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    gantry_tilt_degrees: float | None = None,
) -> Dataset:
    """One CT Image Storage instance (uncompressed, or compressed when ``transfer_syntax`` says so)."""
    sop_uid = sop_instance_uid or generate_uid()
    ds = Dataset()
    ds.file_meta = _file_meta(CTImageStorage, sop_uid, ExplicitVRLittleEndian)
    _patient_study(ds, ids, specific_character_set)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.ImageType = list(image_type)
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = _ds(position)
    ds.ImageOrientationPatient = _ds(orientation)
    ds.PixelSpacing = [f"{v:.6g}" for v in pixel_spacing]
    ds.SliceThickness = f"{slice_thickness:.6g}"
    ds.KVP = "120"
    ds.RescaleSlope = f"{slope:.6g}"
    ds.RescaleIntercept = f"{intercept:.6g}"
    ds.RescaleType = "HU"
    if gantry_tilt_degrees is not None:
        ds.GantryDetectorTilt = f"{gantry_tilt_degrees:.6g}"
    _pixel_module(ds, stored)
    if transfer_syntax != ExplicitVRLittleEndian:
        ds.compress(UID(transfer_syntax))
    return ds


def slice_positions(
    n: int,
    *,
    origin: Sequence[float] = (-12.8, -12.8, -100.0),
    orientation: Sequence[float] = AXIAL,
    spacing_mm: float = 2.5,
) -> list[tuple[float, float, float]]:
    """Image Position (Patient) of ``n`` slices stacked along the normal of ``orientation``."""
    row, col = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row, col)
    base = np.array(origin, dtype=np.float64)
    return [tuple(float(v) for v in base + k * spacing_mm * normal) for k in range(n)]  # type: ignore[misc]


def write_ct_series(
    folder: Path,
    stored_zyx: NDArray[Any],
    *,
    positions: Sequence[Sequence[float]] | None = None,
    spacing_mm: float = 2.5,
    origin: Sequence[float] = (-12.8, -12.8, -100.0),
    orientation: Sequence[float] = AXIAL,
    pixel_spacing: tuple[float, float] = (0.8, 0.8),
    slope: float = 1.0,
    intercept: float = -1024.0,
    ids: dict[str, str] | None = None,
    write_order: Sequence[int] | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    specific_character_set: str | None = None,
    image_types: Sequence[Sequence[str]] | None = None,
) -> list[Path]:
    """Write ``stored_zyx[k]`` as single-frame CT instances; return the paths in slice order ``k``.

    ``write_order`` permutes the Instance Numbers and file names (shuffled/reversed input); positions
    default to a regular stack from ``origin`` along the normal of ``orientation``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    ids = ids or new_series_ids()
    n = int(stored_zyx.shape[0])
    positions = positions or slice_positions(n, origin=origin, orientation=orientation, spacing_mm=spacing_mm)
    order = list(write_order) if write_order is not None else list(range(n))
    paths: list[Path] = [Path()] * n
    for rank, k in enumerate(order):
        ds = ct_slice_dataset(
            stored_zyx[k],
            position=positions[k],
            orientation=orientation,
            pixel_spacing=pixel_spacing,
            slice_thickness=spacing_mm,
            slope=slope,
            intercept=intercept,
            ids=ids,
            instance_number=rank + 1,
            image_type=image_types[k] if image_types is not None else ("ORIGINAL", "PRIMARY", "AXIAL"),
            specific_character_set=specific_character_set,
            transfer_syntax=transfer_syntax,
        )
        path = folder / f"IM{rank + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths[k] = path
    return paths


def hu_to_stored(hu: NDArray[Any], *, slope: float = 1.0, intercept: float = -1024.0) -> NDArray[np.int16]:
    """Stored values for ``hu`` under Rescale Slope/Intercept (rounded, int16)."""
    return np.rint((np.asarray(hu, dtype=np.float64) - intercept) / slope).astype(np.int16)


def write_enhanced_ct(
    path: Path,
    stored_zyx: NDArray[Any],
    *,
    positions: Sequence[Sequence[float]] | None = None,
    spacing_mm: float = 2.5,
    orientation: Sequence[float] = AXIAL,
    pixel_spacing: tuple[float, float] = (0.8, 0.8),
    slopes: Sequence[float] | None = None,
    intercepts: Sequence[float] | None = None,
    frame_order: Sequence[int] | None = None,
    ids: dict[str, str] | None = None,
) -> Path:
    """Write an Enhanced CT Image (multi-frame, per-frame functional groups; PS3.3 A.38).

    Frame ``f`` (0-based) of the file holds slice ``frame_order[f]``; Plane Position and Pixel Value
    Transformation are per frame, Plane Orientation and Pixel Measures shared.
    """
    ids = ids or new_series_ids()
    n = int(stored_zyx.shape[0])
    positions = positions or slice_positions(n, orientation=orientation, spacing_mm=spacing_mm)
    order = list(frame_order) if frame_order is not None else list(range(n))
    slopes = list(slopes) if slopes is not None else [1.0] * n
    intercepts = list(intercepts) if intercepts is not None else [-1024.0] * n
    sop_uid = generate_uid()
    ds = Dataset()
    ds.file_meta = _file_meta(EnhancedCTImageStorage, sop_uid, ExplicitVRLittleEndian)
    _patient_study(ds, ids, None)
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.InstanceNumber = 1
    ds.NumberOfFrames = n
    ds.ContentQualification = "RESEARCH"
    ds.BurnedInAnnotation = "NO"
    ds.PresentationLUTShape = "IDENTITY"

    orientation_item = Dataset()
    orientation_item.ImageOrientationPatient = _ds(orientation)
    measures = Dataset()
    measures.PixelSpacing = [f"{v:.6g}" for v in pixel_spacing]
    measures.SliceThickness = f"{spacing_mm:.6g}"
    shared = Dataset()
    shared.PlaneOrientationSequence = DicomSequence([orientation_item])
    shared.PixelMeasuresSequence = DicomSequence([measures])
    frame_type = Dataset()
    frame_type.FrameType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    shared.CTImageFrameTypeSequence = DicomSequence([frame_type])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])

    per_frame = []
    for f, k in enumerate(order):
        item = Dataset()
        plane = Dataset()
        plane.ImagePositionPatient = _ds(positions[k])
        item.PlanePositionSequence = DicomSequence([plane])
        transform = Dataset()
        transform.RescaleSlope = f"{slopes[k]:.6g}"
        transform.RescaleIntercept = f"{intercepts[k]:.6g}"
        transform.RescaleType = "HU"
        item.PixelValueTransformationSequence = DicomSequence([transform])
        content = Dataset()
        content.InStackPositionNumber = k + 1
        content.StackID = "1"
        item.FrameContentSequence = DicomSequence([content])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    _pixel_module(ds, np.stack([stored_zyx[k] for k in order]))
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def phantom_hu() -> NDArray[np.float32]:
    """The default 16×32×32 synthetic chest in HU (with one nodule in the right-hand lung)."""
    return chest_phantom_hu()


@pytest.fixture
def ct_series(tmp_path: Path, phantom_hu: NDArray[np.float32]) -> list[Path]:
    """The phantom as an axial single-frame CT series: 10 mm slices, 11 mm pixels (a 35 cm field)."""
    return write_ct_series(
        tmp_path / "ct", hu_to_stored(phantom_hu), spacing_mm=10.0, pixel_spacing=(11.0, 11.0),
        origin=(-170.5, -170.5, -80.0),
    )
