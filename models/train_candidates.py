"""Train the default model's candidate stage (``make train``, after the network): the patch classifier
that takes a second look where the segmentation network found nothing (`pipeline.candidates`).

The recipe:

1. **Candidates as the node finds them.** Phantoms of their own seeds (`CANDIDATE_SEED_BASE`), with the
   whole range of acquisitions (matrices 192–512, 40–200 slices) → the bundle's preprocessing plan →
   `pipeline.candidates.detect_candidates` with the manifest's ``[candidates]`` settings, inside the
   true lungs. A candidate is positive when it lies in a true nodule (or touches it on the 2 mm grid).
   Each true nodule also gives a few positives at its centre, shifted by up to 2 mm. Around each, a
   cube is resampled from the source image at the stage's spacing (`pipeline.candidates.sample_patches`),
   with a margin for random shifts.
2. **Training.** `models.networks.PatchClassifier3D` on random crops of those cubes, with flips along
   every axis, quarter turns in the axial plane, intensity gain, offset and noise; binary
   cross-entropy with positives drawn as often as negatives (those of 5–11 mm nodules, what the network
   misses, three times as often as others); AdamW with a cosine learning rate; the
   area under the precision-recall curve of held-back phantoms' candidates each epoch; the best epoch
   kept.
3. **Calibration** (`calibrate`). The whole analysis (network, then candidates) on calibration
   phantoms: among the candidates whose ball would overlap no true nodule (`nodule_under_ball`), the
   classifier's score that at most ``--max-added-false-positives`` per scan reach. The manifest's ``score_bias`` shifts
   the logit so that this score becomes the nodule label's peak threshold: one operating point for both
   stages. When the bias changed, the analysis runs once more with it, so that what the summary
   records per phantom (nodules found, false positives) is what the chosen operating point gives.

The weights, their sha256 and the bias go into ``model.toml``; a summary into
``candidates_summary.json``. Seeds are fixed; like `models.train`, an offline tool that uses `pipeline`.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import logging
import math
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

logger = logging.getLogger(__name__)

DEFAULT_BUNDLE = Path(__file__).resolve().parent / "chest_ct_nodules"
DEFAULT_WORK_DIR = Path(__file__).resolve().parent / "_work"
CANDIDATE_SEED_BASE = 60_000
CANDIDATE_VALIDATION_SEED_BASE = 61_000
CANDIDATE_CALIBRATION_SEED_BASE = 62_000
#: Shifted copies of each true nodule's centre added as positives, and the largest shift (mm).
CENTRE_COPIES, CENTRE_JITTER_MM = 4, 2.0
#: Voxels of margin around each stored patch, for random shifts in training.
SHIFT_VOXELS = 2


@dataclass(frozen=True, slots=True)
class CandidateSettings:
    """Knobs of one candidate-stage training run; the defaults reproduce the shipped weights."""

    train_cases: int = 160
    validation_cases: int = 24
    calibration_cases: int = 24
    minutes: float = 14.0
    #: 12 epochs (5 minutes on a 2-core CPU) keep `make train` within 60 minutes with the network's 43.
    epochs: int = 12
    steps_per_epoch: int = 100
    batch_size: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    max_added_false_positives: float = 0.5
    #: How much more often a positive of a 5–11 mm nodule is drawn than one of another size: those are
    #: what the network misses.
    small_nodule_weight: float = 3.0
    seed: int = 20261203
    workers: int = 2


def candidate_shape_for(seed: int) -> tuple[int, int, int]:
    """The acquisition of a candidate-stage phantom: matrix 192–512 and 40–200 slices from the seed."""
    rng = np.random.default_rng([seed, 13])
    matrix = int(rng.choice([192, 256, 320, 384, 448, 512]))
    return (int(rng.integers(40, 201)), matrix, matrix)


def prepare_candidate_case(seed: int, bundle_dir: Path) -> dict[str, NDArray[Any]]:
    """One phantom's candidates as training examples: patches (HU, float16), labels and diameters."""
    from models.phantoms import generate_phantom
    from models.spec import load_spec
    from pipeline.candidates import detect_candidates, lps_to_index, sample_patches
    from pipeline.preprocess import replay_plan, run_plan
    from pipeline.types import Volume

    spec = load_spec(bundle_dir)
    stage = spec.candidates
    if stage is None:
        raise ValueError(f"{bundle_dir}/model.toml has no [candidates] table")
    phantom = generate_phantom(seed, shape_zyx=candidate_shape_for(seed))
    volume = Volume(phantom.hu_zyx.astype(np.float32), phantom.affine_lps)
    image, records = run_plan(volume, spec.preprocess)
    labels = np.asarray(replay_plan(volume.with_array(phantom.labels_zyx), records, order=0).array_zyx)
    ids = np.asarray(replay_plan(volume.with_array(phantom.nodule_ids_zyx.astype(np.int32)), records,
                                 order=0).array_zyx)
    found = detect_candidates(image, labels >= 1, scales_mm=stage.scales_mm, min_level=stage.min_level,
                              min_response=stage.min_response, max_candidates=stage.max_candidates,
                              max_level=stage.max_level, fill_outside_lungs=stage.fill_outside_lungs)
    near = ndimage.grey_dilation(ids, size=3)  # a candidate touching a nodule on the 2 mm grid hits it
    diameters = {n.index: float(n.diameter_mm) for n in phantom.nodules}
    centres, label, diameter = [], [], []
    for c in found:
        kji = np.rint(lps_to_index(image, np.asarray([c.center_lps_mm]))[0]).astype(int)
        inside = all(0 <= v < n for v, n in zip(kji, ids.shape))
        hit = int(near[tuple(kji)]) if inside else 0
        centres.append(c.center_lps_mm)
        label.append(1 if hit else 0)
        diameter.append(diameters.get(hit, 0.0))
    rng = np.random.default_rng([seed, 17])
    for n in phantom.nodules:
        if not (phantom.nodule_ids_zyx == n.index).any():
            continue
        centre = phantom.index_to_lps(np.asarray(n.center_zyx_vox, dtype=np.float64))
        for _ in range(CENTRE_COPIES):
            shift = rng.uniform(-CENTRE_JITTER_MM, CENTRE_JITTER_MM, 3)
            centres.append(tuple(float(v) for v in centre + shift))
            label.append(1)
            diameter.append(float(n.diameter_mm))
    size = stage.patch_size + 2 * SHIFT_VOXELS
    patches = sample_patches(volume, centres, size=size, spacing_mm=stage.patch_spacing_mm)
    return {"patches": patches.astype(np.float16), "labels": np.asarray(label, dtype=np.uint8),
            "diameters": np.asarray(diameter, dtype=np.float32),
            "detected": np.asarray([1] * len(found) + [0] * (len(label) - len(found)), dtype=np.uint8)}


