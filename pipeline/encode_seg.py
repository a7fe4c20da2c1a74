"""DICOM Segmentation (PS3.3 A.51) of an analysis result, built only through highdicom's validating constructor.

Segments (`plan_segments`): one per label that is not a finding (e.g. the lungs), then one per finding
(each nodule its own segment, with the label's codes, "nodule 1", "nodule 2", ... and the same tracking
identifier and UID as the SR measurement group that measures it, so the SR's referenced segment delimits
exactly the measured region). A study without findings therefore gets a SEG holding the organ segments
only; if that would leave no segment at all (a model with finding labels only), one empty segment per
finding label is encoded and, since a SEG needs at least one frame, highdicom then encodes every frame
(all empty). Frame ``k`` of the segment map is slice ``k`` of the source volume (`SourceSeries.frames`),
placed with that slice's own Image Position (Patient): no flips, and enhanced multi-frame sources are
referenced frame by frame. Patient, study and Specific Character Set come from the source images
(highdicom copies them). Pure: returns a dataset; writing it is `pipeline.run`'s job.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from models.spec import CodeSpec, LabelSpec
from pipeline.postprocess import finding_regions
from pipeline.types import SegmentationResult, SourceSeries
from pipeline.uids import ResultUids

if TYPE_CHECKING:
    from models.spec import ModelSpec

log = logging.getLogger(__name__)

MANUFACTURER = "pacs-edge-node project"
MANUFACTURER_MODEL_NAME = "pacs-edge-node"
DEVICE_SERIAL_NUMBER = "edge-node"
SEG_SERIES_NUMBER = 9901
SR_SERIES_NUMBER = 9902


#: Patient and study attributes (Type 2 in the Patient and General Study modules) that highdicom copies
#: from the first source image and requires to be present; de-identified sources often lack them.
TYPE2_COPIED_FROM_SOURCE = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def source_headers(source: SourceSeries) -> list[Dataset]:
    """The source headers to build results from, with missing Type 2 patient/study attributes present
    and empty (strict on output, tolerant on input).

    Headers that lack nothing are passed as they are; the others are copied first, so the loader's
    `SourceSeries` is never modified.
    """
    headers = []
    for ds in source.datasets:
        missing = [keyword for keyword in TYPE2_COPIED_FROM_SOURCE if keyword not in ds]
        if missing:
            copy = Dataset()
            copy.update(ds)
            for keyword in missing:
                setattr(copy, keyword, "")
            ds = copy
        headers.append(ds)
    return headers


def stamp_content_datetime(dataset: Dataset, when: datetime.datetime) -> None:
    """Set every creation timestamp highdicom writes (Content, Instance Creation, Contribution Date/Time)
    to ``when``, so the same job encoded twice gives the same bytes (the worker passes the time the job
    was created; a PACS must never receive two contents under one SOP Instance UID)."""
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S.%f")
    for prefix in ("Content", "InstanceCreation"):
        if f"{prefix}Date" in dataset:
            setattr(dataset, f"{prefix}Date", date)
        if f"{prefix}Time" in dataset:
            setattr(dataset, f"{prefix}Time", time)
    for item in dataset.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = date + time


def software_version() -> str:
    """This product's version (Software Versions (0018,1020) of what we write)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pacs-edge-node")
    except PackageNotFoundError:
        return "0+unknown"


def coded(code: CodeSpec) -> hd.sr.CodedConcept:
    """A manifest code as a highdicom coded concept."""
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


@dataclass(frozen=True, slots=True)
class PlannedSegment:
    """One segment of the SEG: its number (1-based, consecutive), label and, for a finding, its index.

    ``finding_index`` is ``Finding.index`` for a per-finding segment, None for a whole-label segment.
    """

    segment_number: int
    label: LabelSpec
    finding_index: int | None
    segment_label: str
    tracking_id: str | None
    tracking_uid: str | None


@dataclass(frozen=True, slots=True)
class SegmentLayout:
    """The segments of one SEG (see the module docstring for the rule)."""

    segments: tuple[PlannedSegment, ...]

    def segment_of_finding(self, finding_index: int) -> int:
        """Segment number of a finding; raises KeyError if it has none."""
        for segment in self.segments:
            if segment.finding_index == finding_index:
                return segment.segment_number
        raise KeyError(f"finding {finding_index} has no segment")


def finding_tracking_id(label: str, index: int) -> str:
    """Tracking Identifier (TID 4108) of a finding, e.g. ``"nodule 1"``; also its segment label."""
    return f"{label} {index}"[:64]


