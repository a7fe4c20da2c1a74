"""Train the default chest CT model (``make train``) on synthetic phantoms.

The recipe: phantoms from `models.phantoms` (seeded, varied geometry, anatomy, intensity, noise and
nodules) → the bundle's own preprocessing plan (`pipeline.preprocess.run_plan`, exactly what inference
runs; the label maps follow the same geometric steps with nearest-neighbour sampling) → random patches,
most of them centred on a nodule → augmentation (rotation about the body axis, shifts, left–right
flips, scaling, intensity scale/shift, noise) → 3-D U-Net with a "nodule present" head → loss = soft
Dice + cross-entropy on the segmentation, binary cross-entropy on the head (a patch is positive when
it holds nodule voxels; the study score is the maximum over windows, as at inference) → validation
every epoch on separate seeds with the real sliding-window inference → checkpoints, a CSV log of the
curves, then the best weights written into the bundle with their sha256 in ``model.toml``, and
finally the finding label's operating point (voxel and peak thresholds) chosen on validation phantoms.

Seeds are fixed (torch, numpy, phantom seeds), so a run is repeatable up to the floating-point
non-determinism of multi-threaded CPU kernels. This is an offline tool: unlike the rest of `models`,
it uses `pipeline` (preprocessing and inference) so training and inference see the same input.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import math
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

logger = logging.getLogger(__name__)

DEFAULT_BUNDLE = Path(__file__).resolve().parent / "chest_ct_nodules"
DEFAULT_WORK_DIR = Path(__file__).resolve().parent / "_work"
TRAIN_SEED_BASE = 10_000
VALIDATION_SEED_BASE = 20_000
LUNG, NODULE = 1, 2


@dataclass(frozen=True, slots=True)
class TrainSettings:
    """Knobs of one training run; the defaults reproduce the shipped weights."""

    train_cases: int = 64
    validation_cases: int = 6
    #: Validation phantoms (the first ``validation_cases`` and more) for choosing the operating point.
    calibration_cases: int = 24
    minutes: float = 55.0
    max_epochs: int = 400
    steps_per_epoch: int = 150
    batch_size: int = 8
    patch_zyx: tuple[int, int, int] = (24, 48, 48)
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    nodule_patch_fraction: float = 0.8
    nodule_class_weight: float = 15.0
    resume: Path | None = None
    seed: int = 20261121
    threads: int = 0
    workers: int = 2
    device: str = "auto"
    precision: str = "auto"


@dataclass(frozen=True, slots=True)
class Case:
    """One preprocessed training or validation case on the network's grid."""

    seed: int
    image: NDArray[np.float32]
    labels: NDArray[np.uint8]
    nodule_centers: tuple[tuple[int, int, int], ...]


def phantom_shape_for(seed: int) -> tuple[int, int, int]:
    """A varied acquisition for a training phantom: slice count and matrix drawn from the seed.

    In-plane matrices of 192–320 keep generation fast while the pixel spacing the generator fits to
    the body (0.9–2 mm) and the slice spacing (0.6–5 mm, from the slice count) still vary widely; the
    plan resamples everything to the network's spacing anyway.
    """
    rng = np.random.default_rng([seed, 7])
    matrix = int(rng.choice([192, 224, 256, 288, 320]))
    slices = int(rng.integers(48, 161))
    return (slices, matrix, matrix)


def prepare_case(seed: int, bundle_dir: Path) -> Case:
    """Generate the phantom of ``seed`` and run the bundle's preprocessing plan on image and labels."""
    from models.phantoms import generate_phantom
    from models.spec import load_spec
    from pipeline.preprocess import replay_plan, run_plan
    from pipeline.types import Volume

    steps = load_spec(bundle_dir).preprocess
    phantom = generate_phantom(seed, shape_zyx=phantom_shape_for(seed))
    volume = Volume(phantom.hu_zyx.astype(np.float32), phantom.affine_lps)
    image, records = run_plan(volume, steps)
    labels = replay_plan(volume.with_array(phantom.labels_zyx), records, order=0)
    label_array = np.asarray(labels.array_zyx, dtype=np.uint8)
    centers: list[tuple[int, int, int]] = []
    nodule_cc, count = ndimage.label(label_array == NODULE)
    for com in ndimage.center_of_mass(label_array == NODULE, nodule_cc, range(1, count + 1)):
        centers.append(tuple(int(round(c)) for c in com))  # type: ignore[arg-type]
    return Case(seed, np.asarray(image.array_zyx, dtype=np.float32), label_array, tuple(centers))


