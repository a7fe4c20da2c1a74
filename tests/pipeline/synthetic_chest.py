"""A small synthetic chest-like CT series for the postprocess/encoder/run tests, written with pydicom.

The volume has a soft-tissue body (40 HU), two dark "lungs" (-850 HU) and bright spheres ("nodules",
30 HU) inside a lung; everything else is air (-1000 HU). The ground truth masks are returned with the
files so tests can build probabilities without a model. `source_series_from_chest` builds the pipeline's
`SourceSeries` straight from what was written (no dependency on `pipeline.load`), so the encoders can be
tested on exact, known geometry.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from models.spec import (
    ArchitectureSpec,
    CodeSpec,
    InferenceSpec,
    LabelSpec,
    ModelSpec,
    OutputsSpec,
    SegmentationSpec,
    SegmentationType,
    SeriesCriteriaSpec,
    StudyFindingSource,
    StudyFindingSpec,
    WeightsSpec,
)
from pipeline.types import SourceFrame, SourceSeries, Volume
from tests.support import require_tool

JAPANESE_NAME = "山田^太郎"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
AXIAL_IOP = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


@dataclass(frozen=True)
class ChestSeries:
    """What `write_chest_series` wrote: files (in writing order), headers, truth on the volume grid."""

    paths: tuple[Path, ...]
    datasets: tuple[Dataset, ...]
    hu_zyx: NDArray[np.float32]
    lung_zyx: NDArray[np.bool_]
    nodules_zyx: tuple[NDArray[np.bool_], ...]
    affine_lps: NDArray[np.float64]
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    enhanced: bool = False
    frame_positions: tuple[tuple[float, float, float], ...] = field(default=())


def write_chest_series(
    out_dir: Path,
    *,
    slices: int = 24,
    size: int = 64,
    pixel_spacing_mm: float = 0.8,
    slice_spacing_mm: float = 2.0,
    nodules: Sequence[tuple[tuple[float, float, float], float]] = (((12.0, 32.0, 20.0), 5.0),),
    iop: Sequence[float] = AXIAL_IOP,
    origin_lps: Sequence[float] = (-25.0, -25.0, -100.0),
    patient_name: str = "CHEST^SYNTHETIC",
    specific_character_set: str | None = None,
    reverse_files: bool = False,
    enhanced: bool = False,
    seed: int = 7,
) -> ChestSeries:
    """Write a synthetic chest CT series into ``out_dir``.

    Parameters
    ----------
    nodules
        ``((k, j, i) centre in voxels, radius in mm)`` per sphere.
    iop
        Image Orientation (Patient); the slice normal is row × column cosines.
    reverse_files
        Number the files (and Instance Numbers) from the top slice down, so the order in which files
        come is the reverse of the volume order.
    enhanced
        Write one Enhanced CT Image instance with per-frame functional groups instead of single frames.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    row_cos = np.array(iop[:3], dtype=np.float64)
    col_cos = np.array(iop[3:], dtype=np.float64)
    normal = np.cross(row_cos, col_cos)
    affine = np.eye(4)
    affine[:3, 0] = row_cos * pixel_spacing_mm
    affine[:3, 1] = col_cos * pixel_spacing_mm
    affine[:3, 2] = normal * slice_spacing_mm
    affine[:3, 3] = origin_lps

    kk, jj, ii = np.meshgrid(np.arange(slices), np.arange(size), np.arange(size), indexing="ij")
    c = (size - 1) / 2
    body = ((jj - c) / (0.46 * size)) ** 2 + ((ii - c) / (0.48 * size)) ** 2 <= 1.0
    lung_r = ((jj - c) / (0.32 * size)) ** 2 + ((ii - 0.27 * size) / (0.15 * size)) ** 2 <= 1.0
    lung_l = ((jj - c) / (0.32 * size)) ** 2 + ((ii - 0.73 * size) / (0.15 * size)) ** 2 <= 1.0
    lung = (lung_r | lung_l) & (kk >= 1) & (kk <= slices - 2)
    hu = np.full((slices, size, size), -1000.0, dtype=np.float32)
    hu[body] = 40.0
    hu[lung] = -850.0
    masks = []
    for (ck, cj, ci), radius in nodules:
        dist2 = (
            ((kk - ck) * slice_spacing_mm) ** 2 + ((jj - cj) * pixel_spacing_mm) ** 2 + ((ii - ci) * pixel_spacing_mm) ** 2
        )
        sphere = dist2 <= radius**2
        hu[sphere] = 30.0
        masks.append(sphere)
    lung = lung & ~np.any(masks, axis=0) if masks else lung
    hu += rng.normal(0.0, 5.0, hu.shape).astype(np.float32)
    hu = np.round(hu).astype(np.float32)
    stored = np.clip(hu + 1024.0, 0, 4095).astype(np.uint16)
    hu = stored.astype(np.float32) - 1024.0

    study_uid, series_uid, for_uid = generate_uid(), generate_uid(), generate_uid()
    positions = [tuple(float(x) for x in affine[:3, :3] @ np.array([0.0, 0.0, k]) + affine[:3, 3]) for k in range(slices)]

    def base(sop_class: str) -> Dataset:
        ds = Dataset()
        if specific_character_set:
            ds.SpecificCharacterSet = specific_character_set
        ds.SOPClassUID = sop_class
        ds.PatientName = patient_name
        ds.PatientID = "SYN-0001"
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study_uid
        ds.StudyDate = "20260101"
        ds.StudyTime = "120000"
        ds.ReferringPhysicianName = ""
        ds.StudyID = "1"
        ds.AccessionNumber = "ACC0001"
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 3
        ds.SeriesDescription = "Chest synthetic"
        ds.BodyPartExamined = "CHEST"
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.Manufacturer = "Synthetic"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = size
        ds.Columns = size
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        return ds

    def finish(ds: Dataset, path: Path) -> None:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        ds.save_as(path, enforce_file_format=True)

    paths: list[Path] = []
    datasets: list[Dataset] = []
    if not enhanced:
        order = range(slices - 1, -1, -1) if reverse_files else range(slices)
        for n, k in enumerate(order, start=1):
            ds = base(CT_IMAGE_STORAGE)
            ds.SOPInstanceUID = generate_uid()
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            ds.InstanceNumber = n
            ds.ImagePositionPatient = [f"{x:.6g}" for x in positions[k]]
            ds.ImageOrientationPatient = [f"{x:.6g}" for x in iop]
            ds.PixelSpacing = [pixel_spacing_mm, pixel_spacing_mm]
            ds.SliceThickness = slice_spacing_mm
            ds.SliceLocation = f"{positions[k][2]:.6g}"
            ds.RescaleIntercept = -1024
            ds.RescaleSlope = 1
            ds.RescaleType = "HU"
            ds.KVP = 120
            ds.AcquisitionNumber = 1
            ds.PixelData = stored[k].tobytes()
            path = out_dir / f"slice_{n:04d}.dcm"
            finish(ds, path)
            paths.append(path)
            datasets.append(ds)
    else:
        ds = base(ENHANCED_CT_IMAGE_STORAGE)
        ds.SOPInstanceUID = generate_uid()
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
        ds.InstanceNumber = 1
        ds.NumberOfFrames = slices
        ds.ContentDate = "20260101"
        ds.ContentTime = "120000"
        shared = Dataset()
        measures = Dataset()
        measures.PixelSpacing = [pixel_spacing_mm, pixel_spacing_mm]
        measures.SliceThickness = slice_spacing_mm
        shared.PixelMeasuresSequence = [measures]
        orient = Dataset()
        orient.ImageOrientationPatient = [f"{x:.6g}" for x in iop]
        shared.PlaneOrientationSequence = [orient]
        transform = Dataset()
        transform.RescaleIntercept = -1024
        transform.RescaleSlope = 1
        transform.RescaleType = "HU"
        shared.PixelValueTransformationSequence = [transform]
        ds.SharedFunctionalGroupsSequence = [shared]
        # Frames stored top-down when reverse_files, so frame numbers differ from volume order.
        order = list(range(slices - 1, -1, -1)) if reverse_files else list(range(slices))
        per_frame = []
        for k in order:
            item = Dataset()
            pos = Dataset()
            pos.ImagePositionPatient = [f"{x:.6g}" for x in positions[k]]
            item.PlanePositionSequence = [pos]
            per_frame.append(item)
        ds.PerFrameFunctionalGroupsSequence = per_frame
        ds.PixelData = stored[order].tobytes()
        path = out_dir / "enhanced.dcm"
        finish(ds, path)
        paths.append(path)
        datasets.append(ds)
    return ChestSeries(
        paths=tuple(paths),
        datasets=tuple(datasets),
        hu_zyx=hu,
        lung_zyx=lung,
        nodules_zyx=tuple(masks),
        affine_lps=affine,
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        frame_of_reference_uid=for_uid,
        enhanced=enhanced,
        frame_positions=tuple(positions),
    )