def plan_segments(result: SegmentationResult, uids: ResultUids) -> SegmentLayout:
    """Decide the segments of the SEG for ``result`` (see the module docstring)."""
    planned: list[PlannedSegment] = []
    for label in result.labels:
        if not label.is_finding:
            planned.append(PlannedSegment(len(planned) + 1, label, None, label.name[:64], None, None))
    labels = {label.value: label for label in result.labels}
    for finding in sorted(result.findings, key=lambda f: f.index):
        tracking_uid = finding.tracking_uid or uids.tracking_uid(finding.index)
        tracking_id = finding_tracking_id(finding.label, finding.index)
        planned.append(
            PlannedSegment(len(planned) + 1, labels[finding.label_value], finding.index, tracking_id, tracking_id, tracking_uid)
        )
    if not planned:
        for label in result.labels:
            planned.append(PlannedSegment(len(planned) + 1, label, None, label.name[:64], None, None))
    if not planned:
        raise ValueError("the model declares no labels: nothing to segment")
    return SegmentLayout(tuple(planned))


def segment_map(result: SegmentationResult, layout: SegmentLayout) -> NDArray[np.uint16]:
    """The segment number of every voxel ``[k, j, i]`` (0 = no segment); segments never overlap.

    Whole-label segments are written with ``np.copyto(..., where=)``, each finding's segment into its
    bounding box alone (no volume-sized index map, no volume-sized comparison per finding).
    """
    labels = result.label_map.array_zyx
    out = np.zeros(labels.shape, dtype=np.uint16)
    for segment in layout.segments:
        if segment.finding_index is None and not segment.label.is_finding:
            np.copyto(out, np.uint16(segment.segment_number), where=labels == segment.label.value)
    if result.findings and any(segment.finding_index is not None for segment in layout.segments):
        regions = finding_regions(result)
        for segment in layout.segments:
            if segment.finding_index is not None:
                box, mask = regions[segment.finding_index]
                out[box][mask] = segment.segment_number
    return out


def encode_seg(
    source: SourceSeries,
    result: SegmentationResult,
    spec: ModelSpec,
    uids: ResultUids,
    *,
    layout: SegmentLayout | None = None,
    series_description: str | None = None,
    series_number: int = SEG_SERIES_NUMBER,
    instance_number: int = 1,
    content_datetime: datetime.datetime | None = None,
) -> hd.seg.Segmentation:
    """Build the Segmentation instance of one analysis.

    Parameters
    ----------
    source
        The analysed series; ``source.frames[k]`` is the source of slice k of ``result.label_map``.
    result
        Postprocessed result on the source grid.
    spec
        The model's manifest: algorithm name, version and family (Segmentation Algorithm Identification
        Sequence), ``segmentation.type`` (BINARY or FRACTIONAL), default series description.
    uids
        Result UIDs (`pipeline.uids.plan_result_uids`): SEG Series and SOP Instance UIDs, tracking UIDs.
    layout
        The segments (`plan_segments`); computed when omitted. Pass the same layout to `encode_sr`.
    series_description
        Series Description (0008,103E); default ``spec.outputs.seg_series_description``.
    content_datetime
        Content and instance creation date/time; None = now. With a fixed value the SEG is identical,
        byte for byte, each time the same result is encoded (`stamp_content_datetime`).

    Returns
    -------
    highdicom.seg.Segmentation

    Raises
    ------
    ValueError
        If the result's grid does not match the source (a programming error upstream) or highdicom
        rejects an argument.
    """
    volume = result.label_map
    if volume.shape_zyx != source.volume.shape_zyx or len(source.frames) != volume.shape_zyx[0]:
        raise ValueError(
            f"result grid {volume.shape_zyx} does not match the source ({source.volume.shape_zyx}, "
            f"{len(source.frames)} frames)"
        )
    layout = layout if layout is not None else plan_segments(result, uids)
    algorithm = hd.AlgorithmIdentificationSequence(name=spec.name, family=coded(spec.family), version=spec.version)
    descriptions = []
    for segment in layout.segments:
        label = segment.label
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=segment.segment_number,
                segment_label=segment.segment_label,
                segmented_property_category=coded(label.category),
                segmented_property_type=coded(label.type),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                tracking_uid=segment.tracking_uid,
                tracking_id=segment.tracking_id,
                anatomic_regions=[coded(label.finding_site)] if label.finding_site is not None else None,
                display_color=hd.color.CIELabColor.from_rgb(*label.color_rgb),
            )
        )
    numbers = segment_map(result, layout)
    segmentation_type = str(getattr(spec.segmentation.type, "value", spec.segmentation.type)).upper()
    if segmentation_type == "FRACTIONAL":
        pixel_array = _fractional_array(result, layout, numbers)
    else:
        segmentation_type = "BINARY"
        pixel_array = numbers
    orientation = _image_orientation(volume.affine_lps)
    if _planes_are_the_source_headers(source, orientation):
        # highdicom takes the planes from the source headers themselves and references slice k's
        # instance directly. Given explicit positions it would match every plane against every source
        # image (quadratic: 0.3 s for 300 slices) only to arrive at the same references and positions.
        plane_positions = None
        plane_orientation = None
    else:
        plane_positions = [
            hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, frame.image_position_lps_mm)
            for frame in source.frames
        ]
        plane_orientation = hd.PlaneOrientationSequence(hd.CoordinateSystemNames.PATIENT, orientation)
    seg = hd.seg.Segmentation(
        source_images=source_headers(source),
        pixel_array=pixel_array,
        segmentation_type=segmentation_type,
        segment_descriptions=descriptions,
        series_instance_uid=uids.seg_series_instance_uid,
        series_number=series_number,
        sop_instance_uid=uids.seg_sop_instance_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MANUFACTURER_MODEL_NAME,
        software_versions=[software_version(), f"{spec.name} {spec.version}"[:64]],
        device_serial_number=DEVICE_SERIAL_NUMBER,
        plane_orientation=plane_orientation,
        plane_positions=plane_positions,
        content_description=f"{spec.name} {spec.version}"[:64],
        content_label="SEGMENTATION",
        content_creator_name=None,
        omit_empty_frames=True,
    )
    seg.SeriesDescription = (series_description or spec.outputs.seg_series_description)[:64]
    # highdicom draws a random Dimension Organization UID; ours derives from the inputs like every
    # other result UID (it is referenced from the Dimension Index Sequence too).
    for item in [*seg.DimensionOrganizationSequence, *seg.get("DimensionIndexSequence", [])]:
        item.DimensionOrganizationUID = uids.seg_dimension_organization_uid
    if content_datetime is not None:
        stamp_content_datetime(seg, content_datetime)
    log.info(
        "event=seg_encoded model=%s segments=%d frames=%d type=%s",
        spec.name,
        len(layout.segments),
        int(seg.NumberOfFrames),
        segmentation_type,
    )
    return seg


