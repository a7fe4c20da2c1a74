"""Train the default chest CT model (``make train``) on synthetic phantoms.

The recipe: phantoms from `models.phantoms` (seeded, varied geometry, anatomy, intensity, noise and
nodules) → the bundle's own preprocessing plan (`pipeline.preprocess.run_plan`, exactly what inference
runs; the label maps follow the same geometric steps with nearest-neighbour sampling) → random patches,
most of them centred on a nodule → augmentation (rotation about the body axis, shifts, left–right
flips, scaling as one affine resampling per batch; intensity scale/shift, noise) → 3-D U-Net with a
"nodule present" head → loss = soft Dice + cross-entropy on the segmentation, binary cross-entropy
on the head (a patch is positive when it holds nodule voxels; the study score is the maximum over
windows, as at inference) → validation every epoch on separate seeds with the real sliding-window
inference → checkpoints, a CSV log of the curves, then the best weights written into the bundle with
their sha256 in ``model.toml``, and finally the finding label's operating point (voxel and peak
thresholds) chosen on validation phantoms.

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


#: Nodules with an equivalent diameter (mm, on the network grid) in this band can be drawn more often
#: than others as the centre of a nodule patch (``--small-nodule-weight``). The 6–10 mm nodules are
#: most of what the ≥ 6 mm sensitivity misses, but weighting them 2.5x did not find more of them on the
#: held-out phantoms (0.37 either way) and raised the false positives per scan from 0.22 to 0.50, so
#: the shipped weights were trained with weight 1 (uniform over nodules).
SMALL_NODULE_BAND_MM = (5.0, 11.0)
SMALL_NODULE_WEIGHT = 1.0


@dataclass(frozen=True, slots=True)
class TrainSettings:
    """Knobs of one training run; the defaults reproduce the shipped weights."""

    train_cases: int = 64
    validation_cases: int = 6
    #: Validation phantoms (the first ``validation_cases`` and more) for choosing the operating point.
    calibration_cases: int = 24
    #: Time budget in minutes, phantom preparation included: with the candidate stage's ~15 minutes
    #: `make train` takes about 57 minutes on a 2-core CPU with native bfloat16.
    minutes: float = 43.0
    #: The best checkpoint is chosen among the epochs that end after this fraction of the time budget
    #: (the learning rate below about half its peak); earlier ones only while none has. On the 6
    #: validation phantoms nodule Dice swings by up to 0.15 between epochs at the high learning rate,
    #: so an early spike would otherwise be kept with a half-trained network and study head.
    select_from: float = 0.5
    max_epochs: int = 400
    steps_per_epoch: int = 150
    batch_size: int = 8
    patch_zyx: tuple[int, int, int] = (24, 48, 48)
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    nodule_patch_fraction: float = 0.8
    #: Sampling weight of 6–10 mm nodules (`SMALL_NODULE_BAND_MM`) relative to the others.
    small_nodule_weight: float = SMALL_NODULE_WEIGHT
    nodule_class_weight: float = 15.0
    resume: Path | None = None
    seed: int = 20261121
    threads: int = 0
    workers: int = 2
    device: str = "auto"
    precision: str = "auto"
    compile: str = "auto"


@dataclass(frozen=True, slots=True)
class Case:
    """One preprocessed training or validation case on the network's grid."""

    seed: int
    image: NDArray[np.float32]
    labels: NDArray[np.uint8]
    nodule_centers: tuple[tuple[int, int, int], ...]
    #: Equivalent-sphere diameter of each nodule on the network grid, in the order of ``nodule_centers``.
    nodule_diameters_mm: tuple[float, ...] = ()


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
    spec = load_spec(bundle_dir)
    steps = spec.preprocess
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
    voxel_mm3 = _grid_voxel_mm3(spec)
    cases = []
    for s in seeds:
        with np.load(folder / f"{s}.npz") as data:
            image = data["image"].astype(np.float32)
            labels = data["labels"]
            centers = tuple(tuple(int(v) for v in c) for c in data["centers"])
        # Same labelling as `prepare_case`, so the sizes come in the order of the centres.
        nodule_cc, _ = ndimage.label(labels == NODULE)
        voxels = np.bincount(nodule_cc.ravel())[1:]
        diameters = tuple(_equivalent_diameter_mm(v, voxel_mm3) for v in voxels)
        cases.append(Case(s, image, labels, centers, diameters))
    return cases


