"""Typed records that cross the pipeline's stage boundaries (load → preprocess → infer → postprocess → encode).

Geometry conventions, used everywhere in `pipeline` and `models`:

- Arrays are indexed ``[k, j, i]`` (``array_zyx``): k = slice index in the order the slices lie along
  the slice normal (ascending), j = row, i = column.
- ``affine_lps`` is a 4×4 matrix mapping the homogeneous voxel index ``(i, j, k, 1)`` (column, row,
  slice — note the reversed order with respect to the array axes) to DICOM patient coordinates LPS in
  millimetres: column 0 = row direction cosine (Image Orientation (Patient) [0:3]) × column spacing
  (Pixel Spacing [1]); column 1 = column direction cosine (IOP [3:6]) × row spacing (Pixel Spacing [0]);
  column 2 = slice normal × slice spacing; column 3 = Image Position (Patient) of slice k = 0.
- ``spacing_mm`` is given in array order ``(slice, row, column)``.

This module holds data only: no I/O, no torch, nothing of `node`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from models.spec import LabelSpec


@dataclass(frozen=True, slots=True)
class Volume:
    """A 3-D image with its geometry: array ``[k, j, i]`` and the affine to LPS millimetres."""

    array_zyx: NDArray[Any]
    affine_lps: NDArray[np.float64]

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.array_zyx.shape)  # type: ignore[return-value]

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel size in mm in array order (slice, row, column)."""
        cols = np.linalg.norm(self.affine_lps[:3, :3], axis=0)
        return (float(cols[2]), float(cols[1]), float(cols[0]))

    def index_to_lps(self, kji: NDArray[Any]) -> NDArray[np.float64]:
        """Map voxel indices ``(..., 3)`` in array order (k, j, i) to LPS mm ``(..., 3)``."""
        kji = np.asarray(kji, dtype=np.float64)
        ijk = kji[..., ::-1]
        return ijk @ self.affine_lps[:3, :3].T + self.affine_lps[:3, 3]

    def with_array(self, array_zyx: NDArray[Any]) -> "Volume":
        """The same geometry with another array of the same shape (e.g. a label map)."""
        if tuple(array_zyx.shape) != self.shape_zyx:
            raise ValueError(f"shape {array_zyx.shape} differs from the volume's {self.shape_zyx}")
        return Volume(array_zyx=array_zyx, affine_lps=self.affine_lps)


@dataclass(frozen=True, slots=True)
class SourceFrame:
    """Where one slice of the volume came from: the instance and, for multi-frame images, the frame.

    ``frame_number`` is 1-based (DICOM Frame Number) for enhanced multi-frame sources, ``None`` for
    single-frame instances.
    """

    sop_instance_uid: str
    sop_class_uid: str
    frame_number: int | None
    image_position_lps_mm: tuple[float, float, float]


@dataclass(frozen=True, slots=True)
class SourceSeries:
    """A loaded series: its volume in HU, the source of each slice, and the headers the encoders need.

    ``frames[k]`` is the source of ``volume.array_zyx[k]``. ``datasets`` are the source instances'
    headers (pixel data removed), one per distinct SOP Instance, in volume order; highdicom takes them
    as ``source_images``.
    """

    volume: Volume
    frames: tuple[SourceFrame, ...]
    datasets: tuple[Any, ...]
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    modality: str
    files: tuple[Path, ...] = ()
    notes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Finding:
    """One connected component of a finding label, measured on the source grid.

    ``volume_ml`` in millilitres, ``diameter_mm`` = longest axial (in-slice) diameter in mm,
    ``centroid_lps_mm`` in patient LPS mm, HU statistics over the component's voxels, ``score`` the mean
    probability of the label inside the component.
    """

    label: str
    label_value: int
    index: int
    volume_ml: float
    diameter_mm: float
    centroid_lps_mm: tuple[float, float, float]
    mean_hu: float
    std_hu: float
    score: float
    voxel_count: int
    slice_indices: tuple[int, ...] = ()
    tracking_uid: str = ""


@dataclass(frozen=True, slots=True)
class StudyFinding:
    """The study-level result (e.g. "nodule present") with its score in [0, 1] and the decision."""

    name: str
    score: float
    present: bool
    threshold: float


@dataclass(frozen=True, slots=True)
class SegmentationResult:
    """Postprocessed output on the source grid: label map ``[k, j, i]`` (uint8, 0 = background),
    per-label probability maps where kept (for FRACTIONAL SEG), findings and the study-level result."""

    label_map: Volume
    labels: tuple[LabelSpec, ...]
    findings: tuple[Finding, ...]
    study_finding: StudyFinding | None
    probabilities: dict[int, NDArray[np.float32]] = field(default_factory=dict)