def load_cases(seeds: Sequence[int], bundle_dir: Path, cache_dir: Path, workers: int) -> list[Case]:
    """Prepare the cases of ``seeds``, reusing ``cache_dir/<plan hash>/<seed>.npz`` when present."""
    import models.phantoms
    from models.spec import load_spec

    # The cache is valid for one plan and one version of the generator's code.
    steps = load_spec(bundle_dir).preprocess
    generator = Path(models.phantoms.__file__).read_bytes()
    plan_key = hashlib.sha256(repr(tuple((s.op, dict(s.params)) for s in steps)).encode() + generator).hexdigest()[:12]
    folder = cache_dir / plan_key
    folder.mkdir(parents=True, exist_ok=True)
    missing = [s for s in seeds if not (folder / f"{s}.npz").exists()]
    if missing:
        started = time.perf_counter()
        with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
            for case in pool.map(prepare_case, missing, [bundle_dir] * len(missing)):
                tmp = folder / f".{case.seed}.tmp.npz"
                np.savez_compressed(tmp, image=case.image.astype(np.float16), labels=case.labels,
                                    centers=np.asarray(case.nodule_centers, dtype=np.int32).reshape(-1, 3))
                os.replace(tmp, folder / f"{case.seed}.npz")
        logger.info("event=cases_prepared count=%d seconds=%.1f", len(missing), time.perf_counter() - started)
    cases = []
    for s in seeds:
        with np.load(folder / f"{s}.npz") as data:
            cases.append(Case(s, data["image"].astype(np.float32), data["labels"],
                              tuple(tuple(int(v) for v in c) for c in data["centers"])))
    return cases


# ------------------------------------------------------------------------------------------ sampling


def _crop(array: NDArray[Any], start: Sequence[int], size: Sequence[int], fill: float) -> NDArray[Any]:
    """``array[start:start+size]`` with out-of-range parts filled (patches may overhang the volume)."""
    out = np.full(tuple(size), fill, dtype=array.dtype)
    src, dst = [], []
    for s, n, dim in zip(start, size, array.shape):
        lo, hi = max(s, 0), min(s + n, dim)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[tuple(dst)] = array[tuple(src)]
    return out