def _planes_are_the_source_headers(source: SourceSeries, orientation: tuple[float, ...]) -> bool:
    """Whether slice ``k`` of the volume is exactly the ``k``-th source header: single-frame instances,
    one per slice, in volume order, at the Image Position and Orientation (Patient) the loader used."""
    if len(source.datasets) != len(source.frames):
        return False
    for ds, frame in zip(source.datasets, source.frames, strict=True):
        if frame.frame_number is not None or ds.get("SOPInstanceUID") != frame.sop_instance_uid:
            return False
        position, cosines = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
        if position is None or cosines is None or len(position) != 3 or len(cosines) != 6:
            return False
        if not np.allclose([float(v) for v in position], frame.image_position_lps_mm, rtol=0.0, atol=1e-4):
            return False
        if not np.allclose([float(v) for v in cosines], orientation, rtol=0.0, atol=1e-4):
            return False
    return True


def _image_orientation(affine_lps: NDArray[np.float64]) -> tuple[float, ...]:
    """Image Orientation (Patient) from the affine: row direction cosine, then column direction cosine."""
    row = affine_lps[:3, 0] / np.linalg.norm(affine_lps[:3, 0])
    col = affine_lps[:3, 1] / np.linalg.norm(affine_lps[:3, 1])
    return tuple(float(x) for x in (*row, *col))


def _fractional_array(result: SegmentationResult, layout: SegmentLayout, numbers: NDArray[np.uint16]) -> NDArray[np.float32]:
    """``[k, j, i, segment]`` probabilities for a FRACTIONAL SEG: each segment's label probability inside
    the segment's voxels (0 outside), so thresholding at > 0 gives back the binary segment exactly."""
    out = np.zeros((*numbers.shape, len(layout.segments)), dtype=np.float32)
    for n, segment in enumerate(layout.segments):
        inside = numbers == segment.segment_number
        probability = result.probabilities.get(segment.label.value)
        if probability is None:
            out[..., n][inside] = 1.0
        else:
            # A voxel inside a segment must stay non-zero after 8-bit quantisation (max 255).
            out[..., n][inside] = np.clip(probability[inside], 1.0 / 255.0, 1.0)
    return out
