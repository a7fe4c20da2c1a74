"""A bundle's candidate stage in the analysis: loading its classifier, painting what it accepts, and
the training tool's manifest updates and calibration."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from models.loader import WeightsError, clear_cache, load_model
from models.networks import PatchClassifier3D
from models.phantoms import generate_phantom
from models.registry import ModelRegistry
from models.spec import load_spec
from models.train_candidates import choose_bias, install_candidate_weights, set_candidate_fields
from pipeline.candidates import lps_to_index
from pipeline.run import analyze_volume
from pipeline.types import Volume
from tests.models.tiny_bundle import make_tiny_bundle

STAGE = """
[candidates]
label = 2
patch_size = 12
patch_spacing_mm = 2.0
scales_mm = [3.0, 4.0]
max_candidates = 5
score_bias = 0.0
architecture = { name = "patch_classifier3d", params = { width = 4, levels = 2 } }
weights = { file = "candidates.pt", sha256 = "%s" }
"""


def _with_stage(bundle: Path, bias: float) -> Path:
    manifest = bundle / "model.toml"
    manifest.write_text(manifest.read_text(encoding="utf-8") + STAGE % ("0" * 64), encoding="utf-8")
    torch.manual_seed(0)
    install_candidate_weights(bundle, PatchClassifier3D(width=4, levels=2).state_dict(), bias)
    clear_cache()
    return bundle


@pytest.fixture(scope="module")
def phantom_volume() -> tuple[Volume, np.ndarray]:
    phantom = generate_phantom(31_005, shape_zyx=(40, 128, 128), nodules=1)
    return Volume(phantom.hu_zyx.astype(np.float32), phantom.affine_lps), phantom.labels_zyx


def test_the_classifier_is_loaded_checked_and_folded_with_the_model(tmp_path: Path) -> None:
    bundle = _with_stage(make_tiny_bundle(tmp_path / "tiny"), 0.0)
    spec = load_spec(bundle)
    assert spec.candidates is not None and spec.candidates.weights.sha256 != "0" * 64
    handle = load_model(spec, "cpu")
    assert isinstance(handle.candidates, PatchClassifier3D) and not handle.candidates.training
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in handle.candidates.blocks.modules())
    with (bundle / "candidates.pt").open("ab") as f:
        f.write(b"\0")
    clear_cache()
    with pytest.raises(WeightsError, match="candidates.pt has sha256"):
        load_model(load_spec(bundle), "cpu")
    clear_cache()
    (bundle / "candidates.pt").unlink()
    registry = ModelRegistry(bundle)
    assert registry.list() == [] and "candidate stage weights file candidates.pt is missing" in registry.problems[0].reason


def test_accepted_candidates_become_findings_and_rejected_ones_change_nothing(
        tmp_path: Path, phantom_volume: tuple[Volume, np.ndarray]) -> None:
    volume, _ = phantom_volume
    accept_all = load_spec(_with_stage(make_tiny_bundle(tmp_path / "all"), 60.0))
    analysis = analyze_volume(volume, accept_all, load_model(accept_all, "cpu"))
    assert 1 <= len(analysis.candidates) <= 5
    assert all(score > 0.999 for _, score in analysis.candidates)
    label_map = np.asarray(analysis.result.label_map.array_zyx)
    for candidate, _ in analysis.candidates:
        k, j, i = np.rint(lps_to_index(volume, np.asarray([candidate.center_lps_mm]))[0]).astype(int)
        assert label_map[k, j, i] == 2, "an accepted candidate is a nodule in the result"
    clear_cache()

    reject_all = load_spec(_with_stage(make_tiny_bundle(tmp_path / "none"), -60.0))
    rejected = analyze_volume(volume, reject_all, load_model(reject_all, "cpu"))
    assert all(score < 1e-6 for _, score in rejected.candidates)
    without = dataclasses.replace(reject_all, candidates=None)
    plain = analyze_volume(volume, without, load_model(without, "cpu"))
    assert plain.candidates == ()
    np.testing.assert_array_equal(np.asarray(rejected.result.label_map.array_zyx),
                                  np.asarray(plain.result.label_map.array_zyx))
    assert len(rejected.result.findings) == len(plain.result.findings)
    clear_cache()


def test_the_manifest_lines_are_rewritten_in_the_candidates_table_only(tmp_path: Path) -> None:
    bundle = _with_stage(make_tiny_bundle(tmp_path / "tiny"), 0.0)
    network_sha = load_spec(bundle).weights.sha256
    set_candidate_fields(bundle, sha256="cd" * 32, score_bias=-1.25)
    spec = load_spec(bundle)
    assert spec.candidates is not None
    assert spec.candidates.weights.sha256 == "cd" * 32 and spec.candidates.score_bias == -1.25
    assert spec.weights.sha256 == network_sha


def test_the_bias_lets_through_the_allowed_false_positives_and_reports_what_it_finds() -> None:
    cases = [
        {"logits": [3.0, 1.0, -2.0, 2.5], "hits": [0, 4, 0, 5], "diameters": [0.0, 7.0, 0.0, 12.0]},
        {"logits": [0.5, 2.0, -1.0], "hits": [0, 0, 3], "diameters": [0.0, 0.0, 4.0]},
    ]
    # Half a false positive per scan allowed: only the strongest negative (3.0) passes, 2.0 does not.
    choice = choose_bias(cases, 0.5, 0.97)
    assert 2.0 < choice["logit_cut"] <= 2.5
    assert choice["added_false_positives_per_scan"] == 0.5
    assert choice["candidates_in_nodules_accepted"] == {"<6mm": 0, "6-10mm": 0, ">10mm": 1}
    logit = choice["logit_cut"] + choice["score_bias"]
    assert abs(1.0 / (1.0 + np.exp(-logit)) - 0.97) < 1e-9  # the cut maps onto the peak threshold
    # One per scan: 3.0 and 2.0 pass, 0.5 does not; the 7 mm nodule's candidate (1.0) now passes.
    loose = choose_bias(cases, 1.0, 0.97)
    assert 0.5 < loose["logit_cut"] <= 1.0 and loose["added_false_positives_per_scan"] == 1.0
    assert loose["candidates_in_nodules_accepted"] == {"<6mm": 0, "6-10mm": 1, ">10mm": 1}
    everything = choose_bias(cases, 10.0, 0.97)
    assert everything["added_false_positives_per_scan"] == 2.0
    assert everything["candidates_in_nodules_accepted"] == {"<6mm": 1, "6-10mm": 1, ">10mm": 1}