def sample_patch(case: Case, patch: Sequence[int], rng: np.random.Generator, nodule_fraction: float,
                 ) -> tuple[NDArray[np.float32], NDArray[np.uint8]]:
    """A training patch with augmentation: rotation about z, scaling, shift, flips, intensity, noise."""
    angle = float(rng.uniform(-15, 15))
    scale = float(rng.uniform(0.85, 1.15))
    # Cut a larger block so rotation and scaling never pull in the patch's own padding.
    margin = [int(math.ceil(p * (1.0 / 0.85) * (1.0 if i == 0 else 1.3))) for i, p in enumerate(patch)]
    draw = rng.random()  # drawn for every patch, so a case's nodules do not shift the stream
    if case.nodule_centers and draw < nodule_fraction:
        center = np.asarray(case.nodule_centers[int(rng.integers(len(case.nodule_centers)))], float)
        center += rng.uniform(-0.35, 0.35, 3) * np.asarray(patch)
    else:
        center = np.asarray([rng.uniform(0, n) for n in case.image.shape])
    start = [int(round(c - m / 2)) for c, m in zip(center, margin)]
    image = _crop(case.image, start, margin, fill=0.0)
    labels = _crop(case.labels, start, margin, fill=0)
    if abs(angle) > 0.5:
        image = ndimage.rotate(image, angle, axes=(1, 2), reshape=False, order=1, mode="nearest")
        labels = ndimage.rotate(labels, angle, axes=(1, 2), reshape=False, order=0, mode="nearest")
    # Scaling: sample the central block of size patch/scale and resize it to the patch.
    block = [min(m, max(4, int(round(p / scale)))) for p, m in zip(patch, margin)]
    offset = [(m - b) // 2 for m, b in zip(margin, block)]
    sl = tuple(slice(o, o + b) for o, b in zip(offset, block))
    image, labels = image[sl], labels[sl]
    zoom = [p / b for p, b in zip(patch, block)]
    image = ndimage.zoom(image, zoom, order=1, mode="nearest", grid_mode=True)
    labels = ndimage.zoom(labels, zoom, order=0, mode="nearest", grid_mode=True)
    image = _crop(image, (0, 0, 0), patch, 0.0)
    labels = _crop(labels, (0, 0, 0), patch, 0)
    if rng.random() < 0.5:
        image, labels = image[:, :, ::-1], labels[:, :, ::-1]
    image = image * float(rng.uniform(0.9, 1.1)) + float(rng.uniform(-0.05, 0.05))
    sigma = float(rng.uniform(0.0, 0.03))
    if sigma > 0:
        image = image + rng.normal(0.0, sigma, image.shape)
    return np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(labels, dtype=np.uint8)


def batches(cases: Sequence[Case], settings: TrainSettings, rng: np.random.Generator,
            ) -> Iterator[tuple[NDArray[np.float32], NDArray[np.uint8]]]:
    while True:
        images, labels = [], []
        for _ in range(settings.batch_size):
            case = cases[int(rng.integers(len(cases)))]
            image, label = sample_patch(case, settings.patch_zyx, rng, settings.nodule_patch_fraction)
            images.append(image)
            labels.append(label)
        yield np.stack(images)[:, None], np.stack(labels)


# ------------------------------------------------------------------------------------------ training


def soft_dice_loss(logits: Any, target: Any, classes: Sequence[int], per_sample: Sequence[int] = ()) -> Any:
    """1 − mean soft Dice over ``classes``.

    Batch-pooled by default, so patches without a class do not explode. Classes in ``per_sample`` (small
    structures: nodules) are scored per patch over the patches that hold the class, plus the pooled
    term for the rest: a 4 mm nodule in one patch then weighs as much as a 25 mm one in another,
    instead of vanishing in the batch's sum.
    """
    import torch

    probabilities = torch.softmax(logits, dim=1)
    losses = []
    for c in classes:
        p = probabilities[:, c]
        t = (target == c).float()
        intersection = (p * t).sum()
        pooled = 1.0 - (2.0 * intersection + 1.0) / (p.sum() + t.sum() + 1.0)
        if c in per_sample:
            dims = tuple(range(1, p.dim()))
            present = t.sum(dims) > 0
            if bool(present.any()):
                inter = (p * t).sum(dims)[present]
                each = 1.0 - (2.0 * inter + 1.0) / (p.sum(dims)[present] + t.sum(dims)[present] + 1.0)
                pooled = 0.5 * pooled + 0.5 * each.mean()
        losses.append(pooled)
    return torch.stack(losses).mean()


def validate(network: Any, cases: Sequence[Case], spec: Any, device: Any = "cpu") -> dict[str, float]:
    """Sliding-window inference on whole validation cases (network grid): Dice per label, head AUC."""
    import torch

    from models.metrics import dice, roc_auc
    from pipeline.infer import infer

    network.eval()
    lung, nodule, scores, present = [], [], [], []
    with torch.inference_mode():
        for case in cases:
            out = infer(network, case.image[None], spec.inference, device=device)
            prediction = np.argmax(out.probabilities_czyx, axis=0)
            lung.append(dice(prediction >= LUNG, case.labels >= LUNG))
            if (case.labels == NODULE).any():
                nodule.append(dice(prediction == NODULE, case.labels == NODULE))
            logit = out.study_logit if out.study_logit is not None else 0.0
            scores.append(float(logit))
            present.append(bool((case.labels == NODULE).any()))
    network.train()
    return {
        "val_lung_dice": float(np.mean(lung)),
        "val_nodule_dice": float(np.mean(nodule)) if nodule else float("nan"),
        "val_auc": roc_auc(scores, present),
    }


def mixed_precision(precision: str, device: Any) -> bool:
    """Whether to train under bfloat16 autocast.

    ``"auto"`` picks it on CUDA and on CPUs with native bfloat16 arithmetic (AVX512-BF16 or AMX):
    there a training step of the default network is about 2.5x faster than in float32 (1.2 s against
    3.1 s for a batch of four 32x80x80 patches on a 2-core EPYC), while the weights, the optimiser
    and the losses stay float32. Elsewhere bfloat16 is emulated and slower, so float32 is kept.
    """
    if precision == "bf16":
        return True
    if precision == "fp32":
        return False
    if precision != "auto":
        raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {precision!r}")
    if device.type == "cuda":
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def train(bundle_dir: Path, work_dir: Path, settings: TrainSettings) -> dict[str, Any]:
    """Train, validate every epoch, keep the best checkpoint, and install it into the bundle."""
    import torch
    import torch.nn.functional as F

    from models.loader import configure_torch, resolve_device
    from models.networks import build_network
    from models.spec import load_spec

    configure_torch(settings.threads)
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    spec = load_spec(bundle_dir / "model.toml")
    work_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    train_seeds = [TRAIN_SEED_BASE + i for i in range(settings.train_cases)]
    validation_seeds = [VALIDATION_SEED_BASE + i for i in range(settings.validation_cases)]
    cases = load_cases(train_seeds, bundle_dir, work_dir / "cache", settings.workers)
    validation = load_cases(validation_seeds, bundle_dir, work_dir / "cache", settings.workers)
    prepared_seconds = time.perf_counter() - started
    device = resolve_device(settings.device)
    bf16 = mixed_precision(settings.precision, device)
    logger.info("event=training_device device=%s bf16=%s", device, bf16)
    # Channels-last 3-D tensors: oneDNN's convolutions run about 1.35x faster on them on this CPU
    # (0.39 s against 0.53 s for a step of 8 patches of 24x48x48, bfloat16), the same arithmetic.
    network = build_network(spec.architecture).to(device, memory_format=torch.channels_last_3d)
    network.train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=settings.learning_rate,
                                  weight_decay=settings.weight_decay)
    if settings.resume is not None:
        network.load_state_dict(torch.load(settings.resume, map_location=device, weights_only=True))
        logger.info("event=resumed checkpoint=%s", settings.resume)
    # Nodules are a fraction of a percent of the voxels even in nodule-centred patches: weight them up.
    class_weights = torch.tensor([1.0, 1.0, settings.nodule_class_weight], device=device)
    log_path = work_dir / "training_log.csv"
    best_score, best_epoch, history = -1.0, -1, []
    deadline = started + settings.minutes * 60.0
    stream = batches(cases, settings, rng)
    train_started = time.perf_counter()
    budget_seconds = max(60.0, deadline - train_started)
    step = 0

    def learning_rate() -> float:
        # Time-based schedule (the number of steps a CPU manages is not known in advance): a linear
        # warm-up over the first 20 steps, then a cosine decay over the time budget.
        fraction = min(1.0, (time.perf_counter() - train_started) / budget_seconds)
        warmup = min(1.0, (step + 1) / 20.0)
        return settings.learning_rate * warmup * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * fraction)))

    epoch = 0
    with open(log_path, "w", newline="") as log_file:
        writer = csv.writer(log_file)
        writer.writerow(["epoch", "seconds", "lr", "train_loss", "val_lung_dice", "val_nodule_dice", "val_auc"])
        for epoch in range(1, settings.max_epochs + 1):
            losses = []
            for _ in range(settings.steps_per_epoch):
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate()
                step += 1
                images, labels = next(stream)
                x = torch.from_numpy(images).to(device).contiguous(memory_format=torch.channels_last_3d)
                y = torch.from_numpy(labels.astype(np.int64)).to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    seg, cls = network(x)
                seg = seg.float()
                loss = F.cross_entropy(seg, y, weight=class_weights) + soft_dice_loss(seg, y, (LUNG, NODULE), per_sample=(NODULE,))
                if cls is not None:
                    patch_positive = (y == NODULE).flatten(1).sum(1).ge(8).float().unsqueeze(1)
                    loss = loss + 0.5 * F.binary_cross_entropy_with_logits(cls.float(), patch_positive)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
            metrics = validate(network, validation, spec, device)
            elapsed = time.perf_counter() - started
            row = {"epoch": epoch, "seconds": round(elapsed, 1), "lr": optimizer.param_groups[0]["lr"],
                   "train_loss": float(np.mean(losses)), **metrics}
            history.append(row)
            writer.writerow([row[k] for k in ("epoch", "seconds", "lr", "train_loss", "val_lung_dice",
                                              "val_nodule_dice", "val_auc")])
            log_file.flush()
            score = metrics["val_lung_dice"] + np.nan_to_num(metrics["val_nodule_dice"]) \
                + 0.5 * np.nan_to_num(metrics["val_auc"])
            logger.info("event=epoch epoch=%d seconds=%.0f loss=%.4f lung_dice=%.4f nodule_dice=%.4f auc=%.3f",
                        epoch, elapsed, row["train_loss"], metrics["val_lung_dice"],
                        metrics["val_nodule_dice"], metrics["val_auc"])
            torch.save(network.state_dict(), work_dir / "last.pt")
            if score > best_score:
                best_score, best_epoch = score, epoch
                torch.save(network.state_dict(), work_dir / "best.pt")
            per_epoch = (time.perf_counter() - train_started) / epoch
            if time.perf_counter() + per_epoch > deadline:
                break
    install_weights(bundle_dir, spec, work_dir / "best.pt")
    network.load_state_dict(torch.load(work_dir / "best.pt", map_location=device, weights_only=True))
    calibration = validation + load_cases(
        [VALIDATION_SEED_BASE + i for i in range(settings.validation_cases, settings.calibration_cases)],
        bundle_dir, work_dir / "cache", settings.workers)
    point = calibrate_operating_point(network, calibration, spec, device)
    _record_operating_point(bundle_dir, point)
    (bundle_dir / "training_log.csv").write_text(log_path.read_text())
    summary = {
        "epochs": epoch, "best_epoch": best_epoch, "minutes": round((time.perf_counter() - started) / 60, 1),
        "prepare_minutes": round(prepared_seconds / 60, 1), "train_cases": settings.train_cases,
        "validation_cases": settings.validation_cases, "settings": _jsonable(settings),
        "best": history[best_epoch - 1] if best_epoch > 0 else None,
        **_operating_point_summary(point, len(calibration)),
    }
    (bundle_dir / "training_summary.json").write_text(json.dumps(_finite(summary), indent=2) + "\n")
    return summary


