"""The model manifest: strict parsing of model.toml and the routing decision `accepts`."""

from __future__ import annotations

import copy
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.spec import (
    DEFAULT_SR_SERIES_DESCRIPTION,
    CodeSpec,
    ModelSpec,
    SegmentationType,
    SeriesCandidate,
    SeriesCriteriaSpec,
    SpecError,
    StepSpec,
    StudyFindingSource,
    WeightsFormat,
    accepts,
    load_spec,
    parse_spec,
)
from tests.models.tiny_bundle import make_tiny_bundle

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("spec") / "tiny")


@pytest.fixture
def manifest(bundle: Path) -> dict[str, Any]:
    with (bundle / "model.toml").open("rb") as f:
        return tomllib.load(f)


def parse(data: dict[str, Any], bundle: Path) -> ModelSpec:
    return parse_spec(data, bundle_dir=bundle, source="model.toml")


def test_tiny_manifest_parses_into_typed_records(bundle: Path) -> None:
    spec = load_spec(bundle)
    assert spec.name == "tiny_test_model" and spec.version == "1.0.0"
    assert spec.family == CodeSpec("123110", "DCM", "Artificial Intelligence")
    assert spec.architecture.name == "fcn3d"
    assert spec.architecture.params["kernel_sizes"] == (1, 7, 1, 5)
    assert spec.weights.format is WeightsFormat.STATE_DICT
    assert spec.weights_path == bundle / "weights.pt"
    assert spec.series.modality == ("CT",)
    assert [step.op for step in spec.preprocess] == ["clip", "normalize"]
    assert spec.preprocess[1].params["mode"] == "window"
    assert spec.inference.patch_size_zyx == (32, 96, 96)
    assert spec.inference.whole_volume_max_voxels == 2_000_000
    assert [label.value for label in spec.labels] == [1, 2]
    lung, nodule = spec.labels
    assert lung.type == CodeSpec("39607008", "SCT", "Lung")
    assert lung.category == CodeSpec("91723000", "SCT", "Anatomical Structure")
    assert nodule.type == CodeSpec("27925004", "SCT", "Nodule")
    assert nodule.category == CodeSpec("49755003", "SCT", "Morphologically Abnormal Structure")
    assert nodule.is_finding and nodule.finding_site == lung.type and nodule.min_size_mm3 == 10.0
    assert spec.out_channels == 3
    assert spec.segmentation.type is SegmentationType.BINARY
    assert spec.study_finding is not None
    assert spec.study_finding.source is StudyFindingSource.HEAD
    assert spec.outputs.sr_series_description.endswith("NOT FOR DIAGNOSTIC USE")


def test_load_spec_accepts_the_manifest_path_as_well_as_the_folder(bundle: Path) -> None:
    assert load_spec(bundle / "model.toml") == load_spec(bundle)


def test_step_params_are_read_only_and_arrays_become_tuples(manifest: dict[str, Any],
                                                            bundle: Path) -> None:
    manifest["preprocess"].insert(0, {"op": "resample", "spacing_mm": [2.5, 2.0, 2.0]})
    step = parse(manifest, bundle).preprocess[0]
    assert step == StepSpec("resample", {"spacing_mm": (2.5, 2.0, 2.0)})
    with pytest.raises(TypeError):
        step.params["spacing_mm"] = (1.0, 1.0, 1.0)  # type: ignore[index]


@pytest.mark.parametrize(
    ("path", "key"),
    [
        ((), "colour"),
        (("series",), "slice_thickness"),
        (("inference",), "stride"),
        (("weights",), "md5"),
        (("outputs",), "sr_title"),
        (("study_finding",), "cutoff"),
        (("family",), "version"),
    ],
)
def test_unknown_key_is_rejected_with_its_dotted_name(manifest: dict[str, Any], bundle: Path,
                                                      path: tuple[str, ...], key: str) -> None:
    table = manifest
    for part in path:
        table = table[part]
    table[key] = 1
    dotted = ".".join((*path, key))
    with pytest.raises(SpecError, match=rf"unknown key {dotted}\b"):
        parse(manifest, bundle)


def test_unknown_key_in_a_label_names_the_label(manifest: dict[str, Any], bundle: Path) -> None:
    manifest["labels"][1]["colour"] = [1, 2, 3]
    with pytest.raises(SpecError, match=r"unknown key labels\[1\]\.colour"):
        parse(manifest, bundle)