def stage_key(bundle_dir: Path) -> str:
    """Cache key: the plan, the candidate settings, the generator's code and the detector's."""
    import models.phantoms
    import pipeline.candidates
    from models.spec import load_spec

    spec = load_spec(bundle_dir)
    stage = spec.candidates
    settings = (tuple((s.op, dict(s.params)) for s in spec.preprocess),
                (stage.scales_mm, stage.min_level, stage.min_response, stage.max_candidates,
                 stage.patch_size, stage.patch_spacing_mm, stage.max_level, stage.fill_outside_lungs)
                if stage else None)
    digest = hashlib.sha256(repr(settings).encode())
    digest.update(Path(models.phantoms.__file__).read_bytes())
    for function in (pipeline.candidates.detect_candidates, pipeline.candidates.dot_filter,
                     pipeline.candidates.symmetric_eigenvalues, pipeline.candidates.sample_patches):
        digest.update(inspect.getsource(function).encode())
    return digest.hexdigest()[:12]


def load_candidate_cases(seeds: Sequence[int], bundle_dir: Path, cache_dir: Path, workers: int
                         ) -> dict[str, NDArray[Any]]:
    """All examples of ``seeds`` (cached per seed), concatenated; ``case`` holds each one's seed."""
    folder = cache_dir / f"candidates-{stage_key(bundle_dir)}"
    folder.mkdir(parents=True, exist_ok=True)
    missing = [s for s in seeds if not (folder / f"{s}.npz").exists()]
    if missing:
        started = time.perf_counter()
        with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
            for seed, case in zip(missing, pool.map(prepare_candidate_case, missing,
                                                    [bundle_dir] * len(missing))):
                tmp = folder / f".{seed}.tmp.npz"
                np.savez(tmp, **case)
                os.replace(tmp, folder / f"{seed}.npz")
                logger.info("event=candidate_case_prepared seed=%d examples=%d positives=%d", seed,
                            len(case["labels"]), int(case["labels"].sum()))
        logger.info("event=candidate_cases_prepared count=%d seconds=%.1f", len(missing),
                    time.perf_counter() - started)
    parts: dict[str, list[NDArray[Any]]] = {"patches": [], "labels": [], "diameters": [], "detected": [],
                                            "case": []}
    for s in seeds:
        with np.load(folder / f"{s}.npz") as data:
            for key in ("patches", "labels", "diameters", "detected"):
                parts[key].append(data[key])
            parts["case"].append(np.full(len(data["labels"]), s, dtype=np.int64))
    return {k: np.concatenate(v) for k, v in parts.items()}