def _finite(value: Any) -> Any:
    """``value`` with NaN floats as None, so the summary is strict JSON (AUC is NaN with one class)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _jsonable(settings: TrainSettings) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v) for k, v in
            ((f, getattr(settings, f)) for f in settings.__dataclass_fields__)}


FINDING_THRESHOLDS = (0.2, 0.3, 0.4, 0.5)
#: Candidate peak thresholds (hysteresis, `LabelSpec.peak_threshold`); 0 keeps every component.
PEAK_THRESHOLDS = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
#: False positives per scan the peak threshold must keep to on the calibration phantoms: the goal is
#: at most 1 on unseen scans, and a quarter of margin covers the spread of a couple of dozen scans.
FP_PER_SCAN_TARGET = 0.75
#: Nodules of at least this diameter (equivalent sphere on the network grid) count for the sensitivity
#: reported with each candidate peak threshold.
REPORTED_NODULE_MM = 6.0


@dataclass(frozen=True, slots=True)
class OperatingPoint:
    """The finding label's voxel threshold and peak threshold chosen on validation phantoms, with
    what each candidate gave (`calibrate_operating_point`)."""

    threshold: float | None
    peak_threshold: float | None
    dice_by_threshold: dict[str, float]
    detection_by_peak: dict[str, dict[str, float]]


def _grid_voxel_mm3(spec: Any) -> float:
    """Voxel volume of the plan's working grid (the last resample step), 1.0 without one."""
    volume = 1.0
    for step in spec.preprocess:
        if step.op == "resample" and "spacing_mm" in step.params:
            volume = float(np.prod(step.params["spacing_mm"]))
    return volume


