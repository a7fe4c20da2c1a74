"""``edge-node analyze``: through the real CLI entry point (node.cli.main), with the tiny test model."""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from node.cli import main
from pipeline.analyze import EXIT_FAILURE, EXIT_NOTHING_ANALYSABLE, EXIT_OK, EXIT_USAGE
from tests.models.tiny_bundle import make_tiny_bundle
from tests.pipeline.synthetic_chest import dciodvfy_errors, write_chest_series


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    make_tiny_bundle(root / "tiny")
    return root


def test_analyze_json_lists_outputs_and_findings_per_series(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    chest = write_chest_series(tmp_path / "in" / "a", nodules=[((12.0, 32.0, 20.0), 5.0)])
    other = write_chest_series(tmp_path / "in" / "b", nodules=[], seed=3)
    (tmp_path / "in" / "notes.txt").write_text("not DICOM")
    code = main(["analyze", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--json",
                 "--model-dir", str(model_dir), "--device", "cpu", "--model", "tiny_test_model"])
    captured = capsys.readouterr()
    assert code == EXIT_OK, captured.err
    report = json.loads(captured.out)
    by_series = {item["series_instance_uid"]: item for item in report["analysed"]}
    assert set(by_series) == {chest.series_instance_uid, other.series_instance_uid}
    item = by_series[chest.series_instance_uid]
    assert item["model"] == "tiny_test_model"
    (finding,) = item["findings"]
    assert {"label", "volume_ml", "diameter_mm", "centroid_lps_mm", "score"} <= set(finding)
    assert finding["label"] == "Nodule" and len(finding["centroid_lps_mm"]) == 3
    assert item["study_finding"]["present"] is True
    assert by_series[other.series_instance_uid]["findings"] == []
    assert by_series[other.series_instance_uid]["study_finding"]["present"] is False
    seg = hd.seg.segread(item["seg_path"])
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == chest.series_instance_uid
    assert hd.sr.srread(item["sr_path"]).StudyInstanceUID == chest.study_instance_uid
    assert dciodvfy_errors(Path(item["seg_path"])) == [] and dciodvfy_errors(Path(item["sr_path"])) == []


def test_analyze_prints_a_findings_table_and_lists_skipped_series(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_chest_series(tmp_path / "in" / "chest", nodules=[((12.0, 32.0, 20.0), 5.0)])
    short = write_chest_series(tmp_path / "in" / "short", slices=3, nodules=[], seed=5)  # min_slices = 4
    code = main(["analyze", str(tmp_path / "in"), "--out", str(tmp_path / "out"),
                 "--model-dir", str(model_dir), "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == EXIT_OK
    assert "Nodule" in out and "volume_ml" in out and "SEG " in out and "SR " in out
    assert f"skipped series {short.series_instance_uid}" in out


def test_analyze_exits_4_when_nothing_is_analysable(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["analyze", str(tmp_path / "empty"), "--out", str(tmp_path / "out"),
                 "--model-dir", str(model_dir)]) == EXIT_NOTHING_ANALYSABLE
    assert "no DICOM files" in capsys.readouterr().err
    short = write_chest_series(tmp_path / "short", slices=3, nodules=[])
    assert main(["analyze", str(tmp_path / "short"), "--out", str(tmp_path / "out"), "--json",
                 "--model-dir", str(model_dir)]) == EXIT_NOTHING_ANALYSABLE
    report = json.loads(capsys.readouterr().out)
    assert report["analysed"] == [] and report["skipped"][0]["series_instance_uid"] == short.series_instance_uid
    assert "tiny_test_model" in report["skipped"][0]["reason"]


def test_analyze_lists_a_series_the_loader_rejects_with_its_reason(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    chest = write_chest_series(tmp_path / "in", slices=8, nodules=[])
    gap = sorted(chest.paths)[4]
    gap.unlink()  # a missing slice in the middle of the stack
    code = main(["analyze", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--json",
                 "--model-dir", str(model_dir), "--device", "cpu"])
    report = json.loads(capsys.readouterr().out)
    assert code == EXIT_NOTHING_ANALYSABLE
    (rejected,) = report["rejected"]
    assert rejected["series_instance_uid"] == chest.series_instance_uid and rejected["reason"]


def test_analyze_usage_errors_exit_2(tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_chest_series(tmp_path / "in", slices=4, nodules=[])
    base = ["analyze", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--model-dir", str(model_dir)]
    assert main([*base, "--model", "no_such_model"]) == EXIT_USAGE
    assert "no_such_model" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == EXIT_USAGE
    assert main(["analyze", "--out", str(tmp_path / "out")]) == EXIT_USAGE  # no PATH
    assert main([*base, "--device", "tpu"]) == EXIT_USAGE
    assert "tpu" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_analyze_on_a_generated_chest_ct_gives_conformant_cross_referenced_results(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's acceptance: `edge-node analyze` on a generated chest CT (models.phantoms)."""
    from models.phantoms import generate_phantom, write_phantom_series

    phantom = generate_phantom(11, shape_zyx=(24, 96, 96), spacing_mm=(2.5, 2.5, 2.5), nodules=2)
    files = write_phantom_series(phantom, tmp_path / "in")
    code = main(["analyze", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--json",
                 "--model-dir", str(model_dir), "--device", "cpu"])
    assert code == EXIT_OK
    (item,) = json.loads(capsys.readouterr().out)["analysed"]
    assert item["findings"] and item["study_finding"]["present"] is True
    seg = hd.seg.segread(item["seg_path"])
    sr = hd.sr.srread(item["sr_path"])
    source_uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in files}
    referenced = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == source_uids
    assert seg.FrameOfReferenceUID == pydicom.dcmread(files[0], stop_before_pixels=True).FrameOfReferenceUID
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert [g.tracking_uid for g in groups] == [f["tracking_uid"] for f in item["findings"]]
    for group in groups:
        (number,) = group.referenced_segment.referenced_segment_numbers
        assert group.referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert seg.get_segment_description(number).TrackingUID == group.tracking_uid
    assert dciodvfy_errors(Path(item["seg_path"])) == [] and dciodvfy_errors(Path(item["sr_path"])) == []


def test_analyze_exits_1_when_an_analysis_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = make_tiny_bundle(tmp_path / "models" / "tiny")
    (bundle / "weights.pt").write_bytes(b"not the weights the manifest names")
    chest = write_chest_series(tmp_path / "in", slices=6, nodules=[])
    code = main(["analyze", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--json",
                 "--model-dir", str(tmp_path / "models"), "--device", "cpu"])
    report = json.loads(capsys.readouterr().out)
    assert code == EXIT_FAILURE
    (failed,) = report["failed"]
    assert failed["series_instance_uid"] == chest.series_instance_uid and "sha256" in failed["error"].lower()