def source_series_from_chest(chest: ChestSeries) -> SourceSeries:
    """The `SourceSeries` the loader is expected to return for ``chest`` (volume order = ascending k)."""
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in chest.paths]
    if chest.enhanced:
        ds = headers[0]
        frame_of_k: dict[int, int] = {}
        for number, item in enumerate(ds.PerFrameFunctionalGroupsSequence, start=1):
            position = tuple(float(x) for x in item.PlanePositionSequence[0].ImagePositionPatient)
            k = min(range(len(chest.frame_positions)), key=lambda n: np.linalg.norm(np.subtract(chest.frame_positions[n], position)))
            frame_of_k[k] = number
        frames = tuple(
            SourceFrame(ds.SOPInstanceUID, ds.SOPClassUID, frame_of_k[k], chest.frame_positions[k])
            for k in range(len(chest.frame_positions))
        )
        datasets: tuple[Dataset, ...] = (ds,)
    else:
        by_position = sorted(headers, key=lambda d: float(np.dot(np.asarray(d.ImagePositionPatient, float), chest.affine_lps[:3, 2])))
        frames = tuple(
            SourceFrame(d.SOPInstanceUID, d.SOPClassUID, None, tuple(float(x) for x in d.ImagePositionPatient))
            for d in by_position
        )
        datasets = tuple(by_position)
    return SourceSeries(
        volume=Volume(array_zyx=chest.hu_zyx, affine_lps=chest.affine_lps),
        frames=frames,
        datasets=datasets,
        study_instance_uid=chest.study_instance_uid,
        series_instance_uid=chest.series_instance_uid,
        frame_of_reference_uid=chest.frame_of_reference_uid,
        modality="CT",
        files=chest.paths,
    )