@pytest.mark.parametrize("key", ["name", "weights", "labels", "inference"])
def test_missing_required_key_is_named(manifest: dict[str, Any], bundle: Path, key: str) -> None:
    del manifest[key]
    with pytest.raises(SpecError, match=rf"missing key {key}"):
        parse(manifest, bundle)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda m: m["inference"].update(patch_size_zyx=[16, 64]), "inference.patch_size_zyx"),
        (lambda m: m["inference"].update(overlap=1.0), "inference.overlap"),
        (lambda m: m["inference"].update(batch_size=0), "inference.batch_size"),
        (lambda m: m["labels"][0].update(color_rgb=[0, 0, 300]), r"labels\[0\]\.color_rgb"),
        (lambda m: m["labels"][0].update(value=0), r"labels\[0\]\.value"),
        (lambda m: m["labels"][1].update(value=1), "label values must be unique"),
        (lambda m: m["labels"][0].update(threshold="high"), r"labels\[0\]\.threshold"),
        (lambda m: m["labels"][1].update(peak_threshold=1.5), r"labels\[1\]\.peak_threshold"),
        (lambda m: m["labels"][1].update(edge_refinement="snake"), r"labels\[1\]\.edge_refinement"),
        (lambda m: m["labels"][1].update(edge_min_probability=-0.1), r"labels\[1\]\.edge_min_probability"),
        (lambda m: m["labels"][1].update(edge_margin_mm=-1.0), r"labels\[1\]\.edge_margin_mm"),
        (lambda m: m["weights"].update(sha256="abc"), "weights.sha256"),
        (lambda m: m["weights"].update(format="onnx"), "weights.format"),
        (lambda m: m["weights"].update(file="../elsewhere.pt"), "weights.file"),
        (lambda m: m["architecture"].update(name="vit"), "architecture.name"),
        (lambda m: m["architecture"]["params"].update(out_channels=4),
         "architecture.params.out_channels"),
        (lambda m: m["preprocess"].append({"op": "sharpen"}), r"preprocess\[2\]\.op"),
        (lambda m: m["series"].update(series_description_regex="("), "series_description_regex"),
        (lambda m: m["segmentation"].update(type="PROBABILITY"), "segmentation.type"),
        (lambda m: m["study_finding"].update(source="vote"), "study_finding.source"),
        (lambda m: m["outputs"].update(sr_series_description="x" * 65), "sr_series_description"),
        (lambda m: m.update(name="no spaces allowed"), "name"),
    ],
)
def test_invalid_value_is_rejected_naming_the_key(manifest: dict[str, Any], bundle: Path,
                                                  mutate: Any, message: str) -> None:
    mutate(manifest)
    with pytest.raises(SpecError, match=message):
        parse(manifest, bundle)


def test_invalid_toml_and_missing_manifest_are_spec_errors(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="no model.toml"):
        load_spec(tmp_path)
    (tmp_path / "model.toml").write_text("name = [", encoding="utf-8")
    with pytest.raises(SpecError, match="invalid TOML"):
        load_spec(tmp_path)


def test_optional_sections_take_documented_defaults(manifest: dict[str, Any], bundle: Path) -> None:
    for key in ("outputs", "segmentation", "study_finding", "preprocess", "description"):
        del manifest[key]
    spec = parse(manifest, bundle)
    assert spec.outputs.sr_series_description == DEFAULT_SR_SERIES_DESCRIPTION
    assert DEFAULT_SR_SERIES_DESCRIPTION.endswith("NOT FOR DIAGNOSTIC USE")
    assert spec.segmentation.type is SegmentationType.BINARY
    assert spec.study_finding is None and spec.preprocess == () and spec.description == ""
    assert all(label.edge_refinement == "none" for label in spec.labels)


def test_edge_refinement_is_read_from_the_label(manifest: dict[str, Any], bundle: Path) -> None:
    manifest["labels"][1].update(edge_refinement="half_max", edge_margin_mm=2.5, edge_min_probability=0.1)
    label = parse(manifest, bundle).labels[1]
    assert (label.edge_refinement, label.edge_margin_mm, label.edge_min_probability) == ("half_max", 2.5, 0.1)


CHEST = SeriesCriteriaSpec(modality=("CT",), body_part=("CHEST",), min_slices=20,
                           max_slice_thickness_mm=3.0, image_type_excludes=("LOCALIZER",),
                           series_description_regex=r"thorax|chest|lung")
GOOD = SeriesCandidate(modality="CT", body_part="CHEST", slice_count=120, slice_thickness_mm=1.25,
                       image_type=("ORIGINAL", "PRIMARY", "AXIAL"), series_description="Thorax 1.25")