# ------------------------------------------------------------------------------------------ sampling

#: Augmentation ranges: in-plane rotation (degrees), isotropic scale, intensity gain and offset (on the
#: normalised 0–1 window), white-noise sigma.
ROTATION_DEGREES = 15.0
SCALE_RANGE = (0.85, 1.15)
GAIN_RANGE = (0.9, 1.1)
OFFSET_RANGE = (-0.05, 0.05)
NOISE_SIGMA_MAX = 0.03


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


def block_size(patch: Sequence[int]) -> tuple[int, int, int]:
    """The block cut around a patch centre so that the largest rotation and the smallest scale never
    reach past it: the patch over the smallest scale, and in-plane times cos + sin of the largest angle."""
    angle = math.radians(ROTATION_DEGREES)
    spread = math.cos(angle) + math.sin(angle)
    return tuple(int(math.ceil(p / SCALE_RANGE[0] * (1.0 if i == 0 else spread))) + 2  # type: ignore[return-value]
                 for i, p in enumerate(patch))


def nodule_weights(cases: Sequence[Case], small_weight: float = SMALL_NODULE_WEIGHT,
                   ) -> tuple[list[tuple[int, int]], NDArray[np.float64]]:
    """Every nodule of ``cases`` as (case index, nodule index), with its probability of being the
    centre of a nodule patch: uniform over nodules, those in `SMALL_NODULE_BAND_MM` ``small_weight``
    times more."""
    index, weights = [], []
    for c, case in enumerate(cases):
        for n in range(len(case.nodule_centers)):
            small = (n < len(case.nodule_diameters_mm)
                     and SMALL_NODULE_BAND_MM[0] <= case.nodule_diameters_mm[n] < SMALL_NODULE_BAND_MM[1])
            index.append((c, n))
            weights.append(small_weight if small else 1.0)
    w = np.asarray(weights, dtype=np.float64)
    return index, (w / w.sum() if w.size else w)


