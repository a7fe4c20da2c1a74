"""run_job: the whole pipeline on a generated chest series with the tiny test model."""

from __future__ import annotations

import datetime
import logging
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from models.registry import ModelRegistry
from pipeline.errors import InputRejectedError
from pipeline.run import JobOutput, run_job
from tests.models.tiny_bundle import make_tiny_bundle
from tests.pipeline.synthetic_chest import JAPANESE_NAME, dciodvfy_errors, write_chest_series

NODULE = ((12.0, 32.0, 20.0), 5.0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    make_tiny_bundle(root / "tiny")
    return root


@pytest.fixture(scope="module")
def resampling_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models-resample")
    make_tiny_bundle(root / "tiny", resample_spacing_mm=(2.5, 1.2, 1.2))
    return root


def _expected_centroid(chest_affine: np.ndarray) -> np.ndarray:
    (k, j, i), _ = NODULE
    return chest_affine[:3, :3] @ np.array([i, j, k]) + chest_affine[:3, 3]


def test_run_job_writes_conformant_seg_and_sr_for_the_nodule(
    tmp_path: Path, model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    chest = write_chest_series(
        tmp_path / "in", nodules=[NODULE], patient_name=JAPANESE_NAME, specific_character_set="ISO_IR 192", reverse_files=True
    )
    out = tmp_path / "out"
    job = run_job(list(chest.paths), out, model=ModelRegistry(model_dir).get("tiny_test_model"), device="cpu")
    assert isinstance(job, JobOutput)
    assert sorted(p.name for p in out.iterdir()) == sorted([job.seg_path.name, job.sr_path.name])  # no temp files
    assert job.seg_path.name == f"SEG_{job.seg_sop_instance_uid}.dcm"
    (finding,) = job.findings
    assert finding.label == "Nodule" and finding.tracking_uid
    assert np.linalg.norm(np.subtract(finding.centroid_lps_mm, _expected_centroid(chest.affine_lps))) < 2.0
    assert 6.0 < finding.diameter_mm < 12.0
    assert job.study_finding is not None and job.study_finding.present
    assert all(getattr(job.timings, name) >= 0 for name in ("load", "preprocess", "infer", "postprocess", "encode"))
    assert (job.series_instance_uid, job.study_instance_uid) == (chest.series_instance_uid, chest.study_instance_uid)
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "event=job_done" in logged
    for phi in (JAPANESE_NAME, "山田", "SYN-0001", "19700101", "ACC0001"):  # name, ID, birth date, accession
        assert phi not in logged

    seg = hd.seg.segread(job.seg_path)
    sr = hd.sr.srread(job.sr_path)
    for ds in (seg, sr):
        assert str(ds.PatientName) == JAPANESE_NAME and ds.StudyInstanceUID == chest.study_instance_uid
    assert seg.SeriesDescription.endswith("NOT FOR DIAGNOSTIC USE")
    (group,) = sr.content.get_volumetric_roi_measurement_groups()
    assert group.tracking_uid == finding.tracking_uid
    number = group.referenced_segment.referenced_segment_numbers[0]
    assert seg.get_segment_description(number).TrackingUID == finding.tracking_uid
    source_uids = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in chest.paths]
    nodule_map = seg.get_pixels_by_source_instance(source_uids, segment_numbers=[number], assert_missing_frames_are_empty=True)
    assert int(np.asarray(nodule_map).sum()) == finding.voxel_count
    assert dciodvfy_errors(job.seg_path) == [] and dciodvfy_errors(job.sr_path) == []


def test_run_job_twice_gives_the_same_result_uids_and_files(tmp_path: Path, model_dir: Path) -> None:
    chest = write_chest_series(tmp_path / "in", nodules=[NODULE])
    spec = ModelRegistry(model_dir).get("tiny_test_model")
    when = datetime.datetime(2026, 3, 4, 5, 6, 7)
    first = run_job(list(chest.paths), tmp_path / "out", model=spec, device="cpu", content_datetime=when)
    seg_bytes, sr_bytes = first.seg_path.read_bytes(), first.sr_path.read_bytes()
    again = run_job(list(reversed(chest.paths)), tmp_path / "out", model=spec, device="cpu", content_datetime=when)
    assert (first.seg_path, first.sr_path) == (again.seg_path, again.sr_path)
    assert (again.seg_path.read_bytes(), again.sr_path.read_bytes()) == (seg_bytes, sr_bytes)
    assert first.sr_sop_instance_uid == again.sr_sop_instance_uid
    assert [f.tracking_uid for f in first.findings] == [f.tracking_uid for f in again.findings]
    assert len(list((tmp_path / "out").iterdir())) == 2


def test_run_job_picks_the_model_that_accepts_the_series(tmp_path: Path, model_dir: Path) -> None:
    chest = write_chest_series(tmp_path / "in", nodules=[])
    job = run_job(list(chest.paths), tmp_path / "out", registry=ModelRegistry(model_dir), device="cpu",
                  sr_series_description="Nodules - research")
    assert job.model_name == "tiny_test_model"
    assert job.findings == () and job.study_finding is not None and not job.study_finding.present
    assert pydicom.dcmread(job.sr_path).SeriesDescription == "Nodules - research"
    assert dciodvfy_errors(job.sr_path) == []


def test_run_job_rejects_a_series_no_model_accepts(tmp_path: Path) -> None:
    models = tmp_path / "models"
    make_tiny_bundle(models / "tiny", min_slices=100)
    chest = write_chest_series(tmp_path / "in", slices=12, nodules=[])
    with pytest.raises(InputRejectedError) as caught:
        run_job(list(chest.paths), tmp_path / "out", registry=ModelRegistry(models), device="cpu")
    assert caught.value.reason == "no_model"
    assert "tiny_test_model" in str(caught.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_run_job_maps_a_resampled_prediction_back_onto_the_source_grid(tmp_path: Path, resampling_model_dir: Path) -> None:
    chest = write_chest_series(tmp_path / "in", nodules=[NODULE])
    job = run_job(list(chest.paths), tmp_path / "out", model=ModelRegistry(resampling_model_dir).get("tiny_test_model"),
                  device="cpu")
    seg = hd.seg.segread(job.seg_path)
    assert seg.Rows == 64 and seg.Columns == 64
    assert len(job.findings) == 1
    assert np.linalg.norm(np.subtract(job.findings[0].centroid_lps_mm, _expected_centroid(chest.affine_lps))) < 3.0
    assert dciodvfy_errors(job.seg_path) == []


def test_run_job_on_an_enhanced_multiframe_ct_references_its_frames(tmp_path: Path, model_dir: Path) -> None:
    chest = write_chest_series(tmp_path / "in", enhanced=True, reverse_files=True, nodules=[NODULE])
    job = run_job(list(chest.paths), tmp_path / "out", model=ModelRegistry(model_dir).get("tiny_test_model"), device="cpu")
    (finding,) = job.findings
    assert np.linalg.norm(np.subtract(finding.centroid_lps_mm, _expected_centroid(chest.affine_lps))) < 2.0
    seg = hd.seg.segread(job.seg_path)
    (source,) = chest.datasets
    frames = len(chest.frame_positions)
    # Frames are stored top-down: volume slice k is source frame (frames - k).
    pixels = seg.get_pixels_by_source_frame(
        source.SOPInstanceUID, [frames - k for k in range(frames)], combine_segments=True,
        assert_missing_frames_are_empty=True,
    )
    number = hd.sr.srread(job.sr_path).content.get_volumetric_roi_measurement_groups()[0].referenced_segment.referenced_segment_numbers[0]
    assert sorted({k for k, _, _ in zip(*np.nonzero(np.asarray(pixels) == number))}) == list(finding.slice_indices)
    assert dciodvfy_errors(job.seg_path) == [] and dciodvfy_errors(job.sr_path) == []


def test_run_job_writes_a_fractional_seg_when_the_manifest_asks(tmp_path: Path) -> None:
    make_tiny_bundle(tmp_path / "models" / "tiny", segmentation_type="FRACTIONAL")
    chest = write_chest_series(tmp_path / "in", nodules=[NODULE])
    job = run_job(list(chest.paths), tmp_path / "out", registry=ModelRegistry(tmp_path / "models"), device="cpu")
    seg = hd.seg.segread(job.seg_path)
    assert seg.SegmentationType == "FRACTIONAL"
    (finding,) = job.findings
    source_uids = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in chest.paths]
    number = hd.sr.srread(job.sr_path).content.get_volumetric_roi_measurement_groups()[0].referenced_segment.referenced_segment_numbers[0]
    values = np.asarray(seg.get_pixels_by_source_instance(source_uids, segment_numbers=[number], assert_missing_frames_are_empty=True))
    assert int((values > 0).sum()) == finding.voxel_count
    assert 0.5 <= float(values[values > 0].min()) and float(values.max()) <= 1.0
    assert dciodvfy_errors(job.seg_path) == [] and dciodvfy_errors(job.sr_path) == []