@pytest.mark.parametrize(
    ("changes", "accepted", "reason"),
    [
        ({}, True, "accepted"),
        ({"modality": "MR"}, False, "modality MR"),
        ({"modality": "ct"}, True, "accepted"),
        ({"body_part": "HEAD"}, False, "body part HEAD"),
        ({"body_part": ""}, True, "accepted"),
        ({"slice_count": 19}, False, "19 slices"),
        ({"slice_thickness_mm": 5.0}, False, "slice thickness 5 mm"),
        ({"slice_thickness_mm": None}, True, "accepted"),
        ({"image_type": ("ORIGINAL", "PRIMARY", "LOCALIZER")}, False, "image type LOCALIZER"),
        ({"series_description": "Abdomen venous"}, False, "series description"),
        ({"series_description": "LUNG window"}, True, "accepted"),
    ],
)
def test_accepts_decides_on_each_criterion_with_a_reason(changes: dict[str, Any], accepted: bool,
                                                         reason: str) -> None:
    fields = {name: getattr(GOOD, name) for name in GOOD.__slots__}
    fields.update(changes)
    ok, why = accepts(CHEST, SeriesCandidate(**fields))
    assert ok is accepted
    assert why.startswith(reason)


def test_model_spec_accepts_uses_its_series_criteria(bundle: Path) -> None:
    spec = load_spec(bundle)
    assert spec.accepts(SeriesCandidate(modality="CT", slice_count=24)) == (True, "accepted")
    assert spec.accepts(SeriesCandidate(modality="CT", slice_count=3))[0] is False