# ------------------------------------------------------------------------------------------ training

def augment_batch(patches: NDArray[np.float16], size: int, window_hu: tuple[float, float],
                  rng: np.random.Generator) -> NDArray[np.float32]:
    """Random crops (shifts of up to `SHIFT_VOXELS`), flips along every axis, quarter turns in the
    axial plane, the window, intensity gain and offset and white noise; ``[B, 1, s, s, s]``."""
    from pipeline.candidates import window

    out = np.empty((len(patches), 1, size, size, size), dtype=np.float32)
    margin = patches.shape[1] - size
    for n, patch in enumerate(patches):
        z, y, x = rng.integers(0, margin + 1, 3)
        cube = np.asarray(patch[z:z + size, y:y + size, x:x + size], dtype=np.float32)
        for axis in range(3):
            if rng.random() < 0.5:
                cube = np.flip(cube, axis)
        cube = np.rot90(cube, int(rng.integers(0, 4)), axes=(1, 2))
        cube = window(cube, *window_hu) * rng.uniform(0.9, 1.1) + rng.uniform(-0.05, 0.05)
        out[n, 0] = cube + rng.normal(0.0, rng.uniform(0.0, 0.03), cube.shape).astype(np.float32)
    return out


def centre_crop(patches: NDArray[np.float16], size: int, window_hu: tuple[float, float]) -> NDArray[np.float32]:
    """The central ``size``³ of each stored patch, windowed: what the node's analysis samples."""
    from pipeline.candidates import window

    m = (patches.shape[1] - size) // 2
    return window(np.asarray(patches[:, m:m + size, m:m + size, m:m + size], dtype=np.float32),
                  *window_hu)[:, None]


