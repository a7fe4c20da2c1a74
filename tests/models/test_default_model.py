"""The shipped default model: its weights match the manifest, and they work.

The quick evaluation runs the real pipeline path (plan → sliding window → back to the source grid →
postprocessing) on a few small held-out phantoms and checks a floor that a randomly initialised network
of the same architecture cannot reach, so the test fails when the weights are wrong or missing.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

import models
from models.loader import ModelHandle, load_model, sha256_file
from models.metrics import dice
from models.networks import ZeroChannelConv3d, build_network
from models.phantoms import generate_phantom
from models.registry import ModelRegistry
from models.spec import load_spec
from pipeline.run import analyze_volume
from pipeline.types import Volume

BUNDLE = "chest_ct_nodules"
SEEDS = (31_001, 31_002)


@pytest.fixture(scope="module")
def spec():  # type: ignore[no-untyped-def]
    manifest = load_spec(Path(models.__file__).parent / BUNDLE)
    if not manifest.weights_path.is_file():
        # The bundle's manifest and card are in the repository; its weights come from `make train`.
        pytest.skip(f"{manifest.weights_path.name} of {BUNDLE} is not trained yet: run `make train`")
    return ModelRegistry().get(BUNDLE)


def test_shipped_weights_match_the_manifest_sha256(spec) -> None:  # type: ignore[no-untyped-def]
    assert spec.weights_path.is_file()
    assert sha256_file(spec.weights_path) == spec.weights.sha256
    assert spec.weights_path.stat().st_size < 20 * 1024 * 1024


def test_the_loaded_model_runs_with_its_batch_normalisation_folded(spec) -> None:  # type: ignore[no-untyped-def]
    handle = load_model(spec, "cpu")
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in handle.module.modules())
    # On a CPU the one-channel first convolution runs widened to oneDNN's kernels.
    assert isinstance(handle.module.encoders[0].conv1, ZeroChannelConv3d)
    # The same function as the network as trained (float32, a 32x48x48 window of lung-like values).
    trained = build_network(spec.architecture)
    trained.load_state_dict(torch.load(spec.weights_path, map_location="cpu", weights_only=True))
    trained.eval()
    x = torch.rand(1, 1, 32, 48, 48, generator=torch.Generator().manual_seed(0)) * 0.3
    with torch.inference_mode():
        seg, cls = trained(x)
        seg_folded, cls_folded = handle.module(x.contiguous(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(seg_folded, seg, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(cls_folded, cls, rtol=1e-3, atol=1e-3)


def _scores(spec, handle) -> tuple[float, float, float]:  # type: ignore[no-untyped-def]
    lung, nodule, present_scores = [], [], []
    for seed in SEEDS:
        phantom = generate_phantom(seed, shape_zyx=(72, 192, 192), nodules=1, nodule_diameter_mm=(10.0, 16.0),
                                   nodule_kinds=("solid",), nodule_attachments=("none",))
        volume = Volume(phantom.hu_zyx.astype(np.float32), phantom.affine_lps)
        result = analyze_volume(volume, spec, handle).result
        labels = np.asarray(result.label_map.array_zyx)
        lung.append(dice(labels >= 1, phantom.labels_zyx >= 1))
        nodule.append(dice(labels == 2, phantom.labels_zyx == 2))
        present_scores.append(result.study_finding.score if result.study_finding else 0.0)
    return float(np.mean(lung)), float(np.mean(nodule)), float(np.min(present_scores))


def test_shipped_model_segments_lungs_and_a_nodule_where_a_random_network_cannot(spec) -> None:  # type: ignore[no-untyped-def]
    trained = load_model(spec, "cpu")
    lung, nodule, score = _scores(spec, trained)
    assert lung >= 0.9, f"lung Dice {lung:.3f}"
    assert nodule >= 0.5, f"nodule Dice {nodule:.3f}"
    assert score >= 0.5, f"study score {score:.3f} for scans with a 10-16 mm nodule"

    torch.manual_seed(0)
    random_net = build_network(spec.architecture).eval()
    random_handle = dataclasses.replace(trained, module=random_net)
    r_lung, r_nodule, _ = _scores(spec, random_handle)
    assert r_lung < 0.9 or r_nodule < 0.5, "the floor does not separate trained from random weights"


def _candidate_scores(spec, classifier) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    """Scores of the candidate stage's classifier on candidates of two phantoms (in the true lungs),
    and whether each lies in a nodule (candidates plus the nodules' centres)."""
    from models.train_candidates import nodule_under_ball
    from pipeline.candidates import Candidate, detect_candidates, sample_patches, score_candidates, window
    from pipeline.preprocess import replay_plan, run_plan

    stage = spec.candidates
    scores, hits = [], []
    for seed in SEEDS:
        phantom = generate_phantom(seed, shape_zyx=(72, 192, 192), nodules=3, nodule_diameter_mm=(6.0, 12.0))
        volume = Volume(phantom.hu_zyx.astype(np.float32), phantom.affine_lps)
        image, records = run_plan(volume, spec.preprocess)
        lungs = np.asarray(replay_plan(volume.with_array(phantom.labels_zyx), records, order=0).array_zyx) >= 1
        found = detect_candidates(image, lungs, scales_mm=stage.scales_mm, min_level=stage.min_level,
                                  min_response=stage.min_response, max_candidates=60)
        found += [Candidate(tuple(phantom.index_to_lps(np.asarray(n.center_zyx_vox, float))), 2.0, 1.0)
                  for n in phantom.nodules]
        patches = window(sample_patches(volume, [c.center_lps_mm for c in found], size=stage.patch_size,
                                        spacing_mm=stage.patch_spacing_mm), *stage.window_hu)
        scores.extend(score_candidates(classifier, patches))
        hits.extend(nodule_under_ball(phantom.nodule_ids_zyx, volume, c) > 0 for c in found)
    return np.asarray(scores), np.asarray(hits)


def test_the_candidate_classifier_tells_nodules_from_other_blobs_where_a_random_one_cannot(spec) -> None:  # type: ignore[no-untyped-def]
    from models.metrics import roc_auc
    from models.networks import CANDIDATE_ARCHITECTURES

    assert spec.candidates is not None
    assert sha256_file(spec.bundle_dir / spec.candidates.weights.file) == spec.candidates.weights.sha256
    handle = load_model(spec, "cpu")
    scores, hits = _candidate_scores(spec, handle.candidates)
    assert hits.sum() >= 6 and (~hits).sum() >= 60
    trained_auc = roc_auc(list(scores), list(hits))
    assert trained_auc >= 0.9, f"candidate AUC {trained_auc:.3f}"
    torch.manual_seed(0)
    random_net = build_network(spec.candidates.architecture, CANDIDATE_ARCHITECTURES).eval()
    random_auc = roc_auc(list(_candidate_scores(spec, random_net)[0]), list(hits))
    assert random_auc < 0.9, "the floor does not separate trained from random weights"
