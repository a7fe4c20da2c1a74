"""Comprehensive 3D SR holding a TID 1500 Measurement Report of an analysis, built with highdicom.

Content (PS3.16 TID 1500): language, observation context with a device observer (TID 1004: UID,
name, manufacturer, model name = the model's name and version), procedure reported (CT of chest), the
image library (the source images), then

- one TID 1411 Volumetric ROI group per finding: tracking identifier ("nodule 1") and UID (the same as
  its SEG segment's), finding type and category (the label's codes), finding site (the label's
  ``finding_site``), algorithm identification (TID 4019: model name and version), the referenced SEG
  segment (with the source images it was derived from), and the measurements volume (SCT 118565006,
  UCUM ``ml``), longest axial diameter (SCT 81827009, ``mm``), mean and standard deviation of the
  attenuation (DCM 112031 with derivation SCT 373098007 Mean / SCT 386136009 Standard Deviation,
  ``[hnsf'U]``) and the finding's score (DCM 122157 Probability, UCUM ``1``);
- one TID 1501 group for the study-level finding: its code with a qualitative evaluation Present
  (SCT 52101004) or Absent (SCT 272519000) and its score. A study without findings thus states
  explicitly that no nodule was found.

Pure: returns a dataset; writing it is `pipeline.run`'s job.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import highdicom as hd
from pydicom.valuerep import format_number_as_ds
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from pipeline.encode_seg import (
    MANUFACTURER,
    MANUFACTURER_MODEL_NAME,
    SR_SERIES_NUMBER,
    SegmentLayout,
    coded,
    finding_tracking_id,
    plan_segments,
    source_headers,
    stamp_content_datetime,
)
from pipeline.types import Finding, SegmentationResult, SourceSeries, StudyFinding
from pipeline.uids import ResultUids

if TYPE_CHECKING:
    from models.spec import ModelSpec

log = logging.getLogger(__name__)

#: SCT 169069000 "Computed tomography of chest" (CID 100 family): the procedure the report is about.
PROCEDURE_CT_CHEST = hd.sr.CodedConcept("169069000", "SCT", "Computed tomography of chest")
VOLUME = codes.SCT.Volume  # 118565006
DIAMETER = codes.SCT.Diameter  # 81827009
ATTENUATION = codes.DCM.AttenuationCoefficient  # 112031
MEAN = codes.SCT.Mean  # 373098007
STANDARD_DEVIATION = codes.SCT.StandardDeviation  # 386136009
PROBABILITY = codes.DCM.Probability  # 122157
PRESENT = codes.SCT.Present  # 52101004
ABSENT = codes.SCT.Absent  # 272519000
UNIT_ML = hd.sr.CodedConcept("ml", "UCUM", "milliliter")
UNIT_MM = hd.sr.CodedConcept("mm", "UCUM", "millimeter")
UNIT_HU = hd.sr.CodedConcept("[hnsf'U]", "UCUM", "Hounsfield unit")
UNIT_ONE = hd.sr.CodedConcept("1", "UCUM", "no units")
STUDY_FINDING_TRACKING_ID = "study finding"


def encode_sr(
    source: SourceSeries,
    result: SegmentationResult,
    seg: hd.seg.Segmentation,
    spec: ModelSpec,
    uids: ResultUids,
    *,
    layout: SegmentLayout | None = None,
    series_description: str | None = None,
    series_number: int = SR_SERIES_NUMBER,
    instance_number: int = 1,
    previous_versions: Sequence[Dataset] = (),
    content_datetime: datetime.datetime | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 Measurement Report of one analysis as a Comprehensive 3D SR.

    Parameters
    ----------
    source
        The analysed series (evidence and image library).
    result
        The postprocessed result whose findings are reported.
    seg
        The SEG built by `pipeline.encode_seg.encode_seg` from the same result and layout; the SR
        references its segments and lists it as evidence.
    spec
        The model's manifest (algorithm name/version/family, study finding code, default description).
    uids
        Result UIDs: SR Series and SOP Instance UIDs, device observer UID, tracking UIDs.
    layout
        The SEG's segment layout; recomputed from ``result`` when omitted (it is deterministic).
    series_description
        Series Description (0008,103E); default ``spec.outputs.sr_series_description``.
    previous_versions
        Earlier SRs of the same study this one replaces (a re-run after late instances arrived); they
        are named in the Predecessor Documents Sequence (0040,A360).
    content_datetime
        Content and instance creation date/time; None = now (see `encode_seg.stamp_content_datetime`).

    Returns
    -------
    highdicom.sr.Comprehensive3DSR

    Raises
    ------
    KeyError
        If a finding has no segment in ``layout``.
    ValueError
        If highdicom rejects the content.
    """
    layout = layout if layout is not None else plan_segments(result, uids)
    algorithm = hd.sr.AlgorithmIdentification(name=spec.name, version=spec.version, family=coded(spec.family))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=uids.device_observer_uid,
            name=MANUFACTURER_MODEL_NAME,
            manufacturer_name=MANUFACTURER,
            model_name=f"{spec.name} {spec.version}"[:64],
        ),
    )
    groups: list[
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations | hd.sr.MeasurementsAndQualitativeEvaluations
    ] = [
        _finding_group(finding, result, seg, layout, uids, algorithm)
        for finding in sorted(result.findings, key=lambda f: f.index)
    ]
    if result.study_finding is not None:
        groups.append(_study_group(result.study_finding, spec, uids, algorithm))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE_CT_CHEST,
        imaging_measurements=groups,
    )
    _insert_image_library(report, image_library_headers(source))
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*source_headers(source), seg],
        content=report,
        series_instance_uid=uids.sr_series_instance_uid,
        series_number=series_number,
        sop_instance_uid=uids.sr_sop_instance_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        previous_versions=list(previous_versions) or None,
    )
    sr.SeriesDescription = (series_description or spec.outputs.sr_series_description)[:64]
    if content_datetime is not None:
        stamp_content_datetime(sr, content_datetime)
    log.info(
        "event=sr_encoded model=%s findings=%d study_finding=%s",
        spec.name,
        len(result.findings),
        "none" if result.study_finding is None else ("present" if result.study_finding.present else "absent"),
    )
    return sr