def test_manifest_and_routing_do_not_import_torch() -> None:
    """The receiver routes with models.spec/registry and must never load torch (ARCHITECTURE.md)."""
    code = ("import sys, models.spec, models.registry; "
            "sys.exit(1 if 'torch' in sys.modules or 'numpy' in sys.modules else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr


def test_torchscript_bundle_may_name_its_own_architecture(manifest: dict[str, Any],
                                                          bundle: Path) -> None:
    manifest["weights"]["format"] = "torchscript"
    manifest["architecture"] = {"name": "hospital_resunet", "params": {"note": "scripted"}}
    assert parse(manifest, bundle).architecture.name == "hospital_resunet"
    manifest["weights"]["format"] = "state_dict"
    with pytest.raises(SpecError, match="architecture.name 'hospital_resunet' is unknown"):
        parse(manifest, bundle)


def test_whole_volume_inference_limit_is_read_and_must_not_be_negative(manifest: dict[str, Any],
                                                                       bundle: Path) -> None:
    manifest["inference"]["whole_volume_max_voxels"] = 3_000_000
    assert parse(manifest, bundle).inference.whole_volume_max_voxels == 3_000_000
    manifest["inference"]["whole_volume_max_voxels"] = -1
    with pytest.raises(SpecError, match="inference.whole_volume_max_voxels"):
        parse(manifest, bundle)


def test_mirror_axes_are_read_sorted_and_must_be_distinct_spatial_axes(manifest: dict[str, Any],
                                                                      bundle: Path) -> None:
    assert parse(manifest, bundle).inference.mirror_axes == ()
    manifest["inference"]["mirror_axes"] = [2, 0]
    assert parse(manifest, bundle).inference.mirror_axes == (0, 2)
    for bad in ([3], [1, 1], ["x"], 2, [True]):
        manifest["inference"]["mirror_axes"] = bad
        with pytest.raises(SpecError, match="inference.mirror_axes"):
            parse(manifest, bundle)
    manifest["inference"]["mirror_axes"] = [2]
    assert parse(manifest, bundle).inference.mirror_max_voxels == 0  # no limit
    manifest["inference"]["mirror_max_voxels"] = 3_000_000
    assert parse(manifest, bundle).inference.mirror_max_voxels == 3_000_000
    manifest["inference"]["mirror_max_voxels"] = -1
    with pytest.raises(SpecError, match="inference.mirror_max_voxels"):
        parse(manifest, bundle)


@settings(max_examples=200, deadline=None)
@given(modality=st.text(max_size=4), body_part=st.text(max_size=12), slices=st.integers(-5, 5000),
       thickness=st.none() | st.floats(0, 20), image_type=st.lists(st.text(max_size=10), max_size=4),
       description=st.text(max_size=64))
def test_accepts_is_total_and_explains_every_refusal(modality: str, body_part: str, slices: int,
                                                     thickness: float | None, image_type: list[str],
                                                     description: str) -> None:
    """Routing sees whatever scanners send: it never raises and always says why it refuses."""
    candidate = SeriesCandidate(modality=modality, body_part=body_part, slice_count=slices,
                                slice_thickness_mm=thickness, image_type=tuple(image_type),
                                series_description=description)
    ok, reason = accepts(CHEST, candidate)
    assert reason == "accepted" if ok else reason and reason != "accepted"
    assert not ok or (modality.strip().upper() == "CT" and slices >= 20)


def test_specs_are_hashable_and_survive_pickling(bundle: Path) -> None:
    """Frozen records cross process and thread boundaries and may key caches (STYLE.md)."""
    import pickle

    spec = load_spec(bundle)
    assert hash(spec) == hash(load_spec(bundle))
    assert {spec: 1}[load_spec(bundle)] == 1
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert dict(spec.architecture.params)["channels"] == (3, 13, 5, 3)


CANDIDATES: dict[str, Any] = {
    "label": 2, "patch_size": 24, "patch_spacing_mm": 1.25,
    "architecture": {"name": "patch_classifier3d", "params": {"width": 8}},
    "weights": {"file": "candidates.pt", "sha256": "AB" * 32},
}


def test_the_candidate_stage_is_read_with_its_defaults(manifest: dict[str, Any], bundle: Path) -> None:
    assert parse(manifest, bundle).candidates is None
    manifest["candidates"] = copy.deepcopy(CANDIDATES)
    stage = parse(manifest, bundle).candidates
    assert stage is not None and stage.label == 2 and stage.patch_size == 24 and stage.patch_spacing_mm == 1.25
    assert stage.architecture.name == "patch_classifier3d" and dict(stage.architecture.params) == {"width": 8}
    assert stage.weights.file == "candidates.pt" and stage.weights.sha256 == "ab" * 32
    assert stage.scales_mm == (2.0, 3.0, 4.0, 6.0) and stage.window_hu == (-1000.0, 400.0)
    assert (stage.min_level, stage.min_response, stage.max_candidates, stage.score_bias, stage.skip_probability) \
        == (0.12, 0.005, 120, 0.0, 0.5)
    assert stage.max_level is None and stage.fill_outside_lungs is False and stage.axial_turns == 1
    manifest["candidates"].update(scales_mm=[3, 5], score_bias=-2.5, max_candidates=7, max_level=0.5,
                                  fill_outside_lungs=True, axial_turns=4)
    stage = parse(manifest, bundle).candidates
    assert stage is not None and stage.scales_mm == (3.0, 5.0) and stage.score_bias == -2.5
    assert stage.max_candidates == 7 and stage.max_level == 0.5 and stage.fill_outside_lungs is True
    assert stage.axial_turns == 4


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"label": 9}, "candidates.label"),
        ({"architecture": {"name": "unet3d"}}, "candidates.architecture.name"),
        ({"weights": {"file": "c.pt", "sha256": "abc"}}, "candidates.weights.sha256"),
        ({"weights": {"file": "c.pt", "sha256": "ab" * 32, "format": "torchscript"}}, "candidates.weights.format"),
        ({"weights": {"file": "/etc/c.pt", "sha256": "ab" * 32}}, "candidates.weights.file"),
        ({"scales_mm": []}, "candidates.scales_mm"),
        ({"window_hu": [400, -1000]}, "candidates.window_hu"),
        ({"skip_probability": 1.5}, "candidates.skip_probability"),
        ({"patch_size": 2}, "candidates.patch_size"),
        ({"patch_spacing_mm": 0}, "candidates.patch_spacing_mm"),
        ({"max_candidates": -1}, "candidates.max_candidates"),
        ({"max_level": 0.1}, "candidates.max_level"),
        ({"fill_outside_lungs": "yes"}, "candidates.fill_outside_lungs"),
        ({"axial_turns": 3}, "candidates.axial_turns"),
        ({"axial_turns": 8}, "candidates.axial_turns"),
        ({"threshold": 0.5}, "unknown key candidates.threshold"),
    ],
)
def test_a_wrong_candidate_stage_is_rejected_naming_the_key(manifest: dict[str, Any], bundle: Path,
                                                            change: dict[str, Any], message: str) -> None:
    manifest["candidates"] = {**copy.deepcopy(CANDIDATES), **change}
    with pytest.raises(SpecError, match=message):
        parse(manifest, bundle)