def _component_detections(label_map: NDArray[Any], probability: NDArray[Any], truth: NDArray[np.bool_],
                          finding: Any, voxel_mm3: float) -> tuple[list[tuple[float, bool]], list[tuple[float, float]]]:
    """Per predicted component (min size applied): (peak probability, overlaps a true nodule); per true
    nodule: (equivalent diameter mm, highest peak among the predicted components overlapping it)."""
    structure = np.ones((3, 3, 3), dtype=bool)
    predicted, count = ndimage.label(label_map == finding.value, structure=structure)
    truth_cc, truth_count = ndimage.label(truth, structure=structure)
    min_voxels = finding.min_size_mm3 / voxel_mm3
    components: list[tuple[float, bool]] = []
    peak_of: dict[int, float] = {}
    for number, box in enumerate(ndimage.find_objects(predicted), start=1):
        if box is None:
            continue
        mask = predicted[box] == number
        if int(mask.sum()) < min_voxels:
            continue
        peak = float(probability[box][mask].max())
        overlapped = truth_cc[box][mask]
        components.append((peak, bool(overlapped.any())))
        for t in np.unique(overlapped[overlapped > 0]):
            peak_of[int(t)] = max(peak_of.get(int(t), 0.0), peak)
    sizes = ndimage.sum_labels(truth, truth_cc, range(1, truth_count + 1)) if truth_count else []
    nodules = [((6.0 * float(n) * voxel_mm3 / math.pi) ** (1.0 / 3.0), peak_of.get(i, -1.0))
               for i, n in enumerate(sizes, start=1)]
    return components, nodules