def average_precision(scores: NDArray[np.floating[Any]], labels: NDArray[np.integer[Any]]) -> float:
    """Area under the precision-recall curve (step-wise, as scikit-learn's average precision)."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    hits = np.asarray(labels)[order] > 0
    if not hits.any():
        return float("nan")
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].mean())


def predict_logits(network: Any, inputs: NDArray[np.float32], batch: int = 256) -> NDArray[np.float64]:
    import torch

    network.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(inputs), batch):
            out.append(network(torch.from_numpy(inputs[start:start + batch])).reshape(-1).numpy())
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


def train_classifier(bundle_dir: Path, work_dir: Path, settings: CandidateSettings) -> dict[str, Any]:
    """Train the classifier on the candidates of the training phantoms; return the run's summary with
    the best weights' state_dict under ``"state_dict"``."""
    import torch

    from models.metrics import roc_auc
    from models.networks import CANDIDATE_ARCHITECTURES, build_network
    from models.spec import load_spec

    stage = load_spec(bundle_dir).candidates
    if stage is None:
        raise ValueError(f"{bundle_dir}/model.toml has no [candidates] table")
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    cache = work_dir / "cache"
    prepare_started = time.perf_counter()
    train = load_candidate_cases([CANDIDATE_SEED_BASE + i for i in range(settings.train_cases)], bundle_dir,
                                 cache, settings.workers)
    valid = load_candidate_cases([CANDIDATE_VALIDATION_SEED_BASE + i for i in range(settings.validation_cases)],
                                 bundle_dir, cache, settings.workers)
    prepare_minutes = (time.perf_counter() - prepare_started) / 60.0
    positives = np.flatnonzero(train["labels"] == 1)
    negatives = np.flatnonzero(train["labels"] == 0)
    small = (train["diameters"][positives] >= 5.0) & (train["diameters"][positives] < 11.0)
    weights = np.where(small, settings.small_nodule_weight, 1.0)
    weights = weights / weights.sum()
    logger.info("event=candidate_training_data examples=%d positives=%d negatives=%d validation=%d",
                len(train["labels"]), len(positives), len(negatives), len(valid["labels"]))
    detected = valid["detected"] == 1
    valid_inputs = centre_crop(valid["patches"][detected], stage.patch_size, stage.window_hu)
    valid_labels = valid["labels"][detected]

    network = build_network(stage.architecture, CANDIDATE_ARCHITECTURES)
    optimizer = torch.optim.AdamW(network.parameters(), lr=settings.learning_rate,
                                  weight_decay=settings.weight_decay)
    total = settings.epochs * settings.steps_per_epoch
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.learning_rate, total_steps=total,
                                                   pct_start=0.1)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    half = settings.batch_size // 2
    started = time.perf_counter()
    best: dict[str, Any] = {"average_precision": -1.0}
    curve = []
    for epoch in range(1, settings.epochs + 1):
        network.train()
        losses = []
        for _ in range(settings.steps_per_epoch):
            chosen = np.concatenate([rng.choice(positives, half, p=weights),
                                     rng.choice(negatives, settings.batch_size - half)])
            x = torch.from_numpy(augment_batch(train["patches"][chosen], stage.patch_size, stage.window_hu, rng))
            y = torch.from_numpy(train["labels"][chosen].astype(np.float32))
            loss = loss_fn(network(x).reshape(-1), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
        # One pass per cube, without the manifest's axial turns: four passes would add about 4 minutes
        # to the run, and the shipped weights' epoch was chosen this way.
        logits = predict_logits(network, valid_inputs)
        ap = average_precision(logits, valid_labels)
        auc = roc_auc(list(logits), list(valid_labels > 0))
        elapsed = (time.perf_counter() - started) / 60.0
        curve.append({"epoch": epoch, "loss": float(np.mean(losses)), "average_precision": ap, "auc": auc,
                      "minutes": round(elapsed, 2)})
        logger.info("event=candidate_epoch epoch=%d loss=%.4f val_average_precision=%.4f val_auc=%.4f minutes=%.1f",
                    epoch, np.mean(losses), ap, auc, elapsed)
        if ap > best["average_precision"]:
            best = {"average_precision": ap, "auc": auc, "epoch": epoch,
                    "state_dict": {k: v.detach().clone() for k, v in network.state_dict().items()}}
        if elapsed >= settings.minutes:
            logger.warning("event=candidate_training_time_budget minutes=%.1f epoch=%d", elapsed, epoch)
            break
    return {"best_epoch": best["epoch"], "validation_average_precision": best["average_precision"],
            "validation_auc": best["auc"], "curve": curve, "state_dict": best["state_dict"],
            "train_examples": int(len(train["labels"])), "train_positives": int(len(positives)),
            "validation_candidates": int(detected.sum()), "validation_positives": int(valid_labels.sum()),
            "prepare_minutes": round(prepare_minutes, 1), "minutes": round((time.perf_counter() - started) / 60.0, 1)}


# --------------------------------------------------------------------------------------- calibration

def calibration_case(seed: int, bundle_dir: Path) -> dict[str, Any]:
    """The node's whole analysis of one calibration phantom: each candidate's logit (before the
    manifest's bias), the true nodule its ball would overlap (`nodule_under_ball`) and that nodule's
    diameter, and which true nodules the analysis found."""
    import torch

    from models.loader import load_model, resolve_device
    from models.metrics import TrueNodule, match_detections
    from models.phantoms import generate_phantom
    from models.spec import load_spec
    from pipeline.run import analyze_volume
    from pipeline.types import Volume

    torch.set_num_threads(1)
    spec = load_spec(bundle_dir)
    phantom = generate_phantom(seed, shape_zyx=candidate_shape_for(seed))
    volume = Volume(phantom.hu_zyx.astype(np.float32), phantom.affine_lps)
    analysis = analyze_volume(volume, spec, load_model(spec, resolve_device("cpu")))
    diameters = {n.index: float(n.diameter_mm) for n in phantom.nodules}
    logits, hits, sizes = [], [], []
    bias = spec.candidates.score_bias if spec.candidates else 0.0
    for candidate, score in analysis.candidates:
        hit = nodule_under_ball(phantom.nodule_ids_zyx, volume, candidate)
        p = min(max(score, 1e-12), 1 - 1e-12)
        logits.append(math.log(p / (1 - p)) - bias)
        hits.append(hit)
        sizes.append(diameters.get(hit, 0.0))
    label_map = np.asarray(analysis.result.label_map.array_zyx)
    truth = [TrueNodule(tuple(n.center_zyx_vox), n.diameter_mm) for n in phantom.nodules]  # type: ignore[arg-type]
    detection = match_detections(label_map == spec.candidates.label if spec.candidates else label_map == 2,
                                 phantom.labels_zyx == 2, truth)
    return {"seed": seed, "logits": logits, "hits": hits, "diameters": sizes,
            "nodules": [float(n.diameter_mm) for n in phantom.nodules], "found": list(detection.hits),
            "false_positives": detection.false_positives}


def nodule_under_ball(ids_zyx: NDArray[np.integer[Any]], volume: Any, candidate: Any) -> int:
    """The true nodule (its id in ``ids_zyx``, 0 for none) that the ball the candidate would be painted
    as overlaps most: a painted candidate that overlaps a nodule is not a false positive."""
    from pipeline.candidates import ball_region

    region = ball_region(volume, candidate)
    if region is None:
        return 0
    box, ball = region
    inside = ids_zyx[box][ball]
    inside = inside[inside > 0]
    return int(np.bincount(inside).argmax()) if inside.size else 0


def choose_bias(cases: Sequence[dict[str, Any]], max_added_false_positives: float, accept: float) -> dict[str, Any]:
    """The bias that lets at most ``max_added_false_positives`` per scan of the candidates that lie in
    no nodule reach ``accept`` (the label's peak threshold), with what it then rescues."""
    negatives = np.sort(np.asarray([z for c in cases for z, h in zip(c["logits"], c["hits"]) if not h]))[::-1]
    allowed = int(math.floor(max_added_false_positives * len(cases)))
    cut = float(negatives[allowed]) + 1e-6 if allowed < len(negatives) else float(negatives[-1]) if len(negatives) else 0.0
    bias = math.log(accept / (1 - accept)) - cut
    rescued: dict[str, int] = {"<6mm": 0, "6-10mm": 0, ">10mm": 0}
    for c in cases:
        seen: set[int] = set()
        for z, h, d in zip(c["logits"], c["hits"], c["diameters"]):
            if h and z >= cut and h not in seen:
                seen.add(h)
                rescued["<6mm" if d < 6 else "6-10mm" if d < 10 else ">10mm"] += 1
    added = int((negatives >= cut).sum())
    return {"score_bias": bias, "logit_cut": cut, "added_false_positives_per_scan": added / max(1, len(cases)),
            "candidates_in_nodules_accepted": rescued, "scans": len(cases)}


def install_candidate_weights(bundle_dir: Path, state_dict: dict[str, Any], bias: float) -> str:
    """Write the classifier's weights into the bundle, their sha256 and the bias into ``model.toml``."""
    import torch

    from models.spec import load_spec

    stage = load_spec(bundle_dir).candidates
    if stage is None:
        raise ValueError(f"{bundle_dir}/model.toml has no [candidates] table")
    target = bundle_dir / stage.weights.file
    tmp = target.with_suffix(".tmp")
    torch.save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, tmp)
    os.replace(tmp, target)
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    set_candidate_fields(bundle_dir, sha256=digest, score_bias=bias)
    return digest


