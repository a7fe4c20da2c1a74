"""Conformance of the SEG and SR encoders (issue 3, item 10).

Every SEG and SR built here is written, read back with highdicom (`segread`, `srread`), its references
checked against the inputs (series and instance UIDs, frames, frame of reference, segment numbers the
SR references), the segment map compared frame by frame with what was encoded (by the frames' own
Image Position (Patient), so a flip cannot hide), and validated with dciodvfy: zero "Error" lines,
warnings printed.
"""

from __future__ import annotations

import copy
import datetime
from dataclasses import dataclass, replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from models.spec import ModelSpec
import pipeline.encode_seg as encode_seg_module
from pipeline.encode_seg import TYPE2_COPIED_FROM_SOURCE, SegmentLayout, encode_seg, plan_segments, segment_map
from pipeline.encode_sr import encode_sr
from pipeline.postprocess import postprocess
from pipeline.types import SegmentationResult, SourceSeries
from pipeline.uids import ResultUids, plan_result_uids
from tests.pipeline.synthetic_chest import (
    JAPANESE_NAME,
    ChestSeries,
    dciodvfy_errors,
    chest_model_spec,
    probabilities_from_truth,
    source_series_from_chest,
    write_chest_series,
)

@dataclass
class Encoded:
    chest: ChestSeries
    source: SourceSeries
    result: SegmentationResult
    layout: SegmentLayout
    uids: ResultUids
    spec: ModelSpec
    seg_path: Path
    sr_path: Path


def encode_chest(tmp_path: Path, *, spec: ModelSpec | None = None, nodule_p: float = 0.9, **series: object) -> Encoded:
    chest = write_chest_series(tmp_path / "source", **series)  # type: ignore[arg-type]
    spec = spec or chest_model_spec()
    source = source_series_from_chest(chest)
    result = postprocess(
        probabilities_from_truth(chest, nodule_p=nodule_p),
        source.volume,
        spec.labels,
        study_finding=spec.study_finding,
        keep_probabilities=spec.segmentation.type == "FRACTIONAL",
    )
    uids = plan_result_uids([f.sop_instance_uid for f in source.frames], spec.name, spec.version)
    layout = plan_segments(result, uids)
    seg = encode_seg(source, result, spec, uids, layout=layout)
    sr = encode_sr(source, result, seg, spec, uids, layout=layout)
    seg_path, sr_path = tmp_path / "seg.dcm", tmp_path / "sr.dcm"
    seg.save_as(seg_path)
    sr.save_as(sr_path)
    return Encoded(chest, source, result, layout, uids, spec, seg_path, sr_path)