def calibrate_operating_point(network: Any, cases: Sequence[Case], spec: Any, device: Any = "cpu",
                              ) -> OperatingPoint:
    """Choose the finding label's operating point on validation phantoms (never the held-out set).

    1. The voxel ``threshold`` among `FINDING_THRESHOLDS` that maximises nodule Dice, with the node's
       own label decision (`pipeline.postprocess.plan_label_map`); ties keep the higher threshold.
       A network trained on a rare class is often under-confident on it.
    2. The ``peak_threshold`` (hysteresis): the lowest of `PEAK_THRESHOLDS` whose false positives per
       scan stay within `FP_PER_SCAN_TARGET` (the highest when none does). A component whose
       probability never reaches it is dropped; the components kept keep their extent, so the Dice of
       step 1 holds for every nodule that stays.

    Returns thresholds of None when the manifest has no finding label or no case has nodules.
    """
    import dataclasses

    import torch

    from models.metrics import dice
    from pipeline.infer import infer
    from pipeline.postprocess import plan_label_map

    finding = next((label for label in spec.labels if label.is_finding), None)
    if finding is None:
        return OperatingPoint(None, None, {}, {})
    voxel_mm3 = _grid_voxel_mm3(spec)
    network.eval()
    per_threshold: dict[float, list[float]] = {t: [] for t in FINDING_THRESHOLDS}
    outputs: list[tuple[NDArray[Any], NDArray[np.bool_]]] = []
    with torch.inference_mode():
        for case in cases:
            probabilities = infer(network, case.image[None], spec.inference, device=device).probabilities_czyx
            truth = case.labels == finding.value
            outputs.append((probabilities, truth))
            if not truth.any():
                continue
            for t in FINDING_THRESHOLDS:
                labels = [dataclasses.replace(label, threshold=t) if label.value == finding.value else label
                          for label in spec.labels]
                per_threshold[t].append(dice(plan_label_map(probabilities, labels) == finding.value, truth))
    if not any(per_threshold.values()):
        return OperatingPoint(None, None, {}, {})
    means = {t: float(np.mean(v)) for t, v in per_threshold.items()}
    best = max(sorted(means, reverse=True), key=lambda t: means[t])
    labels = [dataclasses.replace(label, threshold=best) if label.value == finding.value else label
              for label in spec.labels]
    components: list[tuple[float, bool]] = []
    nodules: list[tuple[float, float]] = []
    for probabilities, truth in outputs:
        found, true = _component_detections(plan_label_map(probabilities, labels), probabilities[finding.value],
                                            truth, finding, voxel_mm3)
        components += found
        nodules += true
    reported = [peak for diameter, peak in nodules if diameter >= REPORTED_NODULE_MM]
    detection: dict[str, dict[str, float]] = {}
    for peak in PEAK_THRESHOLDS:
        fp = sum(1 for p, hit in components if not hit and p >= peak) / max(1, len(outputs))
        sensitivity = float(np.mean([p >= peak for p in reported])) if reported else float("nan")
        detection[f"{peak:.2f}"] = {"false_positives_per_scan": fp, "sensitivity_ge_6mm": sensitivity}
    within = [p for p in PEAK_THRESHOLDS if detection[f"{p:.2f}"]["false_positives_per_scan"] <= FP_PER_SCAN_TARGET]
    peak_threshold = min(within) if within else max(PEAK_THRESHOLDS)
    logger.info("event=operating_point_calibrated label=%s threshold=%.2f peak_threshold=%.2f cases=%d %s %s",
                finding.name, best, peak_threshold, len(outputs),
                " ".join(f"dice@{t:.1f}={d:.4f}" for t, d in means.items()),
                " ".join(f"fp@{k}={v['false_positives_per_scan']:.2f}/sens={v['sensitivity_ge_6mm']:.2f}"
                         for k, v in detection.items()))
    return OperatingPoint(best, peak_threshold, {f"{t:.1f}": d for t, d in means.items()}, detection)