def sample_batch(cases: Sequence[Case], patch: Sequence[int], batch_size: int, rng: np.random.Generator,
                 nodule_fraction: float, generator: Any = None, nodules: Any = None) -> tuple[Any, Any]:
    """A batch of augmented training patches as torch tensors: images ``(B, 1, z, y, x)`` float32 and
    labels ``(B, z, y, x)`` int64.

    Per patch: a centre (a nodule, drawn by `nodule_weights`, with ``nodule_fraction``; else anywhere
    in a random case), shifted by up to ±35 % of the patch; then rotation about the body axis, scaling
    and a left–right flip, all applied as one affine resampling of the block around the centre
    (trilinear for the image, nearest for the labels: one ``grid_sample`` per batch, about 4x faster
    than rotating and zooming each patch with scipy); then intensity gain, offset and white noise.
    """
    import torch
    import torch.nn.functional as F

    index, probabilities = nodules if nodules is not None else nodule_weights(cases)
    block = block_size(patch)
    images = np.empty((batch_size, 1, *block), dtype=np.float32)
    labels = np.empty((batch_size, 1, *block), dtype=np.float32)
    theta = np.zeros((batch_size, 3, 4), dtype=np.float32)
    gain = np.empty(batch_size, dtype=np.float32)
    offset = np.empty(batch_size, dtype=np.float32)
    sigma = np.empty(batch_size, dtype=np.float32)
    half_patch = np.asarray(patch[::-1], dtype=np.float64) / 2.0  # x, y, z
    half_block = np.asarray(block[::-1], dtype=np.float64) / 2.0
    for b in range(batch_size):
        if index and rng.random() < nodule_fraction:
            c, n = index[int(rng.choice(len(index), p=probabilities))]
            case = cases[c]
            center = np.asarray(case.nodule_centers[n], float) + rng.uniform(-0.35, 0.35, 3) * np.asarray(patch)
        else:
            case = cases[int(rng.integers(len(cases)))]
            center = np.asarray([rng.uniform(0, n) for n in case.image.shape])
        start = [int(round(c - m / 2)) for c, m in zip(center, block)]
        images[b, 0] = _crop(case.image, start, block, fill=0.0)
        labels[b, 0] = _crop(case.labels, start, block, fill=0)
        angle = math.radians(float(rng.uniform(-ROTATION_DEGREES, ROTATION_DEGREES)))
        scale = float(rng.uniform(*SCALE_RANGE))
        flip = -1.0 if rng.random() < 0.5 else 1.0
        # Output voxel offsets (x, y, z) from the patch centre, rotated in the axial plane and divided
        # by the scale, are the block offsets sampled; in grid_sample's normalised coordinates
        # (align_corners=False) an offset of u voxels is u / (size / 2).
        rotation = np.array([[math.cos(angle), -math.sin(angle), 0.0],
                             [math.sin(angle), math.cos(angle), 0.0],
                             [0.0, 0.0, 1.0]])
        linear = np.diag(1.0 / half_block) @ rotation @ np.diag(half_patch * np.array([flip, 1.0, 1.0])) / scale
        theta[b, :, :3] = linear
        gain[b] = rng.uniform(*GAIN_RANGE)
        offset[b] = rng.uniform(*OFFSET_RANGE)
        sigma[b] = rng.uniform(0.0, NOISE_SIGMA_MAX)
    size = (batch_size, 1, *patch)
    grid = F.affine_grid(torch.from_numpy(theta), list(size), align_corners=False)
    x = F.grid_sample(torch.from_numpy(images), grid, mode="bilinear", padding_mode="border", align_corners=False)
    y = F.grid_sample(torch.from_numpy(labels), grid, mode="nearest", padding_mode="border", align_corners=False)
    noise = torch.randn(size, generator=generator) * torch.from_numpy(sigma).view(-1, 1, 1, 1, 1)
    x = x * torch.from_numpy(gain).view(-1, 1, 1, 1, 1) + torch.from_numpy(offset).view(-1, 1, 1, 1, 1) + noise
    return x.contiguous(), y[:, 0].round().to(torch.int64)


def batches(cases: Sequence[Case], settings: TrainSettings, rng: np.random.Generator, generator: Any = None,
            ) -> Iterator[tuple[Any, Any]]:
    nodules = nodule_weights(cases, settings.small_nodule_weight)
    while True:
        yield sample_batch(cases, settings.patch_zyx, settings.batch_size, rng, settings.nodule_patch_fraction,
                           generator, nodules)


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


def downsampled_labels(labels: Any, factor: int) -> Any:
    """Labels ``(B, z, y, x)`` on a grid ``factor`` times coarser, for a deep-supervision head: every
    ``factor``-th voxel, and nodule wherever the coarse voxel's block holds any nodule voxel, so that a
    nodule smaller than the coarse voxel is not dropped."""
    import torch.nn.functional as F

    coarse = labels[:, ::factor, ::factor, ::factor].clone()
    nodule = F.max_pool3d((labels == NODULE).float().unsqueeze(1), factor, stride=factor, ceil_mode=True)[:, 0]
    coarse[nodule[:, : coarse.shape[1], : coarse.shape[2], : coarse.shape[3]] > 0] = NODULE
    return coarse


def validate(network: Any, cases: Sequence[Case], spec: Any, device: Any = "cpu") -> dict[str, float]:
    """Sliding-window inference on whole validation cases (network grid): Dice per label, head AUC.

    Without the manifest's test-time mirroring: choosing the best epoch does not need it, and every
    epoch would pay for it in training time (the calibration and the node do use it).
    """
    import dataclasses

    import torch

    from models.metrics import dice, roc_auc
    from pipeline.infer import infer

    network.eval()
    plain = dataclasses.replace(spec.inference, mirror_axes=())
    lung, nodule, scores, present = [], [], [], []
    with torch.inference_mode():
        for case in cases:
            out = infer(network, case.image[None], plain, device=device)
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