def probabilities_from_truth(chest: ChestSeries, *, nodule_p: float = 0.9, lung_p: float = 0.8) -> NDArray[np.float32]:
    """Softmax-like ``[3, k, j, i]`` probabilities (background, lung, nodule) from the truth masks."""
    nodule = np.any(chest.nodules_zyx, axis=0) if chest.nodules_zyx else np.zeros_like(chest.lung_zyx)
    p = np.zeros((3, *chest.hu_zyx.shape), dtype=np.float32)
    p[1][chest.lung_zyx] = lung_p
    p[2][nodule] = nodule_p
    p[0] = 1.0 - p[1] - p[2]
    return p


LUNG_LABEL = LabelSpec(
    value=1,
    name="lung",
    category=CodeSpec("91723000", "SCT", "Anatomical Structure"),
    type=CodeSpec("39607008", "SCT", "Lung"),
    color_rgb=(128, 174, 128),
    threshold=0.5,
    min_size_mm3=50.0,
)
NODULE_LABEL = LabelSpec(
    value=2,
    name="nodule",
    category=CodeSpec("49755003", "SCT", "Morphologically Abnormal Structure"),
    type=CodeSpec("27925004", "SCT", "Nodule"),
    color_rgb=(241, 214, 145),
    threshold=0.5,
    min_size_mm3=10.0,
    is_finding=True,
    finding_site=CodeSpec("39607008", "SCT", "Lung"),
)


def chest_model_spec(
    *,
    segmentation_type: str = "BINARY",
    study_source: str = "max_component_score",
    labels: Sequence[LabelSpec] = (LUNG_LABEL, NODULE_LABEL),
) -> ModelSpec:
    """A manifest for encoder tests (no weights needed): lung + nodule labels and a study finding."""
    return ModelSpec(
        name="chest-test",
        version="0.0.1",
        description="encoder tests",
        family=CodeSpec("123110", "DCM", "Artificial Intelligence"),
        architecture=ArchitectureSpec("unet3d"),
        weights=WeightsSpec(file="none.pt", sha256="0" * 64),
        series=SeriesCriteriaSpec(),
        preprocess=(),
        inference=InferenceSpec(),
        labels=tuple(labels),
        segmentation=SegmentationSpec(type=SegmentationType(segmentation_type)),
        study_finding=StudyFindingSpec(
            name="nodule present",
            code=CodeSpec("27925004", "SCT", "Nodule"),
            threshold=0.5,
            source=StudyFindingSource(study_source),
        ),
        outputs=OutputsSpec(),
        bundle_dir=Path("."),
    )


def dciodvfy_errors(path: Path) -> list[str]:
    """Run dciodvfy (dicom3tools) on ``path``; print its warnings, return its "Error"/"Abort" lines."""
    tool = require_tool("dciodvfy")
    completed = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    lines = (completed.stdout + completed.stderr).splitlines()
    for line in lines:
        if line.startswith("Warning"):
            print(f"dciodvfy {path.name}: {line}")
    return [line for line in lines if line.startswith(("Error", "Abort"))]
