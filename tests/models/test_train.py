"""`make train`: losses, patch sampling, precision choice, and a tiny run that installs loadable weights."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import models
from models.loader import load_model, sha256_file
from models.spec import load_spec
from models.train import (
    PEAK_THRESHOLDS,
    SMALL_NODULE_BAND_MM,
    SMALL_NODULE_WEIGHT,
    Case,
    CheckpointChoice,
    TrainSettings,
    _component_detections,
    compiled_for_training,
    downsampled_labels,
    mixed_precision,
    nodule_weights,
    sample_batch,
    soft_dice_loss,
    train,
    validate,
)

BUNDLE = Path(models.__file__).parent / "chest_ct_nodules"


def _logits_for(target: torch.Tensor, confidence: float = 30.0) -> torch.Tensor:
    return torch.nn.functional.one_hot(target, 3).permute(0, 4, 1, 2, 3).float() * confidence


def test_dice_loss_is_near_zero_for_a_perfect_prediction_and_high_when_the_nodule_is_missed() -> None:
    target = torch.zeros((2, 8, 16, 16), dtype=torch.long)
    target[:, 2:6] = 1
    target[0, 3:5, 4:6, 4:6] = 2  # a small nodule in the first patch only
    perfect = soft_dice_loss(_logits_for(target), target, (1, 2), per_sample=(2,))
    missed = target.clone()
    missed[target == 2] = 1
    worse = soft_dice_loss(_logits_for(missed), target, (1, 2), per_sample=(2,))
    assert float(perfect) < 0.01
    assert float(worse) > 0.4  # the nodule term alone is ~1: its mean over two classes ~0.5


def test_per_sample_dice_weighs_a_small_nodule_like_a_large_one() -> None:
    target = torch.zeros((2, 8, 16, 16), dtype=torch.long)
    target[0, 1:7, 2:14, 2:14] = 2  # large nodule, found
    target[1, 4:6, 8:10, 8:10] = 2  # eight-voxel nodule, missed
    prediction = target.clone()
    prediction[1][target[1] == 2] = 0
    pooled = soft_dice_loss(_logits_for(prediction), target, (2,))
    per_sample = soft_dice_loss(_logits_for(prediction), target, (2,), per_sample=(2,))
    assert float(pooled) < 0.02 < 0.15 < float(per_sample)


def test_coarse_labels_for_deep_supervision_keep_a_nodule_smaller_than_the_coarse_voxel() -> None:
    labels = torch.zeros((1, 8, 8, 8), dtype=torch.long)
    labels[0, :, :, :4] = 1
    labels[0, 5, 3, 1] = 2  # one nodule voxel, off the every-other-voxel lattice
    coarse = downsampled_labels(labels, 2)
    assert coarse.shape == (1, 4, 4, 4)
    assert int((coarse == 2).sum()) == 1 and int(coarse[0, 2, 1, 0]) == 2
    assert bool((coarse[0, :, :, 2:] == 0).all()) and int((coarse == 1).sum()) == 4 * 4 * 2 - 1
    odd = downsampled_labels(torch.zeros((2, 9, 13, 17), dtype=torch.long), 4)
    assert odd.shape == (2, 3, 4, 5)  # the ceiling, as the network's auxiliary outputs


def _box_case(seed: int = 1) -> Case:
    image = np.zeros((40, 90, 90), dtype=np.float32)
    labels = np.zeros(image.shape, dtype=np.uint8)
    labels[10:30, 20:70, 20:70] = 1
    labels[18:22, 43:47, 43:47] = 2
    image[labels == 1] = 0.2
    image[labels == 2] = 0.9
    return Case(seed, image, labels, ((20, 45, 45),), (5.0,))


def test_patches_keep_image_and_labels_aligned_under_augmentation() -> None:
    rng = np.random.default_rng(3)
    generator = torch.Generator().manual_seed(3)
    images, labels = sample_batch([_box_case()], (16, 32, 32), 6, rng, nodule_fraction=1.0, generator=generator)
    assert images.shape == (6, 1, 16, 32, 32) and images.dtype == torch.float32
    assert labels.shape == (6, 16, 32, 32) and labels.dtype == torch.int64
    for patch, patch_labels in zip(images[:, 0].numpy(), labels.numpy()):
        assert (patch_labels == 2).any()
        # intensity augmentation is at most ±10 % and ±0.05 plus a little noise
        assert float(np.median(patch[patch_labels == 2])) > 0.6 > float(np.median(patch[patch_labels == 1]))
        if (patch_labels == 0).any():
            assert float(np.median(patch[patch_labels == 1])) > 0.1 > float(np.median(patch[patch_labels == 0]))


def test_augmentation_rotates_scales_and_flips_the_patch() -> None:
    # An L-shaped structure: any rotation, scaling or flip changes which voxels it covers.
    image = np.zeros((24, 80, 80), dtype=np.float32)
    labels = np.zeros(image.shape, dtype=np.uint8)
    labels[8:16, 30:50, 30:34] = 1
    labels[8:16, 46:50, 30:50] = 1
    image[labels == 1] = 1.0
    case = Case(1, image, labels, ((12, 40, 40),), (20.0,))
    rng = np.random.default_rng(5)
    _, labels_out = sample_batch([case], (8, 48, 48), 16, rng, nodule_fraction=1.0)
    masks = {labels_out[b].numpy().tobytes() for b in range(16)}
    assert len(masks) == 16  # no two patches alike
    sizes = labels_out.flatten(1).sum(1).float()
    assert float(sizes.max() / sizes.min()) > 1.2  # scaling changes the structure's size


def test_nodules_in_the_small_band_can_be_drawn_more_often() -> None:
    box = _box_case()
    low, high = SMALL_NODULE_BAND_MM
    cases = [Case(s, box.image, box.labels, box.nodule_centers, (d,))
             for s, d in enumerate((high + 5.0, (low + high) / 2, low - 2.0))]
    index, probabilities = nodule_weights(cases, small_weight=2.5)
    assert index == [(0, 0), (1, 0), (2, 0)]
    assert probabilities[1] == pytest.approx(2.5 * probabilities[0])
    assert probabilities[2] == pytest.approx(probabilities[0])
    default = np.array([1.0, SMALL_NODULE_WEIGHT, 1.0])  # what the shipped weights were trained with
    assert np.allclose(nodule_weights(cases)[1], default / default.sum())


def test_the_installed_checkpoint_is_the_best_late_epoch_not_an_early_spike() -> None:
    # Part of the validation curve (lung + nodule Dice) of a 33-minute run, at the fraction of its budget
    # each epoch ended: a spike at epoch 12 (learning rate still 0.6 of its peak), then a lower plateau.
    curve = [(5, 0.21, 1.424), (12, 0.44, 1.650), (13, 0.48, 1.491), (18, 0.64, 1.577), (25, 0.87, 1.614),
             (27, 0.93, 1.610), (29, 0.99, 1.602)]
    choice = CheckpointChoice(select_from=0.5)
    chosen = [epoch for epoch, fraction, score in curve if choice.offer(epoch, score, fraction)]
    assert chosen == [5, 12, 18, 25] and choice.best_epoch == 25
    # Until the late phase starts the best so far is kept, so a run cut short still installs weights.
    short = CheckpointChoice(select_from=0.5)
    assert [short.offer(e, s, f) for e, f, s in [(1, 0.1, 1.2), (2, 0.2, 1.1), (3, 0.3, 1.3)]] == [True, False, True]
    assert short.best_epoch == 3
    # select_from=0 is the plain best epoch.
    plain = CheckpointChoice(select_from=0.0)
    for epoch, fraction, score in curve:
        plain.offer(epoch, score, fraction)
    assert plain.best_epoch == 12


def test_precision_choice() -> None:
    cpu = torch.device("cpu")
    assert mixed_precision("bf16", cpu) and not mixed_precision("fp32", cpu)
    assert mixed_precision("auto", torch.device("cuda")) is True
    assert isinstance(mixed_precision("auto", cpu), bool)
    with pytest.raises(ValueError, match="precision"):
        mixed_precision("fp8", cpu)


def test_a_tiny_training_run_installs_weights_the_registry_loads(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    shutil.copy(BUNDLE / "model.toml", bundle / "model.toml")
    shutil.copy(BUNDLE / "candidates.pt", bundle / "candidates.pt")  # the candidate stage's classifier
    settings = TrainSettings(train_cases=2, validation_cases=1, calibration_cases=2, minutes=5.0, max_epochs=2, steps_per_epoch=2,
                             batch_size=1, patch_zyx=(16, 32, 32), workers=1, precision="fp32", compile="off")
    summary = train(bundle, tmp_path / "work", settings)
    assert summary["epochs"] == 2 and summary["best_epoch"] in (1, 2)
    spec = load_spec(bundle)
    assert sha256_file(spec.weights_path) == spec.weights.sha256 != "0" * 64
    load_model(spec, "cpu")  # verifies the sha256 and the state dict against the architecture
    with open(bundle / "training_log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2] and all(float(r["train_loss"]) > 0 for r in rows)
    summary_file = json.loads((bundle / "training_summary.json").read_text())
    assert summary_file["train_cases"] == 2 and summary_file["finding_threshold"] in (0.2, 0.3, 0.4, 0.5, None)
    assert summary_file["finding_peak_threshold"] in (*PEAK_THRESHOLDS, None)
    if summary_file["finding_peak_threshold"] is not None:
        assert summary_file["calibration_cases"] == 2
        assert spec.labels[1].peak_threshold == summary_file["finding_peak_threshold"]


def test_training_goes_on_uncompiled_when_the_compiler_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    def failing_compile(module: torch.nn.Module) -> object:
        def run(x: torch.Tensor) -> object:
            calls.append(x.shape)
            raise RuntimeError("inductor: no working C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", failing_compile)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    shutil.copy(BUNDLE / "model.toml", bundle / "model.toml")
    shutil.copy(BUNDLE / "candidates.pt", bundle / "candidates.pt")  # the candidate stage's classifier
    settings = TrainSettings(train_cases=1, validation_cases=1, calibration_cases=1, minutes=5.0, max_epochs=1,
                             steps_per_epoch=3, batch_size=1, patch_zyx=(16, 32, 32), workers=1, precision="fp32",
                             compile="on")
    with caplog.at_level("WARNING", logger="models.train"):
        summary = train(bundle, tmp_path / "work", settings)
    assert len(calls) == 1  # tried once, then the plain module for every step
    assert summary["epochs"] == 1 and "event=compile_failed" in caplog.text
    # Float32 on a CPU: the run says it gets fewer steps than the shipped weights had.
    assert "event=training_precision precision=fp32" in caplog.text
    load_model(load_spec(bundle), "cpu")


def test_compile_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    network = torch.nn.Conv3d(1, 1, 1)
    cpu = torch.device("cpu")
    assert compiled_for_training(network, "off", cpu) is network
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert compiled_for_training(network, "auto", cpu) is network  # no C++ compiler: eager
    with pytest.raises(ValueError, match="compile"):
        compiled_for_training(network, "always", cpu)


def test_operating_point_is_written_into_the_finding_label_only(tmp_path: Path) -> None:
    from models.train import set_operating_point

    shutil.copy(BUNDLE / "model.toml", tmp_path / "model.toml")
    text = (tmp_path / "model.toml").read_text()
    import re
    (tmp_path / "model.toml").write_text(re.sub(r"(?m)^peak_threshold = .*\n", "", text))
    set_operating_point(tmp_path, 0.3, 0.8)  # inserts the peak threshold line
    spec = load_spec(tmp_path)
    assert {label.name: label.threshold for label in spec.labels} == {"Lung": 0.5, "Nodule": 0.3}
    assert {label.name: label.peak_threshold for label in spec.labels} == {"Lung": 0.0, "Nodule": 0.8}
    assert spec.study_finding is not None and spec.study_finding.threshold == 0.5
    set_operating_point(tmp_path, 0.4, 0.6)  # replaces both in place
    spec = load_spec(tmp_path)
    assert (spec.labels[1].threshold, spec.labels[1].peak_threshold) == (0.4, 0.6)
    assert (tmp_path / "model.toml").read_text().count("peak_threshold") == 1


def test_component_detections_separate_false_positives_from_hits_with_their_peaks() -> None:
    from models.spec import load_spec as _load

    finding = _load(BUNDLE).labels[1]
    truth = np.zeros((20, 30, 30), dtype=bool)
    truth[2:6, 2:6, 2:6] = True  # a 64-voxel nodule: 512 mm3 at 2 mm, about 9.9 mm across
    label_map = np.zeros(truth.shape, dtype=np.uint8)
    probability = np.zeros(truth.shape, dtype=np.float32)
    label_map[3:6, 3:6, 3:6] = 2
    probability[3:6, 3:6, 3:6] = 0.6
    probability[4, 4, 4] = 0.97
    label_map[12:15, 20:23, 20:23] = 2  # a false positive of 27 voxels, peak 0.55
    probability[12:15, 20:23, 20:23] = 0.55
    label_map[18, 28, 28] = 2  # one voxel (8 mm3): under min_size_mm3, not counted
    probability[18, 28, 28] = 0.99
    components, nodules = _component_detections(label_map, probability, truth, finding, 8.0)
    assert sorted(components) == [(pytest.approx(0.55), False), (pytest.approx(0.97), True)]
    assert len(nodules) == 1 and nodules[0][0] == pytest.approx((6 * 512 / np.pi) ** (1 / 3))
    assert nodules[0][1] == pytest.approx(0.97)


def test_validation_runs_without_the_manifests_test_time_mirroring() -> None:
    # Choosing the best epoch runs after every epoch: mirroring there would cost training time.
    spec = load_spec(BUNDLE)
    assert spec.inference.mirror_axes  # the shipped manifest mirrors at inference
    seen: list[tuple[int, ...]] = []

    class Recording(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            seen.append(tuple(x.shape))
            logits = torch.zeros((x.shape[0], 3, *x.shape[2:]))
            logits[:, 1] = x[:, 0]  # "lung" where the image is bright
            return logits, x.mean(dim=(1, 2, 3, 4))[:, None]

    labels = np.zeros((8, 16, 16), dtype=np.uint8)
    labels[2:6, 4:12, 4:12] = 1
    cases = [Case(seed, labels.astype(np.float32), labels, ()) for seed in (1, 2)]
    metrics = validate(Recording(), cases, spec, "cpu")
    assert len(seen) == len(cases)  # one pass per case, no mirrored pass
    assert metrics["val_lung_dice"] == pytest.approx(1.0)