def compiled_for_training(network: Any, mode: str, device: Any) -> Any:
    """The module the training steps call: ``torch.compile`` of ``network`` or ``network`` itself.

    ``"auto"`` compiles where torch's inductor can build its kernels (CUDA, or a CPU with a C++
    compiler on the PATH): a training step of the default network then takes 0.39 s instead of 0.47 s
    (8 patches of 24x48x48, bfloat16, 2-core EPYC), for about 50 s of compilation once. The compiled
    module shares the parameters; validation runs the plain module in eval mode, so the compiled graph
    only ever sees training shapes.
    """
    import shutil

    import torch

    if mode not in ("auto", "on", "off"):
        raise ValueError(f"compile must be 'auto', 'on' or 'off', got {mode!r}")
    if mode == "off":
        return network
    if mode == "auto" and device.type != "cuda" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        logger.info("event=compile_skipped reason=no_cxx_compiler")
        return network
    logger.info("event=training_compiled mode=%s", mode)
    return torch.compile(network)


@dataclass(slots=True)
class CheckpointChoice:
    """Which epoch's weights a run installs: the best validation score among the epochs that end after
    ``select_from`` of the time budget; until one has, the best so far (so a run cut short still has one)."""

    select_from: float
    best_score: float = -1.0
    best_epoch: int = -1
    late: bool = False

    def offer(self, epoch: int, score: float, budget_fraction: float) -> bool:
        """Record ``epoch``'s score at ``budget_fraction`` of the budget; True when it is the new choice."""
        if not self.late and budget_fraction >= self.select_from:
            self.late, self.best_score = True, -1.0  # from here on only late epochs compete
        if score > self.best_score:
            self.best_score, self.best_epoch = score, epoch
            return True
        return False


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
    if device.type == "cpu" and not bf16:
        # Measured on a 2-core AVX2 EPYC: 1.2 s per step in float32, against 0.4 s with bfloat16
        # (AVX512-BF16, compiled), on which the shipped weights were trained.
        logger.warning("event=training_precision precision=fp32 reason=no_native_bf16_on_this_cpu: a step "
                       "takes about 3x longer, so this time budget gives about a third of the shipped "
                       "weights' steps and weaker figures than the model card's")
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
    # The training pass: with the deep-supervision outputs where the network has them (`UNet3D`).
    plain_forward = getattr(network, "forward_train", network)
    forward = compiled_for_training(plain_forward, settings.compile, device)
    log_path = work_dir / "training_log.csv"
    choice, history = CheckpointChoice(settings.select_from), []
    deadline = started + settings.minutes * 60.0
    stream = batches(cases, settings, rng, torch.Generator().manual_seed(settings.seed))
    train_started = time.perf_counter()
    budget_seconds = max(60.0, deadline - train_started)
    step = 0

    def learning_rate() -> float:
        # Time-based schedule (the number of steps a CPU manages is not known in advance): a linear
        # warm-up over the first 20 steps, then a cosine decay over the time budget.
        fraction = min(1.0, (time.perf_counter() - train_started) / budget_seconds)
        warmup = min(1.0, (step + 1) / 20.0)
        return settings.learning_rate * warmup * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * fraction)))

    def segmentation_loss(seg: Any, y: Any) -> Any:
        return F.cross_entropy(seg, y, weight=class_weights) + soft_dice_loss(seg, y, (LUNG, NODULE),
                                                                               per_sample=(NODULE,))

    def training_loss(module: Any, x: Any, y: Any) -> Any:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            outputs = module(x)
        seg, cls = outputs[0], outputs[1]
        seg = seg.float()
        loss = segmentation_loss(seg, y)
        # Deep supervision: each coarser decoder level k against the labels down-sampled 2**k times,
        # weighted 1 / 2**k (nnU-Net's scheme).
        for k, aux in enumerate(outputs[2] if len(outputs) > 2 else (), start=1):
            loss = loss + segmentation_loss(aux.float(), downsampled_labels(y, 2 ** k)) / 2 ** k
        if cls is not None:
            patch_positive = (y == NODULE).flatten(1).sum(1).ge(8).float().unsqueeze(1)
            loss = loss + 0.5 * F.binary_cross_entropy_with_logits(cls.float(), patch_positive)
        return loss

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
                x = images.to(device).contiguous(memory_format=torch.channels_last_3d)
                y = labels.to(device)
                optimizer.zero_grad(set_to_none=True)
                try:
                    loss = training_loss(forward, x, y)
                    loss.backward()
                except Exception as exc:  # noqa: BLE001 - a compiler failure must not end the run
                    if forward is plain_forward:
                        raise
                    logger.warning("event=compile_failed error=%s; training continues uncompiled",
                                   type(exc).__name__)
                    forward = plain_forward
                    optimizer.zero_grad(set_to_none=True)
                    loss = training_loss(forward, x, y)
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
            if choice.offer(epoch, score, (time.perf_counter() - train_started) / budget_seconds):
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
        "epochs": epoch, "best_epoch": choice.best_epoch, "minutes": round((time.perf_counter() - started) / 60, 1),
        "prepare_minutes": round(prepared_seconds / 60, 1), "train_cases": settings.train_cases,
        "validation_cases": settings.validation_cases, "settings": _jsonable(settings),
        "best": history[choice.best_epoch - 1] if choice.best_epoch > 0 else None,
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
PEAK_THRESHOLDS = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99)
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