def image_library_headers(source: SourceSeries) -> list[Dataset]:
    """Minimal headers describing each source instance for the image library (TID 1601/1602/1604).

    highdicom's image library reads Pixel Spacing, Slice Thickness and Image Orientation/Position
    (Patient) from the top level of each dataset, which enhanced multi-frame images keep in functional
    groups and some scanners omit; the values are therefore taken from the loaded geometry (for a
    multi-frame instance: its first frame in volume order), never guessed.
    """
    affine = source.volume.affine_lps
    spacing_k, spacing_j, spacing_i = source.volume.spacing_mm
    row = affine[:3, 0] / spacing_i
    col = affine[:3, 1] / spacing_j
    first_frame = {}
    for frame in source.frames:
        first_frame.setdefault(frame.sop_instance_uid, frame)
    headers = []
    for ds in source.datasets:
        frame = first_frame.get(ds.SOPInstanceUID)
        if frame is None:
            continue
        header = Dataset()
        for keyword in ("SOPClassUID", "SOPInstanceUID", "Modality", "Rows", "Columns", "FrameOfReferenceUID", "NumberOfFrames"):
            if keyword in ds:
                setattr(header, keyword, ds[keyword].value)
        header.PixelSpacing = [_ds(spacing_j), _ds(spacing_i)]
        thickness = ds.get("SliceThickness")
        if thickness in (None, ""):
            thickness = _shared_slice_thickness(ds)
        header.SliceThickness = thickness if thickness not in (None, "") else _ds(spacing_k)
        header.ImageOrientationPatient = [_ds(x) for x in (*row, *col)]
        header.ImagePositionPatient = [_ds(x) for x in frame.image_position_lps_mm]
        headers.append(header)
    return headers


#: Concept names of the per-image descriptors (TID 1602), left out of the shared group descriptors.
_PER_IMAGE_DESCRIPTORS = {
    codes.DCM.ImagePositionPatientX.value,
    codes.DCM.ImagePositionPatientY.value,
    codes.DCM.ImagePositionPatientZ.value,
}