def set_operating_point(bundle_dir: Path, threshold: float, peak_threshold: float | None = None) -> None:
    """Write ``threshold`` (and ``peak_threshold``, added after it when absent) into the ``[[labels]]``
    table of ``model.toml`` that has ``is_finding = true``; the rest of the file is left as it is."""
    manifest = bundle_dir / "model.toml"
    text = manifest.read_text()
    tables = re.split(r"(?m)^(?=\[)", text)
    count = 0
    for i, table in enumerate(tables):
        if table.startswith("[[labels]]") and re.search(r"(?m)^is_finding\s*=\s*true", table):
            table, n = re.subn(r"(?m)^threshold\s*=\s*[0-9.]+", f"threshold = {threshold:g}", table)
            count += n
            if peak_threshold is not None:
                line = f"peak_threshold = {peak_threshold:g}"
                table, m = re.subn(r"(?m)^peak_threshold\s*=\s*[0-9.]+", line, table)
                if m == 0:
                    table = re.sub(r"(?m)^(threshold\s*=.*)$", lambda match: f"{match.group(1)}\n{line}", table, count=1)
            tables[i] = table
    if count != 1:
        raise RuntimeError(f"{manifest} has no single finding label with a threshold line to update")
    manifest.write_text("".join(tables))


def _record_operating_point(bundle_dir: Path, point: OperatingPoint) -> None:
    if point.threshold is not None:
        set_operating_point(bundle_dir, point.threshold, point.peak_threshold)


def _operating_point_summary(point: OperatingPoint, cases: int) -> dict[str, Any]:
    return {"finding_threshold": point.threshold, "finding_peak_threshold": point.peak_threshold,
            "calibration_cases": cases, "validation_nodule_dice_by_threshold": point.dice_by_threshold,
            "validation_detection_by_peak_threshold": point.detection_by_peak}