def _equivalent_diameter_mm(voxels: float, voxel_mm3: float) -> float:
    """Diameter of the sphere with the volume of ``voxels`` voxels of ``voxel_mm3`` each."""
    return float((6.0 * float(voxels) * voxel_mm3 / math.pi) ** (1.0 / 3.0))


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
    nodules = [(_equivalent_diameter_mm(n, voxel_mm3), peak_of.get(i, -1.0)) for i, n in enumerate(sizes, start=1)]
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
    parser.add_argument("--select-from", type=float, default=defaults.select_from,
                        help="fraction of the time budget after which the best checkpoint is chosen")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--workers", type=int, default=defaults.workers)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate,
                        help="peak AdamW learning rate (warm-up, then cosine decay over the time budget)")
    parser.add_argument("--nodule-class-weight", type=float, default=defaults.nodule_class_weight)
    parser.add_argument("--resume", type=Path, default=None, help="start from this checkpoint (state_dict)")
    parser.add_argument("--patch", type=lambda v: tuple(int(x) for x in v.split(",")), default=defaults.patch_zyx,
                        help="training patch Z,Y,X in voxels of the plan's grid")
    parser.add_argument("--nodule-patch-fraction", type=float, default=defaults.nodule_patch_fraction)
    parser.add_argument("--small-nodule-weight", type=float, default=defaults.small_nodule_weight,
                        help="how much more often 6-10 mm nodules centre a patch than other nodules")
    parser.add_argument("--device", default=defaults.device, help="auto (CUDA when present), cpu, cuda, cuda:N")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default=defaults.precision,
                        help="bf16 autocast (auto: on CUDA and CPUs with native bfloat16)")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default=defaults.compile,
                        help="torch.compile the training steps (auto: on CUDA, or with a C++ compiler)")
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
                             max_epochs=args.max_epochs, select_from=args.select_from,
                             batch_size=args.batch_size, threads=args.threads,
                             workers=args.workers, nodule_class_weight=args.nodule_class_weight,
                             learning_rate=args.learning_rate,
                             resume=args.resume, patch_zyx=args.patch,
                             nodule_patch_fraction=args.nodule_patch_fraction,
                             small_nodule_weight=args.small_nodule_weight, device=args.device,
                             precision=args.precision, compile=args.compile)
    summary = train(args.bundle, args.work_dir, settings)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