def set_candidate_fields(bundle_dir: Path, *, sha256: str | None = None, score_bias: float | None = None) -> None:
    """Rewrite the ``[candidates]`` table's weights sha256 and/or ``score_bias`` lines in ``model.toml``."""
    manifest = bundle_dir / "model.toml"
    text = manifest.read_text()
    start = text.find("\n[candidates]")
    end = text.find("\n[", start + 1)
    if start < 0:
        raise RuntimeError(f"{manifest} has no [candidates] table")
    end = len(text) if end < 0 else end
    table = text[start:end]
    if sha256 is not None:
        table, n = re.subn(r'(weights\s*=\s*\{[^}\n]*sha256\s*=\s*")[0-9a-f]*(")', rf"\g<1>{sha256}\g<2>", table)
        if n != 1:
            raise RuntimeError(f"{manifest}: [candidates] has no single weights = {{ ..., sha256 = ... }} line")
    if score_bias is not None:
        table, n = re.subn(r"(?m)^score_bias\s*=.*$", f"score_bias = {score_bias:.4f}", table)
        if n != 1:
            raise RuntimeError(f"{manifest}: [candidates] has no single score_bias line")
    manifest.write_text(text[:start] + table + text[end:])


def calibrate(bundle_dir: Path, settings: CandidateSettings) -> dict[str, Any]:
    """Run the analysis on the calibration phantoms, choose the bias, write it into ``model.toml``."""
    from models.spec import load_spec

    spec = load_spec(bundle_dir)
    stage = spec.candidates
    if stage is None:
        raise ValueError(f"{bundle_dir}/model.toml has no [candidates] table")
    label = spec.label(stage.label)
    accept = max(label.threshold, label.peak_threshold)
    seeds = [CANDIDATE_CALIBRATION_SEED_BASE + i for i in range(settings.calibration_cases)]
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, settings.workers)) as pool:
        cases = list(pool.map(calibration_case, seeds, [bundle_dir] * len(seeds)))
        choice = choose_bias(cases, settings.max_added_false_positives, accept)
        set_candidate_fields(bundle_dir, score_bias=choice["score_bias"])
        if abs(choice["score_bias"] - stage.score_bias) > 1e-4:
            # The logits do not depend on the bias, but what the analysis found and painted does: run it
            # again so that the cases' figures below are those of the chosen operating point.
            cases = list(pool.map(calibration_case, seeds, [bundle_dir] * len(seeds)))
    choice["minutes"] = round((time.perf_counter() - started) / 60.0, 1)
    choice["cases"] = [{"seed": c["seed"], "candidates": len(c["logits"]), "nodules_mm": c["nodules"],
                        "found": c["found"], "false_positives": c["false_positives"]} for c in cases]
    logger.info("event=candidate_calibration score_bias=%.4f added_fp_per_scan=%.2f accepted_in_nodules=%s",
                choice["score_bias"], choice["added_false_positives_per_scan"],
                choice["candidates_in_nodules_accepted"])
    return choice


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.train_candidates", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR / "train")
    defaults = CandidateSettings()
    parser.add_argument("--minutes", type=float, default=defaults.minutes, help="training time budget")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--steps-per-epoch", type=int, default=defaults.steps_per_epoch)
    parser.add_argument("--train-cases", type=int, default=defaults.train_cases)
    parser.add_argument("--validation-cases", type=int, default=defaults.validation_cases)
    parser.add_argument("--calibration-cases", type=int, default=defaults.calibration_cases)
    parser.add_argument("--max-added-false-positives", type=float, default=defaults.max_added_false_positives,
                        help="false positives per scan the stage may add on the calibration phantoms")
    parser.add_argument("--workers", type=int, default=defaults.workers)
    parser.add_argument("--calibrate-only", action="store_true",
                        help="keep the installed weights; only choose score_bias again")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    settings = replace(defaults, minutes=args.minutes, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
                       train_cases=args.train_cases, validation_cases=args.validation_cases,
                       calibration_cases=args.calibration_cases,
                       max_added_false_positives=args.max_added_false_positives, workers=args.workers)
    summary: dict[str, Any] = {}
    previous = args.bundle / "candidates_summary.json"
    if args.calibrate_only and previous.is_file():
        # keep the record of how the installed weights were trained
        summary["training"] = json.loads(previous.read_text()).get("training")
    if not args.calibrate_only:
        trained = train_classifier(args.bundle, args.work_dir, settings)
        install_candidate_weights(args.bundle, trained.pop("state_dict"), 0.0)
        summary["training"] = trained
    summary["calibration"] = calibrate(args.bundle, settings)
    summary["settings"] = {k: getattr(settings, k) for k in settings.__dataclass_fields__}
    (args.bundle / "candidates_summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    print(json.dumps({k: v for k, v in summary.get("calibration", {}).items() if k != "cases"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