def calibrate_installed(bundle_dir: Path, work_dir: Path, calibration_cases: int, workers: int, device: str) -> int:
    """``--calibrate-only``: choose the operating point of the weights installed in the bundle."""
    from models.loader import load_model, resolve_device
    from models.spec import load_spec

    spec = load_spec(bundle_dir / "model.toml")
    handle = load_model(spec, resolve_device(device))
    seeds = [VALIDATION_SEED_BASE + i for i in range(calibration_cases)]
    cases = load_cases(seeds, bundle_dir, work_dir / "cache", workers)
    point = calibrate_operating_point(handle.module, cases, spec, handle.device)
    _record_operating_point(bundle_dir, point)
    result = _operating_point_summary(point, calibration_cases)
    summary_path = bundle_dir / "training_summary.json"
    if summary_path.is_file() and point.threshold is not None:
        summary = json.loads(summary_path.read_text())
        summary.update(result)
        summary_path.write_text(json.dumps(_finite(summary), indent=2) + "\n")
    print(json.dumps(_finite(result)))
    return 0


def install_weights(bundle_dir: Path, spec: Any, checkpoint: Path) -> str:
    """Copy ``checkpoint`` to the bundle's weights file and write its sha256 into ``model.toml``."""
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    target = bundle_dir / spec.weights.file
    tmp = target.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, target)
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    manifest = bundle_dir / "model.toml"
    text = manifest.read_text()
    text, count = re.subn(r'(?m)^sha256\s*=\s*"[0-9a-f]*"', f'sha256 = "{digest}"', text)
    if count != 1:
        raise RuntimeError(f"{manifest} has no single sha256 line under [weights] to update")
    manifest.write_text(text)
    return digest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help="model bundle to train")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR / "train",
                        help="cache, checkpoints and logs")
    defaults = TrainSettings()
    parser.add_argument("--minutes", type=float, default=defaults.minutes, help="time budget")
    parser.add_argument("--train-cases", type=int, default=defaults.train_cases)
    parser.add_argument("--validation-cases", type=int, default=defaults.validation_cases)
    parser.add_argument("--calibration-cases", type=int, default=defaults.calibration_cases,
                        help="validation phantoms the operating point (thresholds) is chosen on")
    parser.add_argument("--steps-per-epoch", type=int, default=defaults.steps_per_epoch)
    parser.add_argument("--max-epochs", type=int, default=defaults.max_epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--workers", type=int, default=defaults.workers)
    parser.add_argument("--nodule-class-weight", type=float, default=defaults.nodule_class_weight)
    parser.add_argument("--resume", type=Path, default=None, help="start from this checkpoint (state_dict)")
    parser.add_argument("--patch", type=lambda v: tuple(int(x) for x in v.split(",")), default=defaults.patch_zyx,
                        help="training patch Z,Y,X in voxels of the plan's grid")
    parser.add_argument("--nodule-patch-fraction", type=float, default=defaults.nodule_patch_fraction)
    parser.add_argument("--device", default=defaults.device, help="auto (CUDA when present), cpu, cuda, cuda:N")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default=defaults.precision,
                        help="bf16 autocast (auto: on CUDA and CPUs with native bfloat16)")
    parser.add_argument("--calibrate-only", action="store_true",
                        help="do not train: choose the finding label's thresholds for the bundle's installed "
                             "weights on the calibration phantoms and write them into model.toml")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.calibrate_only:
        return calibrate_installed(args.bundle, args.work_dir, args.calibration_cases, args.workers, args.device)
    settings = TrainSettings(minutes=args.minutes, train_cases=args.train_cases,
                             validation_cases=args.validation_cases,
                             calibration_cases=max(args.calibration_cases, args.validation_cases),
                             steps_per_epoch=args.steps_per_epoch,
                             max_epochs=args.max_epochs, batch_size=args.batch_size, threads=args.threads,
                             workers=args.workers, nodule_class_weight=args.nodule_class_weight,
                             resume=args.resume, patch_zyx=args.patch,
                             nodule_patch_fraction=args.nodule_patch_fraction, device=args.device,
                             precision=args.precision)
    summary = train(args.bundle, args.work_dir, settings)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