def check_seg(e: Encoded) -> hd.seg.Segmentation:
    seg = hd.seg.segread(e.seg_path)
    assert seg.SOPInstanceUID == e.uids.seg_sop_instance_uid
    assert seg.SeriesInstanceUID == e.uids.seg_series_instance_uid
    assert seg.StudyInstanceUID == e.source.study_instance_uid
    assert seg.FrameOfReferenceUID == e.source.frame_of_reference_uid
    assert seg.SeriesDescription == e.spec.outputs.seg_series_description
    (referenced_series,) = seg.ReferencedSeriesSequence
    assert referenced_series.SeriesInstanceUID == e.source.series_instance_uid
    source_uids = {f.sop_instance_uid for f in e.source.frames}
    assert {i.ReferencedSOPInstanceUID for i in referenced_series.ReferencedInstanceSequence} == source_uids
    # Segments: numbers, codes, tracking identifiers as planned.
    assert [int(s.SegmentNumber) for s in seg.SegmentSequence] == [s.segment_number for s in e.layout.segments]
    for item, planned in zip(seg.SegmentSequence, e.layout.segments, strict=True):
        assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == planned.label.type.value
        assert item.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == e.spec.name
        assert item.SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion == e.spec.version
        if planned.tracking_uid:
            assert item.TrackingUID == planned.tracking_uid and item.TrackingID == planned.tracking_id
    # Frame by frame, located by each SEG frame's own position and derivation reference.
    expected = segment_map(e.result, e.layout)
    volume_positions = np.array([f.image_position_lps_mm for f in e.source.frames])
    decoded = np.zeros_like(expected)
    for number, item in enumerate(seg.PerFrameFunctionalGroupsSequence, start=1):
        position = np.array(item.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        k = int(np.argmin(np.linalg.norm(volume_positions - position, axis=1)))
        assert np.allclose(volume_positions[k], position, atol=1e-3), "a SEG frame lies on no source slice"
        source_item = item.DerivationImageSequence[0].SourceImageSequence[0]
        assert source_item.ReferencedSOPInstanceUID == e.source.frames[k].sop_instance_uid
        if e.source.frames[k].frame_number is not None:
            assert int(source_item.ReferencedFrameNumber) == e.source.frames[k].frame_number
        identification = item if "SegmentIdentificationSequence" in item else seg.SharedFunctionalGroupsSequence[0]
        segment_number = int(identification.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        mask = np.asarray(seg.get_frame(number)) > 0
        decoded[k][mask] = segment_number
    assert np.array_equal(decoded, expected)
    # The same through highdicom's own lookup by source references.
    if e.source.frames[0].frame_number is None:
        pixels = seg.get_pixels_by_source_instance(
            [f.sop_instance_uid for f in e.source.frames], combine_segments=True, assert_missing_frames_are_empty=True
        )
    else:
        pixels = seg.get_pixels_by_source_frame(
            e.source.frames[0].sop_instance_uid,
            [int(f.frame_number) for f in e.source.frames],  # type: ignore[arg-type]
            combine_segments=True,
            assert_missing_frames_are_empty=True,
        )
    assert np.array_equal(np.asarray(pixels), expected)
    assert dciodvfy_errors(e.seg_path) == []
    return seg


def check_sr(e: Encoded) -> hd.sr.Comprehensive3DSR:
    sr = hd.sr.srread(e.sr_path)
    assert sr.SOPInstanceUID == e.uids.sr_sop_instance_uid
    assert sr.SeriesInstanceUID == e.uids.sr_series_instance_uid
    assert sr.StudyInstanceUID == e.source.study_instance_uid
    assert sr.SeriesDescription == e.spec.outputs.sr_series_description
    evidence = {
        (series.SeriesInstanceUID, item.ReferencedSOPInstanceUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert {(e.source.series_instance_uid, f.sop_instance_uid) for f in e.source.frames} <= evidence
    assert (e.uids.seg_series_instance_uid, e.uids.seg_sop_instance_uid) in evidence
    report = sr.content
    groups = report.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(e.result.findings)
    for group, finding in zip(groups, sorted(e.result.findings, key=lambda f: f.index), strict=True):
        assert group.tracking_uid == e.uids.tracking_uid(finding.index)
        referenced = group.referenced_segment
        assert referenced.referenced_sop_instance_uid == e.uids.seg_sop_instance_uid
        assert referenced.referenced_segment_numbers == [e.layout.segment_of_finding(finding.index)]
        sources = {s.referenced_sop_instance_uid for s in referenced.source_images_for_segmentation}
        assert sources and sources <= {f.sop_instance_uid for f in e.source.frames}
        measured = {(m.name.value, m.derivation.value if m.derivation else None): m for m in group.get_measurements()}
        assert measured[("118565006", None)].value == pytest.approx(finding.volume_ml, abs=1e-4)
        assert measured[("118565006", None)].unit.value == "ml"
        assert measured[("81827009", None)].value == pytest.approx(finding.diameter_mm, abs=0.01)
        assert measured[("81827009", None)].unit.value == "mm"
        assert measured[("112031", "373098007")].value == pytest.approx(finding.mean_hu, abs=0.05)
        assert measured[("112031", "373098007")].unit.value == "[hnsf'U]"
        assert measured[("122157", None)].value == pytest.approx(finding.score, abs=1e-4)
        assert group.finding_type.value == "27925004"
        assert [site.value.value for site in group.finding_sites] == ["39607008"]
    (study_group,) = [
        g for g in report.get_image_measurement_groups() if g.tracking_uid == e.uids.study_finding_tracking_uid
    ]
    # highdicom's parser also lists the algorithm family (a CODE item) among the evaluations.
    assert e.spec.study_finding is not None
    (evaluation,) = [
        q for q in study_group.get_qualitative_evaluations() if q.name.value == e.spec.study_finding.code.value
    ]
    assert e.result.study_finding is not None
    assert evaluation.value.value == ("52101004" if e.result.study_finding.present else "272519000")
    assert dciodvfy_errors(e.sr_path) == []
    return sr


def test_seg_and_sr_of_an_axial_series_in_reversed_file_order_conform(tmp_path: Path) -> None:
    e = encode_chest(tmp_path, reverse_files=True, nodules=[((12.0, 32.0, 20.0), 5.0), ((8.0, 30.0, 44.0), 3.0)])
    assert len(e.result.findings) == 2
    check_seg(e)
    check_sr(e)


def test_seg_references_enhanced_multiframe_source_frame_by_frame(tmp_path: Path) -> None:
    e = encode_chest(tmp_path, enhanced=True, reverse_files=True)
    assert e.source.frames[0].frame_number == len(e.source.frames)  # stored top-down
    check_seg(e)
    check_sr(e)


def test_seg_of_an_oblique_series_keeps_the_source_geometry(tmp_path: Path) -> None:
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    e = encode_chest(tmp_path, iop=(c, s, 0.0, 0.0, 0.0, -1.0))  # rotated rows, columns head to foot
    seg = check_seg(e)
    orientation = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    assert np.allclose([float(x) for x in orientation], (c, s, 0.0, 0.0, 0.0, -1.0), atol=1e-6)
    check_sr(e)


def test_study_without_findings_gets_organ_segment_and_an_absent_statement(tmp_path: Path) -> None:
    e = encode_chest(tmp_path, nodules=[])
    assert e.result.findings == ()
    assert [s.label.name for s in e.layout.segments] == ["lung"]
    check_seg(e)
    check_sr(e)


def test_model_with_only_finding_labels_and_no_finding_still_gets_a_valid_seg(tmp_path: Path) -> None:
    base = chest_model_spec()
    spec = chest_model_spec(labels=[base.labels[1]])  # nodule only; its channel is 2
    chest = write_chest_series(tmp_path / "source", nodules=[])
    source = source_series_from_chest(chest)
    result = postprocess(probabilities_from_truth(chest), source.volume, spec.labels, study_finding=spec.study_finding)
    uids = plan_result_uids([f.sop_instance_uid for f in source.frames], spec.name, spec.version)
    layout = plan_segments(result, uids)
    assert [(s.label.name, s.finding_index) for s in layout.segments] == [("nodule", None)]
    seg = encode_seg(source, result, spec, uids, layout=layout)
    assert int(seg.NumberOfFrames) == len(source.frames)  # all empty, all encoded
    e = Encoded(chest, source, result, layout, uids, spec, tmp_path / "seg.dcm", tmp_path / "sr.dcm")
    seg.save_as(e.seg_path)
    encode_sr(source, result, seg, spec, uids, layout=layout).save_as(e.sr_path)
    check_seg(e)
    check_sr(e)


def test_fractional_seg_round_trips_probabilities_inside_each_segment(tmp_path: Path) -> None:
    e = encode_chest(tmp_path, spec=chest_model_spec(segmentation_type="FRACTIONAL"), nodule_p=0.7)
    seg = hd.seg.segread(e.seg_path)
    assert seg.SegmentationType == "FRACTIONAL"
    nodule_segment = e.layout.segment_of_finding(1)
    pixels = seg.get_pixels_by_source_instance(
        [f.sop_instance_uid for f in e.source.frames],
        segment_numbers=[nodule_segment],
        assert_missing_frames_are_empty=True,
    )[..., 0]
    inside = segment_map(e.result, e.layout) == nodule_segment
    assert np.allclose(pixels[inside], 0.7, atol=1 / 255)
    assert np.all(pixels[~inside] == 0)
    assert dciodvfy_errors(e.seg_path) == []
    check_sr(e)


def test_japanese_patient_name_survives_in_seg_and_sr(tmp_path: Path) -> None:
    e = encode_chest(tmp_path, patient_name=JAPANESE_NAME, specific_character_set="ISO_IR 192")
    for path in (e.seg_path, e.sr_path):
        ds = pydicom.dcmread(path)
        assert ds.SpecificCharacterSet == "ISO_IR 192"
        assert str(ds.PatientName) == JAPANESE_NAME
        assert JAPANESE_NAME.encode("utf-8") in path.read_bytes()
    check_seg(e)
    check_sr(e)


def test_same_result_encoded_twice_at_a_fixed_time_gives_identical_bytes(tmp_path: Path) -> None:
    e = encode_chest(tmp_path / "a")
    when = datetime.datetime(2026, 1, 2, 3, 4, 5, 600)
    paths = []
    for n in range(2):
        seg = encode_seg(e.source, e.result, e.spec, e.uids, content_datetime=when)
        sr = encode_sr(e.source, e.result, seg, e.spec, e.uids, content_datetime=when)
        paths += [tmp_path / f"seg{n}.dcm", tmp_path / f"sr{n}.dcm"]
        seg.save_as(paths[-2])
        sr.save_as(paths[-1])
    assert paths[0].read_bytes() == paths[2].read_bytes()
    assert paths[1].read_bytes() == paths[3].read_bytes()
    seg = pydicom.dcmread(paths[0])
    assert (seg.ContentDate, seg.ContentTime) == ("20260102", "030405.000600")
    assert seg.DimensionOrganizationSequence[0].DimensionOrganizationUID == e.uids.seg_dimension_organization_uid


@pytest.mark.parametrize("case", ["axial reversed", "oblique", "enhanced"])
def test_seg_from_the_source_headers_is_the_seg_from_explicit_planes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    case: str) -> None:
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    series = {"axial reversed": {"reverse_files": True}, "oblique": {"iop": (c, s, 0.0, 0.0, 0.0, -1.0)},
              "enhanced": {"enhanced": True, "reverse_files": True}}[case]
    e = encode_chest(tmp_path / "a", **series)  # type: ignore[arg-type]
    orientation = encode_seg_module._image_orientation(e.source.volume.affine_lps)
    # Single-frame sources take their planes from the headers; an enhanced source cannot.
    assert encode_seg_module._planes_are_the_source_headers(e.source, orientation) is (case != "enhanced")
    when = datetime.datetime(2026, 1, 2, 3, 4, 5)
    fast = encode_seg(e.source, e.result, e.spec, e.uids, content_datetime=when)
    monkeypatch.setattr(encode_seg_module, "_planes_are_the_source_headers", lambda source, orientation: False)
    explicit = encode_seg(e.source, e.result, e.spec, e.uids, content_datetime=when)
    fast.save_as(tmp_path / "fast.dcm")
    explicit.save_as(tmp_path / "explicit.dcm")
    assert (tmp_path / "fast.dcm").read_bytes() == (tmp_path / "explicit.dcm").read_bytes()


def test_a_slice_whose_header_disagrees_with_the_volume_keeps_explicit_planes(tmp_path: Path) -> None:
    e = encode_chest(tmp_path / "a")
    orientation = encode_seg_module._image_orientation(e.source.volume.affine_lps)
    assert encode_seg_module._planes_are_the_source_headers(e.source, orientation)
    moved = [copy.deepcopy(ds) for ds in e.source.datasets]
    moved[3].ImagePositionPatient = [float(v) + 0.5 for v in moved[3].ImagePositionPatient]
    assert not encode_seg_module._planes_are_the_source_headers(replace(e.source, datasets=tuple(moved)), orientation)
    assert not encode_seg_module._planes_are_the_source_headers(replace(e.source, datasets=e.source.datasets[:-1]),
                                                                orientation)
    turned = (orientation[3], orientation[4], orientation[5], orientation[0], orientation[1], orientation[2])
    assert not encode_seg_module._planes_are_the_source_headers(e.source, turned)


def test_sr_of_a_rerun_names_its_predecessor(tmp_path: Path) -> None:
    first = encode_chest(tmp_path / "a")
    previous = pydicom.dcmread(first.sr_path)
    uids = plan_result_uids([*(f.sop_instance_uid for f in first.source.frames), "1.2.3.999"], "chest-test", "0.0.1")
    seg = encode_seg(first.source, first.result, first.spec, uids)
    sr = encode_sr(first.source, first.result, seg, first.spec, uids, previous_versions=[previous])
    path = tmp_path / "sr2.dcm"
    sr.save_as(path)
    (study,) = pydicom.dcmread(path).PredecessorDocumentsSequence
    assert study.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == previous.SOPInstanceUID
    assert dciodvfy_errors(path) == []


def test_deidentified_source_without_type2_patient_attributes_still_gives_conformant_results(tmp_path: Path) -> None:
    chest = write_chest_series(tmp_path / "source")
    for path in chest.paths:
        ds = pydicom.dcmread(path)
        for keyword in TYPE2_COPIED_FROM_SOURCE:
            delattr(ds, keyword)
        ds.save_as(path)
    spec = chest_model_spec()
    source = source_series_from_chest(chest)
    result = postprocess(probabilities_from_truth(chest), source.volume, spec.labels, study_finding=spec.study_finding)
    uids = plan_result_uids([f.sop_instance_uid for f in source.frames], spec.name, spec.version)
    layout = plan_segments(result, uids)
    e = Encoded(chest, source, result, layout, uids, spec, tmp_path / "seg.dcm", tmp_path / "sr.dcm")
    seg = encode_seg(source, result, spec, uids, layout=layout)
    seg.save_as(e.seg_path)
    encode_sr(source, result, seg, spec, uids, layout=layout).save_as(e.sr_path)
    assert all("PatientID" not in ds for ds in source.datasets)  # the loader's headers are left alone
    assert pydicom.dcmread(e.seg_path).PatientID == ""
    check_seg(e)
    check_sr(e)


def test_an_organ_label_without_voxels_keeps_its_segment_without_frames(tmp_path: Path) -> None:
    chest = write_chest_series(tmp_path / "source")
    spec = chest_model_spec()
    source = source_series_from_chest(chest)
    probabilities = probabilities_from_truth(chest, lung_p=0.0)
    result = postprocess(probabilities, source.volume, spec.labels, study_finding=spec.study_finding)
    uids = plan_result_uids([f.sop_instance_uid for f in source.frames], spec.name, spec.version)
    layout = plan_segments(result, uids)
    assert [(s.label.name, s.finding_index) for s in layout.segments] == [("lung", None), ("nodule", 1)]
    e = Encoded(chest, source, result, layout, uids, spec, tmp_path / "seg.dcm", tmp_path / "sr.dcm")
    seg = encode_seg(source, result, spec, uids, layout=layout)
    seg.save_as(e.seg_path)
    encode_sr(source, result, seg, spec, uids, layout=layout).save_as(e.sr_path)
    check_seg(e)
    check_sr(e)