def _insert_image_library(report: hd.sr.MeasurementReport, headers: list[Dataset]) -> None:
    """Add the Image Library (TID 1600) to ``report``, right before Imaging Measurements.

    One Image Library Group holds the descriptors the images share (TID 1602 at group level: modality,
    frame of reference, matrix, pixel spacing, slice thickness, orientation) and one entry (TID 1601) per
    image, a bare image reference (its descriptors are optional, and each image's position is in the
    image itself). highdicom's own library repeats every descriptor in every entry: for a 300-slice CT
    that made the SR's encoding ~5 s slower (measured), and per-entry positions alone cost ~2 s.
    """
    if not headers:
        return
    shared = [
        item
        for item in hd.sr.ImageLibraryEntryDescriptors(headers[0])
        if item.ConceptNameCodeSequence[0].CodeValue not in _PER_IMAGE_DESCRIPTORS
    ]
    group = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibraryGroup, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    group.ContentSequence = hd.sr.ContentSequence(shared)
    for header in headers:
        entry = hd.sr.ImageContentItem(
            name=hd.sr.CodedConcept("260753009", "SCT", "Source"),
            referenced_sop_class_uid=header.SOPClassUID,
            referenced_sop_instance_uid=header.SOPInstanceUID,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        group.ContentSequence.append(entry)
    library = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibrary, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    library.ContentSequence = hd.sr.ContentSequence([group])
    content = report[0].ContentSequence
    position = next(
        n for n, item in enumerate(content) if item.ConceptNameCodeSequence[0].CodeValue == codes.DCM.ImagingMeasurements.value
    )
    content.insert(position, library)


def _shared_slice_thickness(ds: Dataset) -> object:
    try:
        return ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SliceThickness
    except (AttributeError, IndexError, KeyError):
        return None


def _ds(value: float) -> str:
    """A decimal string (VR DS, at most 16 characters)."""
    return format_number_as_ds(float(value))


def _finding_group(
    finding: Finding,
    result: SegmentationResult,
    seg: hd.seg.Segmentation,
    layout: SegmentLayout,
    uids: ResultUids,
    algorithm: hd.sr.AlgorithmIdentification,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    label = next(spec for spec in result.labels if spec.value == finding.label_value)
    tracking = hd.sr.TrackingIdentifier(
        uid=finding.tracking_uid or uids.tracking_uid(finding.index),
        identifier=finding_tracking_id(finding.label, finding.index),
    )
    sites = [hd.sr.FindingSite(coded(label.finding_site))] if label.finding_site is not None else None

    def measure(name: object, value: float, unit: hd.sr.CodedConcept, derivation: object = None) -> hd.sr.Measurement:
        return hd.sr.Measurement(
            name=name,  # type: ignore[arg-type]
            value=float(value),
            unit=unit,
            derivation=derivation,  # type: ignore[arg-type]
            algorithm_id=algorithm,
        )

    measurements = [
        measure(VOLUME, round(finding.volume_ml, 4), UNIT_ML),
        measure(DIAMETER, round(finding.diameter_mm, 2), UNIT_MM),
        measure(ATTENUATION, round(finding.mean_hu, 1), UNIT_HU, MEAN),
        measure(ATTENUATION, round(finding.std_hu, 1), UNIT_HU, STANDARD_DEVIATION),
        measure(PROBABILITY, round(finding.score, 4), UNIT_ONE),
    ]
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        referenced_segment=hd.sr.ReferencedSegment.from_segmentation(
            seg, segment_number=layout.segment_of_finding(finding.index)
        ),
        finding_type=coded(label.type),
        finding_category=coded(label.category),
        finding_sites=sites,
        algorithm_id=algorithm,
        measurements=measurements,
    )


def _study_group(
    study: StudyFinding,
    spec: ModelSpec,
    uids: ResultUids,
    algorithm: hd.sr.AlgorithmIdentification,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    code = coded(spec.study_finding.code) if spec.study_finding is not None else codes.SCT.Finding
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uids.study_finding_tracking_uid, identifier=STUDY_FINDING_TRACKING_ID
        ),
        finding_type=code,
        algorithm_id=algorithm,
        measurements=[
            hd.sr.Measurement(name=PROBABILITY, value=round(float(study.score), 4), unit=UNIT_ONE, algorithm_id=algorithm)
        ],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=code, value=PRESENT if study.present else ABSENT)],
    )
