"""Seeded synthetic chest CT phantoms with ground-truth label maps (issue 4, item 1).

The generator builds a supine adult chest in patient coordinates (DICOM LPS, millimetres) from a
frozen `PhantomParams` record, samples it on a CT grid with slice-thickness partial volume, in-plane
point-spread blur and CT-like correlated noise, and returns a `Phantom`: HU ``[k, j, i]`` (int16),
labels ``[k, j, i]`` (uint8) and the truth of every nodule. The same seed always gives the same
arrays. It feeds the tests, the demo, training, evaluation and the benchmarks; the DICOM writer lives
in `models.phantom_dicom`. This module must not import torch, pydicom networking or anything of
`node`/`pipeline` (layers run one way: pipeline → models).

Grid conventions are those of `pipeline.types`: array ``[k, j, i]``, k along +z (inferior → superior,
slice normal (0, 0, 1)), j along +y (anterior → posterior, Image Orientation column cosine (0, 1, 0)),
i along +x (patient right → left, row cosine (1, 0, 0)); ``spacing_mm`` in array order (slice, row,
column); ``affine_lps`` maps (i, j, k, 1) to LPS mm.

Label map (``labels_zyx``):

- 0 — background: air, table, body wall, mediastinum, heart, great vessels, hilar vessel roots,
  trachea and main bronchi, abdomen.
- 1 — lung: the lung region as a radiologist would segment it (parenchyma with the intrapulmonary
  vessels and the segmental bronchi inside it); the trachea, the main bronchi and the hilar roots of
  the vessel trees are excluded.
- 2 — nodule (always inside the lung region: a nodule touching the pleura is clipped by it). The lung
  region is ``labels_zyx >= 1``.

A voxel carries the label that covers at least half of it after slice-thickness averaging (the
weighted planes of its slice), so the labels agree with the partial-volume image. A nodule whose label
vanishes that way (far thinner than the slices) is left out of ``Phantom.nodules``.

Nodules: solid (about −10..60 HU, some spiculated), part-solid (a solid core with a ground-glass halo)
and ground-glass (about −650..−300 HU, soft margins), 3–30 mm, ellipsoidal and lobulated (a random sum
of zonal cosine harmonics on the surface), with internal texture, free in the parenchyma, touching the
pleura or attached to a vessel. Some studies have none. Look-alikes that are not labelled as nodules:
vessel cross-sections and branch points, bronchi, fissures, bullae, dependent atelectasis, spicules.

Cost (measured on the shared 2-core development machine under load, see the CLI's ``generate_seconds``):
a 128×256×256 phantom in about 1.5–4 s, a 300×512×512 one in about 9–13 s; writing 300 slices as
Explicit VR Little Endian about 1.5–5 s. Command line: ``python -m models.phantoms --seed N --out DIR
[--shape 300,512,512] [--spacing ...] [--nodules K] [--transfer-syntax UID] [--truth FILE.npz]``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

NoduleKind = Literal["solid", "part_solid", "ground_glass"]
NoduleAttachment = Literal["none", "pleura", "vessel"]

NODULE_KINDS: tuple[str, ...] = ("solid", "part_solid", "ground_glass")
NODULE_ATTACHMENTS: tuple[str, ...] = ("none", "pleura", "vessel")

LABEL_BACKGROUND = 0
LABEL_LUNG = 1
LABEL_NODULE = 2

#: Values of ``Phantom.structures_zyx`` (finer anatomy, for realism checks and curious users).
STRUCTURES: dict[int, str] = {
    0: "air",
    1: "table",
    2: "skin",
    3: "fat",
    4: "muscle",
    5: "bone",
    6: "lung",
    7: "vessel",
    8: "airway",
    9: "heart",
    10: "mediastinum",
    11: "great_vessel",
    12: "abdomen",
    13: "nodule",
    14: "central_airway",
    15: "spicule",
}
_S = {name: value for value, name in STRUCTURES.items()}

AIR_HU = -1000.0
MIN_HU = -1024
MAX_HU = 3071

#: Above this many fine voxels a volume is built in slabs (bounded memory).
_SLAB_PLANES = 8
#: Slices per noise/kernel slab (bounds the memory of the noise buffer).
_NOISE_SLAB = 16
#: Spacing (at most) of the planes the anatomy is sampled on before slices average them, in mm.
_SUBSLICE_MM = 1.6


class PhantomError(ValueError):
    """An argument of the generator or the writer is unusable; the message names it and the fix."""


@dataclass(frozen=True, slots=True)
class NoduleSpec:
    """One nodule to draw, in patient coordinates.

    ``center_lps_mm`` is the centre in LPS mm; ``diameter_mm`` the nominal diameter (twice the mean
    radius before lobulation); ``axes`` the ellipsoid's relative semi-axes (mean 1);
    ``rotation`` a 3×3 rotation (row-major) of the ellipsoid frame into LPS; ``lobes`` a tuple of
    (amplitude, order, axis_x, axis_y, axis_z, phase) zonal harmonics perturbing the surface radius;
    ``hu`` the solid (or ground-glass) attenuation; ``core_fraction`` and ``core_hu`` the solid core of a
    part-solid nodule (0 for the other kinds); ``edge_mm`` how gradual the margin is (0: one pixel);
    ``texture_hu`` and ``waves`` (wave vector in rad/mm and phase) an internal heterogeneity;
    ``spicules`` (direction x, y, z, length beyond the surface as a fraction of the radius, radius
    in mm) thin strands radiating from a solid nodule, drawn in the image but not labelled.
    """

    center_lps_mm: tuple[float, float, float]
    diameter_mm: float
    kind: str
    attached: str
    axes: tuple[float, float, float] = (1.0, 1.0, 1.0)
    rotation: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    lobes: tuple[tuple[float, float, float, float, float, float], ...] = ()
    hu: float = 30.0
    core_fraction: float = 0.0
    core_hu: float = 30.0
    edge_mm: float = 0.0
    texture_hu: float = 0.0
    waves: tuple[tuple[float, float, float, float], ...] = ()
    spicules: tuple[tuple[float, float, float, float, float], ...] = ()


@dataclass(frozen=True, slots=True)
class PhantomParams:
    """Everything that decides a phantom; `sample_phantom_params` draws it from a seed.

    Sampling ranges (``sample_phantom_params`` without overrides):

    Grid
        ``pixel_spacing_mm`` 0.5–1.0 mm (512 matrix fitted to the body), ``slice_thickness_mm``
        0.625–5 mm, ``slice_spacing_mm`` equal to the thickness or overlapping (0.5–0.8×);
        ``origin_lps_mm`` the LPS position of voxel (0, 0, 0); the field of view is shape × spacing.
    Patient
        ``body_half_width_mm`` 130–195, ``body_half_depth_mm`` 0.62–0.82 of the width,
        ``lung_height_mm`` about 180–310 (grows with the body), subcutaneous fat 3–25 mm (×1.15 for
        women, thicker at the back), muscle 5–14 mm (paraspinal muscles thicker), roll ±6°, centre
        offsets ±25 mm (left–right) and ±20 mm (anterior–posterior) from the field-of-view centre,
        table height and z position arbitrary; the scan covers the lungs with 8–50 mm margins.
    Intensities (HU)
        lung −890..−800 with a posterior (dependent) gradient 0–70, fat −115..−85, muscle 35–60,
        blood 35–50 without contrast or 120–320 with (35 % of studies), liver 50–70 (90–130 with
        contrast), trabecular bone 180–320 with a 500–900 cortex, a calibration offset ±6.
    Image quality
        ``noise_sigma_hu`` 10–40 (the standard deviation of the noise in the image),
        ``blur_sigma_mm`` 0.35–0.9 (Gaussian point-spread function, in plane, which also correlates
        the noise), a sharp (lung) kernel in 40 % of studies (unsharp mask 0.4–1.5 over 0.8–2 mm:
        edge overshoot, finer-grained noise), partial volume from the slice thickness (planes ≤ 1.6 mm apart averaged over
        each slice's thickness).
    Look-alikes that are not nodules
        fissures (80 %), emphysematous bullae (20 %), a dependent subpleural density band (30 %),
        gastric air (75 %), breasts (85 % of women), airways with walls, vessel branch points;
        a circular reconstruction field of view (−1024 HU corners) in 40 % of studies, arms down
        along the body (often cut by the field of view) in 12 %.
    Nodules
        0–``max_nodules`` (a quarter of the studies have none), 3–30 mm log-uniform, kinds solid
        60 %, part-solid 20 %, ground-glass 20 % (at least 5 mm), attachment none 60 %, pleura 25 %,
        vessel 15 %; axis ratios e^N(0, 0.12), 0–4 lobulation harmonics of order 2–6.
    """

    seed: int
    shape_zyx: tuple[int, int, int]
    pixel_spacing_mm: float
    slice_spacing_mm: float
    slice_thickness_mm: float
    origin_lps_mm: tuple[float, float, float]
    # patient (centre of the body's cross-section, lung base height)
    center_x_mm: float
    center_y_mm: float
    roll_deg: float
    body_half_width_mm: float
    body_half_depth_mm: float
    skin_mm: float
    fat_mm: float
    muscle_mm: float
    wall_mm: float
    lung_base_z_mm: float
    lung_height_mm: float
    left_dome_drop_mm: float
    dome_depth_mm: float
    mediastinum_half_width_mm: float
    mediastinum_shift_mm: float
    heart_axes_mm: tuple[float, float, float]
    heart_shift_mm: float
    heart_angle_deg: float
    aorta_radius_mm: float
    trachea_radius_mm: float
    vertebra_radius_mm: float
    rib_pitch_mm: float
    table: bool
    table_gap_mm: float
    patient_sex: str
    # intensities (HU)
    lung_hu: float
    lung_gradient_hu: float
    fat_hu: float
    muscle_hu: float
    skin_hu: float
    blood_hu: float
    myocardium_hu: float
    liver_hu: float
    bone_hu: float
    cortex_hu: float
    contrast: bool
    # image quality
    noise_sigma_hu: float
    blur_sigma_mm: float
    # vessel trees (attractor points per tree: ~2x segments)
    vessel_points: int
    nodules: tuple[NoduleSpec, ...] = ()
    kvp: float = 120.0
    tube_current_ma: float = 200.0
    # findings that are not nodules (the network must learn to ignore them)
    stomach_air: bool = True
    fissures: bool = True
    emphysema: float = 0.0  # fraction of lung points given a low-attenuation (−970 HU) bulla
    atelectasis_mm: float = 0.0  # thickness of a dependent subpleural density band in the lower lungs
    breast_mm: float = 0.0  # breast semi-axis (women), 0 for none
    hu_offset: float = 0.0  # scanner calibration offset added to every voxel (HU)
    circular_fov: bool = False  # outside the reconstruction circle the image is −1024 HU
    arms_down: bool = False  # arms along the body (trauma, frail patients) instead of raised
    sharpen: float = 0.0  # sharp (lung) reconstruction kernel: unsharp-mask amount, 0 for smooth
    sharpen_sigma_mm: float = 1.2  # … and its Gaussian's sigma

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel size in array order (slice spacing, row, column) in mm."""
        return (self.slice_spacing_mm, self.pixel_spacing_mm, self.pixel_spacing_mm)

    @property
    def affine_lps(self) -> NDArray[np.float64]:
        """4×4 affine from (i, j, k, 1) to LPS mm (axial, identity direction cosines)."""
        affine = np.eye(4)
        affine[0, 0] = self.pixel_spacing_mm
        affine[1, 1] = self.pixel_spacing_mm
        affine[2, 2] = self.slice_spacing_mm
        affine[:3, 3] = self.origin_lps_mm
        return affine

    def digest(self) -> str:
        """A stable hex digest of every parameter (for deterministic UIDs)."""
        return hashlib.sha256(repr(self).encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class NoduleTruth:
    """Ground truth of one drawn nodule.

    ``center_zyx_vox`` fractional voxel index (k, j, i) of the nominal centre; ``center_lps_mm`` the
    same point in LPS mm; ``diameter_mm`` the nominal diameter (see `NoduleSpec`); ``volume_ml`` and
    ``voxel_count`` measured on ``labels_zyx`` (label 2 voxels whose ``nodule_ids_zyx`` is ``index``);
    ``index`` is the 1-based value of the nodule in ``Phantom.nodule_ids_zyx``.
    """

    center_zyx_vox: tuple[float, float, float]
    center_lps_mm: tuple[float, float, float]
    diameter_mm: float
    kind: str
    attached: str
    index: int
    voxel_count: int
    volume_ml: float
    hu: float


@dataclass(frozen=True, slots=True)
class Phantom:
    """A generated chest CT: HU and labels ``[k, j, i]`` with their geometry and the nodules' truth.

    ``hu_zyx`` int16 HU (−1024..3071); ``labels_zyx`` uint8 (0 background, 1 lung, 2 nodule);
    ``nodule_ids_zyx`` uint8 (0, or the 1-based index of the nodule); ``structures_zyx`` uint8 finer
    anatomy (`STRUCTURES`); ``spacing_mm`` (slice spacing, row, column) mm; ``affine_lps`` as in
    `pipeline.types`.
    """

    hu_zyx: NDArray[np.int16]
    labels_zyx: NDArray[np.uint8]
    spacing_mm: tuple[float, float, float]
    nodules: tuple[NoduleTruth, ...]
    params: PhantomParams
    seed: int
    affine_lps: NDArray[np.float64]
    nodule_ids_zyx: NDArray[np.uint8]
    structures_zyx: NDArray[np.uint8]
    slice_thickness_mm: float
    seconds: float = field(default=0.0, compare=False)

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.hu_zyx.shape)  # type: ignore[return-value]

    @property
    def origin_lps_mm(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in self.affine_lps[:3, 3])  # type: ignore[return-value]

    @property
    def lung_zyx(self) -> NDArray[np.bool_]:
        """The lung region (lung or nodule label)."""
        return self.labels_zyx >= LABEL_LUNG

    @property
    def nodule_zyx(self) -> NDArray[np.bool_]:
        return self.labels_zyx == LABEL_NODULE

    def index_to_lps(self, kji: Any) -> NDArray[np.float64]:
        """Voxel indices ``(..., 3)`` in array order (k, j, i) → LPS mm ``(..., 3)``."""
        kji = np.asarray(kji, dtype=np.float64)
        return kji[..., ::-1] @ self.affine_lps[:3, :3].T + self.affine_lps[:3, 3]


# ----------------------------------------------------------------------------------------- sampling


def _rng(seed: int, *tags: str) -> np.random.Generator:
    """An independent, reproducible stream per purpose (adding a draw never shifts the others)."""
    key = hashlib.sha256(":".join([str(int(seed)), *tags]).encode()).digest()
    return np.random.default_rng(int.from_bytes(key[:16], "little"))


_THICKNESS_CHOICES = (0.625, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0)
_THICKNESS_WEIGHTS = (0.12, 0.08, 0.2, 0.12, 0.08, 0.1, 0.12, 0.08, 0.1)


def sample_phantom_params(
    seed: int,
    *,
    shape_zyx: tuple[int, int, int] | None = None,
    spacing_mm: tuple[float, float, float] | None = None,
    slice_thickness_mm: float | None = None,
    nodules: int | None = None,
    max_nodules: int = 5,
    nodule_kinds: Sequence[str] | None = None,
    nodule_attachments: Sequence[str] | None = None,
    nodule_diameter_mm: tuple[float, float] = (3.0, 30.0),
    noise_sigma_hu: float | None = None,
    blur_sigma_mm: float | None = None,
    contrast: bool | None = None,
    max_slices: int = 320,
) -> PhantomParams:
    """Draw a phantom's parameters from ``seed`` (see `PhantomParams` for the ranges).

    Parameters
    ----------
    seed
        Any integer; equal seeds and arguments give equal parameters.
    shape_zyx
        Grid (slices, rows, columns). Without ``spacing_mm`` the spacing is chosen so that the field
        of view holds the body and the slices cover the lungs with a margin.
    spacing_mm
        Voxel size (slice spacing, row, column) in mm; rows and columns must be equal. Without
        ``shape_zyx`` the grid is sized to the body and lungs (a 512 matrix when neither is given).
    slice_thickness_mm
        Reconstructed slice thickness (default: the slice spacing, sometimes larger = overlapping).
    nodules
        Exact number of nodules to place (default: 0–``max_nodules``, none in a quarter of studies).
        Fewer are placed when the lungs in the field of view cannot hold them.
    nodule_kinds, nodule_attachments
        Allowed kinds / attachments, drawn uniformly among those given (default: weighted, all).
    nodule_diameter_mm
        (min, max) nominal diameter in mm, drawn log-uniformly.
    noise_sigma_hu, blur_sigma_mm, contrast
        Fix the image noise (HU), the in-plane Gaussian blur (mm) or the contrast phase.
    max_slices
        Cap on the slice count of an automatically sized grid (thin slices then cover only the
        middle of the lungs, like a limited scan range).

    Raises
    ------
    PhantomError
        An argument is out of range (the message names it).
    """
    rng = _rng(seed, "params")
    if shape_zyx is not None and (len(shape_zyx) != 3 or min(shape_zyx) < 1):
        raise PhantomError(f"shape_zyx must be three positive ints, got {shape_zyx!r}")
    if spacing_mm is not None:
        if len(spacing_mm) != 3 or min(spacing_mm) <= 0:
            raise PhantomError(f"spacing_mm must be three positive mm values, got {spacing_mm!r}")
        if not math.isclose(spacing_mm[1], spacing_mm[2], rel_tol=1e-6):
            raise PhantomError("spacing_mm rows and columns must be equal (square pixels)")
    lo_d, hi_d = nodule_diameter_mm
    if not (0.5 <= lo_d <= hi_d <= 80):
        raise PhantomError(f"nodule_diameter_mm must satisfy 0.5 <= min <= max <= 80, got {nodule_diameter_mm!r}")
    for name, given, allowed in (
        ("nodule_kinds", nodule_kinds, NODULE_KINDS),
        ("nodule_attachments", nodule_attachments, NODULE_ATTACHMENTS),
    ):
        if given is not None and (not given or any(g not in allowed for g in given)):
            raise PhantomError(f"{name} must be a non-empty subset of {allowed}, got {given!r}")

    # --- patient
    sex = "M" if rng.random() < 0.55 else "F"
    half_width = float(rng.uniform(130, 195)) * (1.0 if sex == "M" else 0.94)
    half_depth = half_width * float(rng.uniform(0.62, 0.82))
    lung_height = float(np.clip(rng.normal(1.0, 0.08), 0.8, 1.2)) * (170 + 0.45 * half_width)
    fat = float(rng.uniform(3, 25)) * (1.15 if sex == "F" else 1.0)
    muscle = float(rng.uniform(5, 14))
    skin = float(rng.uniform(1.5, 2.5))
    wall = float(rng.uniform(8, 12))
    dome_depth = float(rng.uniform(35, 60))
    # Scan range: from above the apices to below the costophrenic recesses (1.4 dome depths under
    # the right dome, plus the left dome's drop), with margins.
    lung_extent = lung_height + 1.4 * dome_depth + 12.0
    margin_top, margin_bottom = float(rng.uniform(8, 40)), float(rng.uniform(8, 50))
    coverage = lung_extent + margin_top + margin_bottom

    # --- grid
    fov_needed = 2 * half_width * float(rng.uniform(1.06, 1.3))
    if spacing_mm is None:
        if shape_zyx is None:
            dx = float(np.clip(fov_needed / 512, 0.5, 1.0))
            thickness = float(rng.choice(_THICKNESS_CHOICES, p=_THICKNESS_WEIGHTS))
            dz = thickness * float(rng.choice([1.0, 1.0, 1.0, 0.5, 0.8]))
            nz = int(min(max_slices, math.ceil(coverage / dz)))
            shape = (nz, 512, 512)
        else:
            dx = fov_needed / max(shape_zyx[1], shape_zyx[2])
            dz = coverage / shape_zyx[0]
            thickness = dz * float(rng.choice([1.0, 1.0, 1.25]))
            shape = tuple(int(n) for n in shape_zyx)  # type: ignore[assignment]
    else:
        dz, dx = float(spacing_mm[0]), float(spacing_mm[1])
        thickness = dz * float(rng.choice([1.0, 1.0, 1.25]))
        if shape_zyx is None:
            n_xy = int(math.ceil(fov_needed / dx / 8.0) * 8)
            shape = (int(math.ceil(coverage / dz)), n_xy, n_xy)
        else:
            shape = tuple(int(n) for n in shape_zyx)  # type: ignore[assignment]
    if slice_thickness_mm is not None:
        if not (0.1 <= slice_thickness_mm <= 20):
            raise PhantomError(f"slice_thickness_mm must be within 0.1–20 mm, got {slice_thickness_mm}")
        thickness = float(slice_thickness_mm)
    nz, ny, nx = shape

    # Scanner frame: field-of-view centre near the isocentre; z positions are arbitrary table values.
    fov_center_x = float(rng.uniform(-15, 15))
    fov_center_y = float(rng.uniform(-20, 20))
    center_x = fov_center_x + float(rng.uniform(-25, 25))
    center_y = fov_center_y + float(rng.uniform(-20, 20))
    lung_base_z = float(rng.uniform(-450, 50))
    # Slices centred on the lungs (recesses reach ~45 mm under the domes), with a random shift.
    scan_mid = lung_base_z + lung_height + margin_top - coverage / 2
    z_extent = (nz - 1) * dz
    z0 = scan_mid - z_extent / 2
    origin = (
        fov_center_x - (nx - 1) * dx / 2,
        fov_center_y - (ny - 1) * dx / 2,
        z0,
    )

    contrast_on = bool(rng.random() < 0.35) if contrast is None else bool(contrast)
    blood = float(rng.uniform(120, 320)) if contrast_on else float(rng.uniform(35, 50))
    params = PhantomParams(
        seed=int(seed),
        shape_zyx=(int(nz), int(ny), int(nx)),
        pixel_spacing_mm=round(dx, 6),
        slice_spacing_mm=round(dz, 6),
        slice_thickness_mm=round(thickness, 6),
        origin_lps_mm=tuple(round(v, 4) for v in origin),  # type: ignore[arg-type]
        center_x_mm=center_x,
        center_y_mm=center_y,
        roll_deg=float(rng.uniform(-6, 6)),
        body_half_width_mm=half_width,
        body_half_depth_mm=half_depth,
        skin_mm=skin,
        fat_mm=fat,
        muscle_mm=muscle,
        wall_mm=wall,
        lung_base_z_mm=lung_base_z,
        lung_height_mm=lung_height,
        left_dome_drop_mm=float(rng.uniform(5, 25)),
        dome_depth_mm=dome_depth,
        mediastinum_half_width_mm=float(rng.uniform(0.10, 0.15)) * half_width,
        mediastinum_shift_mm=float(rng.uniform(-8, 8)),
        heart_axes_mm=(
            float(rng.uniform(0.28, 0.36)) * half_width,
            float(rng.uniform(0.34, 0.42)) * half_depth,
            float(rng.uniform(0.18, 0.24)) * lung_height,
        ),
        heart_shift_mm=float(rng.uniform(0.08, 0.16)) * half_width,
        heart_angle_deg=float(rng.uniform(25, 50)),
        aorta_radius_mm=float(rng.uniform(11, 16)),
        trachea_radius_mm=float(rng.uniform(7, 10)),
        vertebra_radius_mm=float(rng.uniform(15, 21)),
        rib_pitch_mm=float(rng.uniform(0.1, 0.125)) * lung_height + 2,
        table=bool(rng.random() < 0.9),
        table_gap_mm=float(rng.uniform(0, 12)),
        patient_sex=sex,
        lung_hu=float(rng.uniform(-890, -800)),
        lung_gradient_hu=float(rng.uniform(0, 70)),
        fat_hu=float(rng.uniform(-115, -85)),
        muscle_hu=float(rng.uniform(35, 60)),
        skin_hu=float(rng.uniform(20, 60)),
        blood_hu=blood,
        myocardium_hu=float(rng.uniform(90, 130)) if contrast_on else float(rng.uniform(38, 50)),
        liver_hu=float(rng.uniform(90, 130)) if contrast_on else float(rng.uniform(50, 70)),
        bone_hu=float(rng.uniform(180, 320)),
        cortex_hu=float(rng.uniform(500, 900)),
        contrast=contrast_on,
        noise_sigma_hu=float(rng.uniform(10, 40)) if noise_sigma_hu is None else float(noise_sigma_hu),
        blur_sigma_mm=float(rng.uniform(0.35, 0.9)) if blur_sigma_mm is None else float(blur_sigma_mm),
        vessel_points=int(rng.integers(500, 1000)),
        kvp=float(rng.choice([100.0, 120.0, 120.0, 140.0])),
        tube_current_ma=float(rng.uniform(60, 350)),
    )
    x_rng = _rng(seed, "extras")
    params = replace(
        params,
        stomach_air=bool(x_rng.random() < 0.75),
        fissures=bool(x_rng.random() < 0.8),
        emphysema=float(x_rng.uniform(0.05, 0.3)) if x_rng.random() < 0.2 else 0.0,
        atelectasis_mm=float(x_rng.uniform(3, 12)) if x_rng.random() < 0.3 else 0.0,
        breast_mm=float(x_rng.uniform(35, 75)) if sex == "F" and x_rng.random() < 0.85 else 0.0,
        hu_offset=float(x_rng.uniform(-6, 6)),
        circular_fov=bool(x_rng.random() < 0.4),
        arms_down=bool(x_rng.random() < 0.12),
        sharpen=float(x_rng.uniform(0.4, 1.5)) if x_rng.random() < 0.4 else 0.0,
        sharpen_sigma_mm=float(x_rng.uniform(0.8, 2.0)),
    )
    if params.noise_sigma_hu < 0 or params.blur_sigma_mm < 0:
        raise PhantomError("noise_sigma_hu and blur_sigma_mm must be >= 0")

    n_rng = _rng(seed, "nodule-count")
    if nodules is None:
        count = 0 if n_rng.random() < 0.25 else int(n_rng.integers(1, max_nodules + 1))
    else:
        if not 0 <= nodules <= 250:
            raise PhantomError(f"nodules must be within 0–250 (uint8 nodule ids), got {nodules}")
        count = int(nodules)
    specs = _place_nodules(params, count, nodule_kinds, nodule_attachments, (lo_d, hi_d))
    return replace(params, nodules=specs)


# ------------------------------------------------------------------------------------------ anatomy


class _Anatomy:
    """Derived constants of a `PhantomParams` and the analytic tests on patient coordinates.

    Every function takes LPS coordinate arrays ``x, y, z`` that broadcast against each other.
    """

    def __init__(self, p: PhantomParams) -> None:
        self.p = p
        self.cx, self.cy = p.center_x_mm, p.center_y_mm
        roll = math.radians(p.roll_deg)
        self.cos_r, self.sin_r = math.cos(roll), math.sin(roll)
        self.A, self.B = p.body_half_width_mm, p.body_half_depth_mm
        self.Be = self.B / 0.9  # ellipse half-depth before the flat back is cut at v = B
        self.zb, self.H = p.lung_base_z_mm, p.lung_height_mm
        self.d_cav = p.skin_mm + p.fat_mm + p.muscle_mm + p.wall_mm
        self.mc = p.mediastinum_shift_mm
        self.phase = [float(v) for v in _rng(p.seed, "phases").uniform(0, 2 * np.pi, 8)]
        self.mw = p.mediastinum_half_width_mm
        # Spine: vertebral body centre (body frame v), posterior elements behind it.
        post_wall = p.skin_mm + p.fat_mm * 1.35 + 50.0
        self.v_vb = max(self.B - post_wall - p.vertebra_radius_mm, 0.12 * self.B)
        self.r_vb = p.vertebra_radius_mm
        # Heart (body frame): anterior-left, resting on the diaphragm.
        ha, hb, hc = p.heart_axes_mm
        self.heart_axes = (ha, hb, hc)
        self.heart_c = (
            self.mc + p.heart_shift_mm,
            -0.24 * self.B,
            self.zb + 0.55 * hc - 10.0,
        )
        ang = math.radians(p.heart_angle_deg)
        self.heart_cos, self.heart_sin = math.cos(ang), math.sin(ang)
        # Aorta: descending beside the spine (left-anterior of the vertebral body).
        self.r_ao = p.aorta_radius_mm
        self.desc = (self.mc + 0.55 * self.r_vb + 0.75 * self.r_ao, self.v_vb - 0.75 * self.r_vb)
        self.asc = (self.mc - 0.35 * self.mw, -0.28 * self.B)
        self.z_arch = self.zb + 0.78 * self.H
        self.z_carina = self.zb + 0.62 * self.H
        self.z_top = self.zb + self.H  # apex of the right lung
        self.trachea = (self.mc, self.v_vb - self.r_vb - p.trachea_radius_mm - 14.0)

    # --- frames
    def body_uv(self, x: Any, y: Any) -> tuple[Any, Any]:
        """LPS x, y → body frame (u right→left, v anterior→posterior), rolled about the z axis."""
        dx = x - self.cx
        dy = y - self.cy
        return dx * self.cos_r + dy * self.sin_r, -dx * self.sin_r + dy * self.cos_r

    def body_to_lps(self, u: float, v: float, z: float) -> NDArray[np.float64]:
        x = self.cx + u * self.cos_r - v * self.sin_r
        y = self.cy + u * self.sin_r + v * self.cos_r
        return np.array([x, y, z])

    def size_at(self, z: Any) -> tuple[Any, Any]:
        """Half width and ellipse half depth of the body at height ``z`` (narrower above the apex)."""
        s = (np.asarray(z, dtype=np.float32) - self.zb) / self.H
        taper = 1.0 - 0.10 * _smoothstep(0.95, 1.35, s) + 0.03 * np.sin(2.0 * s + self.p.seed % 7)
        return self.A * taper, self.Be * taper

    def depth(self, u: Any, v: Any, z: Any) -> Any:
        """Approximate depth below the skin in mm (negative outside the body)."""
        return np.minimum(self.depth_round(u, v, z), self.B - v)

    def depth_round(self, u: Any, v: Any, z: Any) -> Any:
        """Depth below the elliptical outline before the back is flattened on the table: the rib
        cage keeps this round shape, so the pleura follows it."""
        A, Be = self.size_at(z)
        r = np.sqrt(u * u + v * v) + np.float32(1e-3)
        rho = np.sqrt((u / A) ** 2 + (v / Be) ** 2) + np.float32(1e-6)
        return r / rho - r

    def in_cavity(self, depth: Any, depth_round: Any, cav_d: Any) -> Any:
        """Inside the pleural cavity: deep enough under the round outline and under the flat back."""
        return (depth_round >= cav_d) & (depth >= 0.55 * cav_d)

    def cavity_depth(self, u: Any, v: Any) -> Any:
        """Depth of the pleural cavity's wall below the skin (fat and muscle vary around the body)."""
        r = np.sqrt(u * u + v * v) + np.float32(1e-3)
        cu, cv = u / r, v / r
        p = self.p
        fat = p.fat_mm * (1.0 + 0.35 * cv + 0.25 * cu * cu)
        return p.skin_mm + fat + self.muscle_depth(u, cv) + p.wall_mm

    def muscle_depth(self, u: Any, cv: Any) -> Any:
        """Muscle layer thickness: paraspinal muscles make it thicker beside the spine, at the back."""
        w = (u - self.mc) / 70.0
        return self.p.muscle_mm * (1.0 + 3.0 * np.maximum(cv, 0.0) ** 2 * np.exp(-w * w))

    def diaphragm_z(self, u: Any, v: Any) -> Any:
        """Height of the diaphragm under each lung: a dome per side, lower in the recesses."""
        right = u < self.mc
        side_c = np.where(right, self.mc - 0.5 * self.A, self.mc + 0.5 * self.A).astype(np.float32)
        top = np.where(right, self.zb, self.zb - self.p.left_dome_drop_mm).astype(np.float32)
        q = ((u - side_c) / (0.45 * self.A)) ** 2 + ((v + 0.2 * self.B) / (0.8 * self.B)) ** 2
        return top - self.p.dome_depth_mm * np.minimum(q, 1.4)

    def heart_q(self, u: Any, v: Any, z: Any) -> Any:
        """Normalised ellipsoid radius² of the heart (< 1 inside)."""
        hx, hy, hz = self.heart_c
        du, dv = u - hx, v - hy
        a = du * self.heart_cos + dv * self.heart_sin
        b = -du * self.heart_sin + dv * self.heart_cos
        ha, hb, hc = self.heart_axes
        return (a / ha) ** 2 + (b / hb) ** 2 + ((z - hz) / hc) ** 2

    def mediastinum(self, u: Any, v: Any, z: Any) -> Any:
        """The central compartment between the lungs (without the heart), as a boolean array."""
        s = (z - self.zb) / self.H
        # narrow anteriorly (the lungs nearly meet behind the sternum), widest mid-way (aorta, trachea,
        # hila), narrower again at the oesophagus; wider in the upper chest; gently wavy edges
        vn = v / self.B + 0.05
        profile = 0.45 + 0.75 * np.exp(-((vn / 0.35) ** 2))
        wobble = 1.0 + 0.1 * np.sin(v * 0.04 + self.phase[0]) * np.sin(z * 0.025 + self.phase[1])
        width = self.mw * profile * wobble * (1.0 + 0.45 * _smoothstep(0.55, 0.9, s))
        central = np.abs(u - self.mc) < width
        desc = (u - self.desc[0]) ** 2 + (v - self.desc[1]) ** 2 < (self.r_ao + 4.0) ** 2
        spine = ((u - self.mc) ** 2 + (v - self.v_vb) ** 2 < (self.r_vb + 5.0) ** 2) | (
            (np.abs(u - self.mc) < self.r_vb + 6.0) & (v > self.v_vb)
        )
        region = central | desc | spine
        if np.any(np.abs(z - self.z_arch) < self.r_ao + 4.0):
            d = _segment_distance_2d(u, v, self.asc, self.desc)
            region = region | ((d**2 + (z - self.z_arch) ** 2) < (self.r_ao + 4.0) ** 2)
        return region

    def apex_ok(self, u: Any, v: Any, z: Any) -> Any:
        """The lung apices: above 60 % of the height each lung narrows smoothly to a dome (an
        ellipse around the apex that starts wider than the lung and shrinks to a point at the top)."""
        s0 = 0.6
        if np.all(z <= self.zb + s0 * self.H):
            return np.True_
        top = np.where(u < self.mc, self.z_top, self.z_top - 6.0).astype(np.float32)
        t = np.clip((z - (self.zb + s0 * self.H)) / (top - (self.zb + s0 * self.H)), 0.0, 1.0)
        shrink2 = np.maximum(1.0 - t * t, 0.0) * 1.7**2
        side_c = np.where(u < self.mc, self.mc - 0.45 * self.A, self.mc + 0.45 * self.A).astype(np.float32)
        q = ((u - side_c) / (0.34 * self.A)) ** 2 + ((v - 0.1 * self.B) / (0.55 * self.B)) ** 2
        return (q < shrink2) | (t <= 0.0)

    def lung(self, x: Any, y: Any, z: Any) -> Any:
        """Analytic lung region at LPS points (boolean array)."""
        u, v = self.body_uv(x, y)
        return self.lung_uv(u, v, z)

    def lung_uv(self, u: Any, v: Any, z: Any) -> Any:
        d_round = self.depth_round(u, v, z)
        inside = self.in_cavity(np.minimum(d_round, self.B - v), d_round, self.cavity_depth(u, v))
        inside &= z > self.diaphragm_z(u, v)
        inside &= z < self.z_top
        inside &= ~self.mediastinum(u, v, z)
        inside &= self.heart_q(u, v, z) > 1.12**2
        inside &= self.apex_ok(u, v, z)
        return inside


def _smoothstep(a: float, b: float, x: Any) -> Any:
    t = np.clip((x - a) / (b - a), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _segment_distance_2d(u: Any, v: Any, a: tuple[float, float], b: tuple[float, float]) -> Any:
    ab = (b[0] - a[0], b[1] - a[1])
    den = ab[0] ** 2 + ab[1] ** 2
    t = np.clip(((u - a[0]) * ab[0] + (v - a[1]) * ab[1]) / den, 0.0, 1.0)
    return np.sqrt((u - a[0] - t * ab[0]) ** 2 + (v - a[1] - t * ab[1]) ** 2)


# ------------------------------------------------------------------------------------- vessel trees


@dataclass(frozen=True, slots=True)
class _Tube:
    a: tuple[float, float, float]  # LPS mm
    b: tuple[float, float, float]
    r0: float
    r1: float
    hu: float
    structure: int
    central: bool = False  # excluded from the lung label (hilar roots, main bronchi)
    lumen: float = 0.0  # airway: lumen radius as a fraction of the outer radius (air inside)
    lung_only: bool = False  # drawn only inside the lung region (emphysematous bullae)


def _lung_points(anat: _Anatomy, rng: np.random.Generator, n: int, left: bool) -> NDArray[np.float64]:
    """``n`` points uniformly inside one lung (LPS mm)."""
    out: list[NDArray[np.float64]] = []
    got = 0
    u_lo, u_hi = (anat.mc, anat.mc + anat.A) if left else (anat.mc - anat.A, anat.mc)
    for _ in range(20):
        m = 4 * n
        u = rng.uniform(u_lo, u_hi, m)
        v = rng.uniform(-anat.B, anat.B, m)
        z = rng.uniform(anat.zb - anat.p.dome_depth_mm * 1.4 - 30, anat.z_top, m)
        ok = anat.lung_uv(u, v, z)
        pts = np.stack([u[ok], v[ok], z[ok]], axis=1)
        out.append(pts)
        got += len(pts)
        if got >= n:
            break
    uvz = np.concatenate(out)[:n]
    x = anat.cx + uvz[:, 0] * anat.cos_r - uvz[:, 1] * anat.sin_r
    y = anat.cy + uvz[:, 0] * anat.sin_r + uvz[:, 1] * anat.cos_r
    return np.stack([x, y, uvz[:, 2]], axis=1)


def _grow_tree(
    root: NDArray[np.float64],
    points: NDArray[np.float64],
    r_root: float,
    rng: np.random.Generator,
) -> list[tuple[NDArray[np.float64], NDArray[np.float64], float, float, int]]:
    """A space-filling bifurcating tree from ``root`` towards ``points`` (recursive bisection).

    Each branch heads for the centroid of the points it supplies, stops part way and splits them by
    the plane across their longest spread; radii follow Murray's law (r ∝ n^(1/3)). Returns segments
    (start, end, r_start, r_end, generation).
    """
    segments: list[tuple[NDArray[np.float64], NDArray[np.float64], float, float, int]] = []
    n_total = len(points)
    stack = [(root, points, 0)]
    while stack:
        start, pts, gen = stack.pop()
        n = len(pts)
        r = max(r_root * (n / n_total) ** (1 / 3), 0.35)
        if n == 1:
            end = pts[0]
            segments.append((start, end, r, 0.3, gen))
            continue
        centroid = pts.mean(axis=0)
        frac = float(rng.uniform(0.35, 0.6)) if gen > 0 else 0.3
        end = start + (centroid - start) * frac
        r_end = r * 0.93
        segments.append((start, end, r, r_end, gen))
        spread = pts - centroid
        axis = np.linalg.eigh(spread.T @ spread)[1][:, -1] if n > 2 else spread[0]
        proj = spread @ axis
        cut = rng.normal(0, 0.05) * (proj.max() - proj.min())  # about the centroid: near-even, cheap
        lo, hi = pts[proj <= cut], pts[proj > cut]
        if len(lo) == 0 or len(hi) == 0:
            lo, hi = pts[: n // 2], pts[n // 2 :]
        stack.append((end, lo, gen + 1))
        stack.append((end, hi, gen + 1))
    return segments


def _trees(anat: _Anatomy) -> tuple[_Tube, ...]:
    """Vessel and airway tubes: great vessels, trachea and bronchi, pulmonary arteries and veins."""
    return _trees_cached(replace(anat.p, nodules=()))


@functools.lru_cache(maxsize=4)
def _trees_cached(p: PhantomParams) -> tuple[_Tube, ...]:
    anat = _Anatomy(p)
    rng = _rng(p.seed, "trees")
    tubes: list[_Tube] = []
    L = anat.body_to_lps
    if p.emphysema > 0:
        e_rng = _rng(p.seed, "emphysema")
        for left in (False, True):
            pts = _lung_points(anat, e_rng, int(p.emphysema * 500), left)
            for c in pts:
                r = float(np.clip(e_rng.lognormal(np.log(2.5), 0.5), 1.0, 9.0))
                tubes.append(_Tube(tuple(c), tuple(c), r, r, -975.0, _S["lung"], lung_only=True))
    blood = p.blood_hu
    z_low = anat.zb - 200.0
    z_high = anat.z_top + 200.0
    # great vessels
    desc_top = L(anat.desc[0], anat.desc[1], anat.z_arch)
    asc_top = L(anat.asc[0], anat.asc[1], anat.z_arch)
    hx, hy, hz = anat.heart_c
    asc_root = L(anat.asc[0] + 5.0, anat.asc[1] + 10.0, hz + 0.3 * anat.heart_axes[2])
    tubes.append(_Tube(tuple(desc_top), tuple(L(anat.desc[0], anat.desc[1], z_low)), anat.r_ao * 0.85, anat.r_ao * 0.75, blood, _S["great_vessel"], True))
    tubes.append(_Tube(tuple(asc_top), tuple(desc_top), anat.r_ao, anat.r_ao * 0.9, blood, _S["great_vessel"], True))
    tubes.append(_Tube(tuple(asc_root), tuple(asc_top), anat.r_ao * 1.05, anat.r_ao, blood, _S["great_vessel"], True))
    svc = (anat.asc[0] - anat.r_ao - 9.0, anat.asc[1] + 6.0)
    tubes.append(_Tube(tuple(L(svc[0], svc[1], z_high)), tuple(L(svc[0], svc[1], hz + 0.4 * anat.heart_axes[2])), 9.0, 10.0, blood, _S["great_vessel"], True))
    # trachea and main bronchi
    tx, ty = anat.trachea
    carina = L(tx, ty, anat.z_carina)
    tubes.append(_Tube(tuple(L(tx, ty, z_high)), tuple(carina), p.trachea_radius_mm, p.trachea_radius_mm, 30.0, _S["central_airway"], True, 0.82))
    # pulmonary trunk → hila
    trunk_root = L(hx + 0.2 * anat.heart_axes[0], hy - 0.4 * anat.heart_axes[1], hz + 0.6 * anat.heart_axes[2])
    bif = L(anat.mc + 8.0, -0.08 * anat.B, anat.z_carina - 18.0)
    tubes.append(_Tube(tuple(trunk_root), tuple(bif), 13.0, 12.0, blood, _S["great_vessel"], True))
    for left in (False, True):
        sign = 1.0 if left else -1.0
        hil_u = anat.mc + sign * (anat.mw + 6.0)
        art_hilum = L(hil_u, 0.02 * anat.B, anat.z_carina - (12.0 if left else 20.0))
        vein_hilum = L(hil_u, 0.12 * anat.B, anat.z_carina - 50.0)
        air_hilum = L(hil_u + sign * 4.0, 0.12 * anat.B - 12.0, anat.z_carina - (14.0 if left else 22.0))
        tubes.append(_Tube(tuple(bif), tuple(art_hilum), 10.0, 9.0, blood, _S["great_vessel"], True))
        la = L(hx - 0.1 * anat.heart_axes[0], hy + 0.75 * anat.heart_axes[1], hz + 0.25 * anat.heart_axes[2])
        tubes.append(_Tube(tuple(vein_hilum), tuple(la), 8.0, 9.0, blood, _S["great_vessel"], True))
        tubes.append(_Tube(tuple(carina), tuple(air_hilum), p.trachea_radius_mm * 0.8, p.trachea_radius_mm * 0.7, 30.0, _S["central_airway"], True, 0.8))
        for kind, hilum, r_root in (("artery", art_hilum, 7.5), ("vein", vein_hilum, 7.0), ("airway", air_hilum, 6.0)):
            n_pts = p.vessel_points if kind != "airway" else max(12, p.vessel_points // 8)
            pts = _lung_points(anat, _rng(p.seed, "tree-points", kind, str(left)), n_pts, left)
            if len(pts) < 2:
                continue
            for a, b, r0, r1, gen in _grow_tree(hilum, pts, r_root, rng):
                if kind == "airway":
                    if r0 < 1.2:
                        continue
                    tubes.append(_Tube(tuple(a), tuple(b), r0, max(r1, 1.0), 30.0, _S["airway"], gen == 0, 0.72))
                else:
                    tubes.append(_Tube(tuple(a), tuple(b), r0, r1, blood, _S["vessel"], gen == 0))
    # Airway walls first, all lumens after them: a later segment's wall must not paint over an
    # earlier segment's air at the joints.
    walls = [replace(t, lumen=0.0) for t in tubes]
    lumens = [
        replace(t, r0=t.r0 * t.lumen, r1=t.r1 * t.lumen, hu=AIR_HU, lumen=0.0) for t in tubes if t.lumen > 0
    ]
    return tuple(walls + lumens)


# ---------------------------------------------------------------------------------- nodule placement


def _place_nodules(
    p: PhantomParams,
    count: int,
    kinds: Sequence[str] | None,
    attachments: Sequence[str] | None,
    diameter_range: tuple[float, float],
) -> tuple[NoduleSpec, ...]:
    if count == 0:
        return ()
    anat = _Anatomy(p)
    rng = _rng(p.seed, "nodules")
    nz, ny, nx = p.shape_zyx
    ox, oy, oz = p.origin_lps_mm
    lo = np.array([ox, oy, oz])
    hi = lo + np.array([(nx - 1) * p.pixel_spacing_mm, (ny - 1) * p.pixel_spacing_mm, (nz - 1) * p.slice_spacing_mm])
    # Unit directions for the distance-to-pleura probe.
    golden = np.pi * (3 - np.sqrt(5))
    n_dir = 26
    idx = np.arange(n_dir) + 0.5
    zz = 1 - 2 * idx / n_dir
    rr = np.sqrt(1 - zz * zz)
    dirs = np.stack([rr * np.cos(golden * idx), rr * np.sin(golden * idx), zz], axis=1)
    steps = np.arange(0.75, 36.0, 1.5)
    probe = dirs[:, None, :] * steps[None, :, None]  # (dir, step, 3)
    tubes: list[_Tube] | None = None
    central = [t for t in _trees(anat) if t.central]
    placed: list[NoduleSpec] = []
    for _ in range(count):
        kind = str(rng.choice(kinds) if kinds else rng.choice(NODULE_KINDS, p=(0.6, 0.2, 0.2)))
        attached = str(rng.choice(attachments) if attachments else rng.choice(NODULE_ATTACHMENTS, p=(0.6, 0.25, 0.15)))
        lo_d, hi_d = diameter_range
        if kind == "ground_glass":
            lo_d = min(max(lo_d, 5.0), hi_d)
        diameter = float(math.exp(rng.uniform(math.log(lo_d), math.log(hi_d))))
        radius = diameter / 2
        # Candidate centres inside the lungs and the scanned box; keep the ones that fit.
        margin = np.array([radius * 0.5, radius * 0.5, min(radius * 0.5, 0.45 * (hi[2] - lo[2]))])
        cands = rng.uniform(lo + margin, np.maximum(hi - margin, lo + margin + 1e-3), size=(600, 3))
        ok = anat.lung(cands[:, 0], cands[:, 1], cands[:, 2])
        cands = cands[ok]
        if attached == "vessel":
            if tubes is None:
                tubes = [t for t in _trees(anat) if t.structure == _S["vessel"] and not t.central]
            sel = [t for t in tubes if 0.8 <= t.r1 <= 4.0]
            if sel:
                picks = rng.integers(0, len(sel), 300)
                vc = []
                for pick in picks:
                    t = sel[int(pick)]
                    a, b = np.array(t.a), np.array(t.b)
                    along = a + (b - a) * rng.uniform(0.2, 0.8)
                    ax = (b - a) / (np.linalg.norm(b - a) + 1e-9)
                    perp = np.cross(ax, rng.normal(size=3))
                    perp /= np.linalg.norm(perp) + 1e-9
                    vc.append(along + perp * (radius * 0.9 + t.r1 * 0.3))
                cands = np.array(vc)
                inside_box = np.all((cands >= lo + margin) & (cands <= hi - margin), axis=1)
                cands = cands[inside_box & anat.lung(cands[:, 0], cands[:, 1], cands[:, 2])]
            else:
                attached = "none"
        if len(cands) == 0:
            continue
        cands = cands[:96]
        first_out = _distance_probe(anat, cands, probe, steps)
        dist = first_out.min(axis=1)  # mm to the nearest lung boundary (1.5 mm steps)
        if attached == "pleura":
            # slide each candidate towards its nearest pleura until 0.65 radius from it, then re-probe
            nearest = dirs[np.argmin(first_out, axis=1)]
            cands = cands + nearest * (dist - 0.65 * radius)[:, None]
            cands = cands[anat.lung(cands[:, 0], cands[:, 1], cands[:, 2])]
            dist = _distance_probe(anat, cands, probe, steps).min(axis=1)
            good = (dist >= 0.45 * radius) & (dist <= 0.85 * radius + 0.5)
        else:
            good = dist >= radius + 1.5
        # keep clear of the hilar roots, great vessels and central airways (outside the lung label)
        good &= _clearance(cands, central) > radius + 1.0
        for other in placed:
            gap = np.linalg.norm(cands - np.array(other.center_lps_mm), axis=1)
            good &= gap > radius + other.diameter_mm / 2 + 3.0
        if not good.any():
            continue  # this nodule does not fit: fewer are placed (documented)
        center = cands[int(np.argmax(good))]
        axes = np.exp(rng.normal(0, 0.12, 3))
        axes /= axes.prod() ** (1 / 3)
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        lobes = []
        for _ in range(int(rng.integers(0, 5))):
            axis = rng.normal(size=3)
            axis /= np.linalg.norm(axis)
            lobes.append((float(rng.uniform(0.03, 0.12)), float(rng.integers(2, 7)), *map(float, axis), float(rng.uniform(0, np.pi))))
        if kind == "solid":
            hu, core_f, core_hu = float(rng.uniform(-10, 60)), 0.0, 0.0
        elif kind == "part_solid":
            hu, core_f, core_hu = float(rng.uniform(-620, -380)), float(rng.uniform(0.35, 0.65)), float(rng.uniform(-10, 50))
        else:
            hu, core_f, core_hu = float(rng.uniform(-650, -320)), 0.0, 0.0
        x_rng = _rng(p.seed, "nodule-look", str(len(placed)))
        if kind == "solid":
            edge, texture = float(x_rng.uniform(0.0, 0.6)), float(x_rng.uniform(4, 20))
        else:
            edge, texture = float(x_rng.uniform(0.5, 2.5)), float(x_rng.uniform(15, 60))
        waves = []
        for _ in range(3):
            k_dir = x_rng.normal(size=3)
            k_dir *= 2 * np.pi / float(x_rng.uniform(3.0, 8.0)) / np.linalg.norm(k_dir)
            waves.append((*map(float, k_dir), float(x_rng.uniform(0, 2 * np.pi))))
        spicules = []
        if kind == "solid" and diameter >= 8 and x_rng.random() < 0.35:
            for _ in range(int(x_rng.integers(4, 13))):
                d = x_rng.normal(size=3)
                d /= np.linalg.norm(d)
                spicules.append((*map(float, d), float(x_rng.uniform(0.4, 1.0)), float(x_rng.uniform(0.35, 0.7))))
        placed.append(
            NoduleSpec(
                center_lps_mm=tuple(float(c) for c in center),  # type: ignore[arg-type]
                diameter_mm=diameter,
                kind=kind,
                attached=attached,
                axes=tuple(float(a) for a in axes),  # type: ignore[arg-type]
                rotation=tuple(float(v) for v in q.ravel()),
                lobes=tuple(lobes),  # type: ignore[arg-type]
                hu=hu,
                core_fraction=core_f,
                core_hu=core_hu,
                edge_mm=edge,
                texture_hu=texture,
                waves=tuple(waves),  # type: ignore[arg-type]
                spicules=tuple(spicules),  # type: ignore[arg-type]
            )
        )
    return tuple(placed)


def _clearance(points: NDArray[np.float64], tubes: Sequence[_Tube]) -> NDArray[np.float64]:
    """Distance (mm) from each point to the surface of the nearest tube (negative inside one)."""
    if not tubes or len(points) == 0:
        return np.full(len(points), np.inf)
    a = np.array([t.a for t in tubes])[None]  # (1, tube, 3)
    b = np.array([t.b for t in tubes])[None]
    r = np.array([max(t.r0, t.r1) for t in tubes])[None]
    ab = b - a
    ap = points[:, None, :] - a
    tt = np.clip(np.sum(ap * ab, axis=2) / np.maximum(np.sum(ab * ab, axis=2), 1e-9), 0.0, 1.0)
    d = np.linalg.norm(ap - tt[..., None] * ab, axis=2) - r
    return d.min(axis=1)


def _distance_probe(
    anat: _Anatomy, cands: NDArray[np.float64], probe: NDArray[np.float64], steps: NDArray[np.float64]
) -> NDArray[np.float64]:
    """Distance (mm, at the probe's step) from each candidate to the lung boundary along each
    probe direction: ``(candidate, direction)``."""
    pts = cands[:, None, None, :] + probe[None]  # (cand, dir, step, 3)
    inside = anat.lung(pts[..., 0], pts[..., 1], pts[..., 2])
    return np.where(inside.all(axis=2), steps[-1] + 1, steps[np.argmin(inside, axis=2)])


# ---------------------------------------------------------------------------------------- rendering


class _Fine:
    """The oversampled grid: uniform planes ``step_mm`` apart (≤ 1.6 mm, a divisor of the slice
    spacing) from which each slice averages those inside its thickness (a box slice-sensitivity
    profile, the partial-volume effect of thick slices)."""

    def __init__(self, p: PhantomParams) -> None:
        nz, ny, nx = p.shape_zyx
        dz, thick = p.slice_spacing_mm, p.slice_thickness_mm
        m = max(1, math.ceil(dz / _SUBSLICE_MM - 1e-6))
        if thick < dz:  # gaps between slices: sample the thickness itself finely enough
            m = max(m, math.ceil(dz / max(thick / 2, 0.1)))
        step = dz / m
        self.step = step
        z0 = p.origin_lps_mm[2]
        # planes cover every slice's window [z_k - T/2, z_k + T/2] with one plane to spare
        first = math.floor(-(thick / 2) / step - 0.5) - 1
        last = math.ceil(((nz - 1) * dz + thick / 2) / step + 0.5) + 1
        self.z = z0 + np.arange(first, last + 1) * step
        centres = z0 + np.arange(nz) * dz
        lo_w, hi_w = centres - thick / 2, centres + thick / 2
        # weights[k] over planes [start[k], start[k] + width): overlap of the plane's extent with the window
        p_lo = self.z - step / 2
        p_hi = self.z + step / 2
        self.start = np.searchsorted(p_hi, lo_w, side="right")
        stop = np.searchsorted(p_lo, hi_w, side="left")
        self.width = int(np.max(stop - self.start))
        idx = self.start[:, None] + np.arange(self.width)[None, :]
        idx = np.minimum(idx, len(self.z) - 1)
        overlap = np.clip(np.minimum(p_hi[idx], hi_w[:, None]) - np.maximum(p_lo[idx], lo_w[:, None]), 0, None)
        overlap[overlap < 1e-6 * step] = 0.0
        # drop planes that only touch a window's edge (rounding), so each slice starts at its first
        # plane that really counts
        used = overlap > 0
        lead = np.argmax(used, axis=1)
        trail = np.argmax(used[:, ::-1], axis=1)
        self.start = self.start + lead
        self.width = int(np.max(self.width - lead - trail))
        idx = np.minimum(self.start[:, None] + np.arange(self.width)[None, :], len(self.z) - 1)
        overlap = np.clip(np.minimum(p_hi[idx], hi_w[:, None]) - np.maximum(p_lo[idx], lo_w[:, None]), 0, None)
        overlap[overlap < 1e-6 * step] = 0.0
        self.weights = (overlap / overlap.sum(axis=1, keepdims=True)).astype(np.float32)
        self.identity = m == 1 and math.isclose(thick, dz) and self.width == 1
        self.x = (p.origin_lps_mm[0] + np.arange(nx) * p.pixel_spacing_mm).astype(np.float32)
        self.y = (p.origin_lps_mm[1] + np.arange(ny) * p.pixel_spacing_mm).astype(np.float32)
        self.h = p.pixel_spacing_mm
        self.shape = (len(self.z), ny, nx)

    def box(self, lo: NDArray[np.float64], hi: NDArray[np.float64]) -> tuple[slice, slice, slice] | None:
        """Index ranges (fine plane, row, column) of the LPS box [lo, hi]; None when empty."""
        k0, k1 = np.searchsorted(self.z, lo[2]), np.searchsorted(self.z, hi[2], side="right")
        j0 = max(0, int(math.floor((lo[1] - self.y[0]) / self.h)))
        j1 = min(len(self.y), int(math.ceil((hi[1] - self.y[0]) / self.h)) + 1)
        i0 = max(0, int(math.floor((lo[0] - self.x[0]) / self.h)))
        i1 = min(len(self.x), int(math.ceil((hi[0] - self.x[0]) / self.h)) + 1)
        if k1 <= k0 or j1 <= j0 or i1 <= i0:
            return None
        return slice(int(k0), int(k1)), slice(j0, j1), slice(i0, i1)


def _render_anatomy(
    anat: _Anatomy, fine: _Fine, hu: NDArray[np.float32], lung: NDArray[np.bool_], struct: NDArray[np.uint8]
) -> None:
    """Body, chest wall, bones, lungs, mediastinum, heart, abdomen and table, slab by slab."""
    p = anat.p
    f32 = np.float32
    wtex = [float(v) for v in _rng(p.seed, "texture").uniform(0, 2 * np.pi, 6)]
    ny, nx = fine.shape[1:]
    # The background (air, and the table, which does not change along z) as one plane.
    back_hu = np.full((ny, nx), AIR_HU, dtype=np.float32)
    back_st = np.zeros((ny, nx), dtype=np.uint8)
    if p.table:
        # a carbon shell with a foam core, curved up at the edges, under the patient
        xt = fine.x[None, :] - (p.center_x_mm * 0.3)
        ty = fine.y[:, None] - (anat.cy + anat.B + p.table_gap_mm + 0.0006 * xt * xt)
        in_table = (np.abs(xt) < 230) & (ty >= 0) & (ty < 45)
        shell = in_table & ((ty < 3) | (ty > 41))
        back_hu[in_table] = -880.0
        back_hu[shell] = 250.0
        back_st[in_table] = _S["table"]
    # Everything else lies in the body's bounding box (with the roll, breasts and the cushion).
    slack = abs(anat.sin_r) * max(anat.A, anat.Be) + 6.0
    front = anat.Be * 1.05 + 0.5 * p.breast_mm
    j0 = max(0, int((anat.cy - front - slack - fine.y[0]) / fine.h))
    j1 = min(ny, int((anat.cy + anat.B + p.table_gap_mm + slack - fine.y[0]) / fine.h) + 2)
    half_width = anat.A * 1.05 + (_ARM_GAP_MM + 2 * _ARM_RADIUS_MM if p.arms_down else 0.0)
    i0 = max(0, int((anat.cx - half_width - slack - fine.x[0]) / fine.h))
    i1 = min(nx, int((anat.cx + half_width + slack - fine.x[0]) / fine.h) + 2)
    x = fine.x[None, None, i0:i1]
    y = fine.y[j0:j1, None][None]
    u, v = anat.body_uv(x, y)
    u = u.astype(f32)
    v = v.astype(f32)
    # fields that do not change along z, computed once
    r = np.sqrt(u * u + v * v) + f32(1e-3)
    cu, cv = u / r, v / r
    fat_mm = p.fat_mm * (1.0 + 0.35 * cv + 0.25 * cu * cu)
    fat_out = p.skin_mm + fat_mm
    muscle_out = fat_out + anat.muscle_depth(u, cv)
    cav_d = anat.cavity_depth(u, v)
    dia_z = anat.diaphragm_z(u, v)
    tex_uv = 6.0 * np.sin(u * 0.21 + wtex[0]) * np.sin(v * 0.17 + wtex[1])
    arms = _arms(anat, u, v) if p.arms_down else None
    for k0 in range(0, fine.shape[0], _SLAB_PLANES):
        z = fine.z[k0 : k0 + _SLAB_PLANES].astype(np.float32)[:, None, None]
        hu[k0 : k0 + _SLAB_PLANES] = back_hu
        struct[k0 : k0 + _SLAB_PLANES] = back_st
        if j1 <= j0 or i1 <= i0:
            continue
        h = hu[k0 : k0 + _SLAB_PLANES, j0:j1, i0:i1]
        s_ = struct[k0 : k0 + _SLAB_PLANES, j0:j1, i0:i1]
        lung_slab = lung[k0 : k0 + _SLAB_PLANES, j0:j1, i0:i1]
        depth_round = anat.depth_round(u, v, z)
        depth = np.minimum(depth_round, anat.B - v)
        body = depth > 0
        if arms is not None:
            for value, structure, mask in arms:
                np.copyto(h, f32(value), where=mask & ~body)
                np.copyto(s_, structure, where=mask & ~body)
        # cushion under the patient's back
        cushion = (~body) & (v > anat.B - 1.0) & (v < anat.B + p.table_gap_mm) & (np.abs(u) < anat.A * 0.8)
        np.copyto(h, f32(-750.0), where=cushion)
        # body wall layers (by depth below the skin)
        skin_in = depth < p.skin_mm
        fat_in = depth < fat_out
        muscle_in = depth < muscle_out
        texture = tex_uv * np.sin(z * 0.13 + wtex[2])
        np.copyto(h, f32(p.muscle_hu), where=body)
        np.copyto(s_, _S["muscle"], where=body)
        m = body & fat_in & ~skin_in
        np.copyto(h, p.fat_hu + texture, where=m)
        np.copyto(s_, _S["fat"], where=m)
        m = body & skin_in
        np.copyto(h, f32(p.skin_hu), where=m)
        np.copyto(s_, _S["skin"], where=m)
        # breasts: fat with glandular tissue in front of the chest wall
        bz = anat.zb + 0.38 * anat.H
        if p.breast_mm > 0 and np.any(np.abs(z - bz) < p.breast_mm):
            for side in (-1.0, 1.0):
                # supine: flattened against the chest and spread sideways
                bu = (u - anat.mc - side * 0.45 * anat.A) / (0.9 * p.breast_mm)
                bv = (v + 0.8 * anat.Be) / (0.45 * p.breast_mm)
                qb = bu * bu + bv * bv + ((z - bz) / (0.8 * p.breast_mm)) ** 2
                breast = (depth < p.skin_mm) & (qb < 1.0)
                db = (1.0 - np.sqrt(np.minimum(qb, 1.0))) * 0.5 * p.breast_mm
                np.copyto(h, np.where((db < p.skin_mm) & (depth <= 0), f32(p.skin_hu), p.fat_hu + 45.0 + 4.0 * texture), where=breast)
                np.copyto(s_, _S["fat"], where=breast)
        # scapulae: thin bone plates in the posterior-lateral muscles of the upper chest
        s_rel = (z - anat.zb) / anat.H
        scap = body & (s_rel > 0.45) & (s_rel < 1.1) & (cv > 0.15) & (np.abs(cu) > 0.45) & (np.abs(cu) < 0.9)
        scap &= (depth > fat_out + 2.0) & (depth < fat_out + 5.5)
        np.copyto(h, f32(p.cortex_hu * 0.75), where=scap)
        np.copyto(s_, _S["bone"], where=scap)
        # ribs in the wall band: obliques that descend anteriorly, cortex + marrow
        cav = body & anat.in_cavity(depth, depth_round, cav_d)
        wall_band = body & ~muscle_in & ~cav
        if wall_band.any():
            kk, jj, ii = np.nonzero(wall_band)
            ub, vb_ = u[0, jj, ii], v[0, jj, ii]
            zb_ = z[kk, 0, 0]
            theta = np.abs(np.arctan2(ub - anat.mc, vb_))  # 0 = posterior midline, π = anterior
            zr = zb_ + theta * (0.11 * anat.H)  # a rib runs ~ 0.11 H lower per radian going forward
            phase = (zr - anat.zb) / p.rib_pitch_mm
            dz = (phase - np.round(phase)) * p.rib_pitch_mm
            centre_d = cav_d[0, jj, ii] - p.wall_mm * 0.5
            dd = depth_round[kk, jj, ii] - centre_d
            q = (dz / 6.0) ** 2 + (dd / (0.38 * p.wall_mm)) ** 2
            level = np.round(phase)
            rib_ok = (q < 1.0) & (theta < 2.45) & (level >= -1) & (level <= 10)
            sternum = (theta > 2.9) & (np.abs(ub - anat.mc) < 16) & (np.abs(dd) < 0.4 * p.wall_mm) & (zb_ > anat.zb - 40) & (zb_ < anat.z_top - 25)
            bone_hu = np.where(q > 0.55, p.cortex_hu, p.bone_hu + 60.0)
            hh = np.where(rib_ok, bone_hu, np.where(sternum, p.bone_hu + 120.0, p.muscle_hu - 5.0))
            h[kk, jj, ii] = hh
            s_[kk, jj, ii] = np.where(rib_ok | sternum, _S["bone"], _S["muscle"])
        # thoracic cavity
        below = z <= dia_z
        med = anat.mediastinum(u, v, z)
        hq = anat.heart_q(u, v, z)
        lung_r = cav & ~below & (z < anat.z_top) & ~med & (hq > 1.12**2) & anat.apex_ok(u, v, z)
        lung_slab[...] = lung_r
        # mediastinum: fat; abdomen: liver on the right, spleen/stomach on the left
        m = cav & ~lung_r
        np.copyto(h, p.fat_hu + 10.0 + texture, where=m)
        np.copyto(s_, _S["mediastinum"], where=m)
        if np.any(z > anat.z_top - 15.0):
            # thoracic inlet above the apices: neck muscles, not mediastinal fat
            tx, ty = anat.trachea
            rt2 = (u - tx) ** 2 + (v - ty) ** 2
            inlet = m & (z > anat.z_top - 15.0) & (rt2 > (p.trachea_radius_mm + 3.0) ** 2)
            np.copyto(h, f32(p.muscle_hu - 5.0) + texture, where=inlet)
            np.copyto(s_, _S["muscle"], where=inlet)
            # thyroid lobes on either side of the trachea (iodine-rich: brighter than muscle)
            thyroid = inlet & (rt2 < (p.trachea_radius_mm + 16.0) ** 2) & (v < ty + 4.0) & (z > anat.z_top - 5.0)
            np.copyto(h, f32(95.0 if not p.contrast else 150.0) + texture, where=thyroid)
            # clavicles: from the top of the sternum outwards, rising slightly, in front of the apices
            au = np.abs(u - anat.mc)
            z_cl = anat.z_top - 8.0 + 0.12 * au
            clav = body & (cv < -0.2) & (au > 18.0) & (au < 0.75 * anat.A) & (np.abs(z - z_cl) < 7.0)
            clav &= (depth > fat_out + 1.0) & (depth < fat_out + 13.0)
            np.copyto(h, f32(p.cortex_hu * 0.7), where=clav)
            np.copyto(s_, _S["bone"], where=clav)
        ab = cav & below & (hq > 1.0)
        liver = ab & (u < anat.mc + 25)
        np.copyto(h, f32(p.liver_hu), where=liver)
        np.copyto(h, f32(p.liver_hu - 12.0), where=ab & ~liver)
        np.copyto(s_, _S["abdomen"], where=ab)
        # gastric fundus air under the left dome: a half-ellipsoid with a flat air-fluid level
        if p.stomach_air:
            gz = anat.zb - p.left_dome_drop_mm - 22.0
            gq = ((u - anat.mc - 0.42 * anat.A) / 38.0) ** 2 + ((v + 0.15 * anat.B) / 30.0) ** 2 + ((z - gz) / 16.0) ** 2
            stomach_air = ab & ~liver & (gq < 1.0) & (z > gz)
            np.copyto(h, f32(-990.0), where=stomach_air)
        # heart: myocardium shell, blood inside, epicardial fat outside
        heart = cav & (hq < 1.0)
        np.copyto(h, f32(p.myocardium_hu), where=heart)
        np.copyto(h, f32(p.blood_hu), where=cav & (hq < 0.72**2))
        np.copyto(s_, _S["heart"], where=heart)
        # lung parenchyma with a dependent (posterior) gradient and faint texture
        grad = p.lung_gradient_hu * np.clip((v + anat.B) / (2 * anat.B), 0.0, 1.0) ** 2
        lung_hu = p.lung_hu + grad + 1.5 * texture
        if p.atelectasis_mm > 0:
            s_rel3 = (z - anat.zb) / anat.H
            band = np.clip(1.0 - (depth - cav_d) / p.atelectasis_mm, 0.0, 1.0) * (v > 0.3 * anat.B) * (s_rel3 < 0.45)
            lung_hu = lung_hu + band * (-380.0 - lung_hu)
        if p.fissures:
            # oblique (major) fissures: rising posteriorly, and in an axial slice running from
            # postero-medial to antero-lateral
            width = max(1.0, fine.h)
            gain = 230.0 / width
            vf = v + 0.7 * (np.abs(u - anat.mc) - 0.4 * anat.A)
            major = z - (anat.zb + 0.28 * anat.H + 0.42 * anat.H * (vf / anat.B))
            sheet = np.clip(1.0 - np.abs(major) * 0.5 / width, 0.0, 1.0)
            lung_hu = lung_hu + gain * sheet
        np.copyto(h, lung_hu, where=lung_r)
        np.copyto(s_, _S["lung"], where=lung_r)
        # spine: vertebral bodies (cortex + trabecular bone), discs, canal, posterior elements
        du, dv = u - anat.mc, v - anat.v_vb
        rv2 = du * du + dv * dv
        disc = np.abs(((z - anat.zb) / (p.rib_pitch_mm * 1.02)) % 1.0 - 0.5) < 0.1
        vb = rv2 < anat.r_vb**2
        vb_hu = np.where(disc, f32(85.0), np.where(rv2 > (anat.r_vb - 2.5) ** 2, f32(p.cortex_hu * 0.8), f32(p.bone_hu)))
        np.copyto(h, vb_hu, where=vb & body)
        np.copyto(s_, _S["bone"], where=vb & body)
        canal_v = anat.v_vb + anat.r_vb + 9.0
        rc2 = du * du + (v - canal_v) ** 2
        arch = (rc2 < 15.0**2) & (rc2 >= 9.0**2) & (v > anat.v_vb + anat.r_vb - 2)
        spinous = (np.abs(du) < 4.0) & (v > canal_v + 12.0) & (v < canal_v + 40.0) & (depth > p.skin_mm + p.fat_mm)
        post = (arch | spinous) & body
        np.copyto(h, f32(p.cortex_hu * 0.7), where=post)
        np.copyto(s_, _S["bone"], where=post)
        np.copyto(h, f32(15.0), where=(rc2 < 9.0**2) & body)


_ARM_RADIUS_MM = 45.0
_ARM_GAP_MM = 12.0


def _arms(anat: _Anatomy, u: Any, v: Any) -> list[tuple[float, int, Any]]:
    """Arms lying along the body: skin, fat, muscle and the humerus (cortex, marrow), as 2-D masks
    painted in order (each later one over the earlier ones)."""
    p = anat.p
    layers: list[tuple[float, int, Any]] = []
    for side in (-1.0, 1.0):
        cu = anat.mc + side * (anat.A + _ARM_GAP_MM + _ARM_RADIUS_MM * 0.9)
        q = np.sqrt(((u - cu) / (_ARM_RADIUS_MM * 0.9)) ** 2 + ((v - 0.1 * anat.B) / _ARM_RADIUS_MM) ** 2)
        depth = (1.0 - q) * _ARM_RADIUS_MM * 0.95
        rb = np.sqrt((u - cu - side * 4.0) ** 2 + (v - 0.1 * anat.B) ** 2)
        layers += [
            (p.skin_hu, _S["skin"], depth > 0),
            (p.fat_hu, _S["fat"], depth > p.skin_mm),
            (p.muscle_hu, _S["muscle"], depth > p.skin_mm + 0.5 * p.fat_mm + 3.0),
            (p.cortex_hu, _S["bone"], rb < 12.0),
            (p.bone_hu * 0.4, _S["bone"], rb < 8.0),
        ]
    return layers


def _render_tubes(
    tubes: Sequence[_Tube], fine: _Fine, hu: NDArray[np.float32], lung: NDArray[np.bool_], struct: NDArray[np.uint8]
) -> None:
    """Draw each tube with an anti-aliased edge (one pixel wide), blending its HU over what is there.

    A tube thinner than a pixel gets a cone profile whose cross-section integrates to π r² (its
    partial volume), not a one-pixel-wide edge that would make it look as thick as a pixel.
    """
    if not tubes:
        return
    ends = np.array([(*t.a, *t.b, max(t.r0, t.r1)) for t in tubes])
    lo = np.minimum(ends[:, :3], ends[:, 3:6]) - ends[:, 6:7] - fine.h
    hi = np.maximum(ends[:, :3], ends[:, 3:6]) + ends[:, 6:7] + fine.h
    grid_lo = np.array([fine.x[0], fine.y[0], fine.z[0]])
    grid_hi = np.array([fine.x[-1], fine.y[-1], fine.z[-1]])
    keep = np.all((hi >= grid_lo) & (lo <= grid_hi), axis=1) & (ends[:, 6] >= 0.08 * fine.h)
    # index boxes of all tubes at once (fine plane, row, column), as in `_Fine.box`
    k0s = np.searchsorted(fine.z, lo[:, 2])
    k1s = np.searchsorted(fine.z, hi[:, 2], side="right")
    j0s = np.maximum(0, np.floor((lo[:, 1] - fine.y[0]) / fine.h)).astype(int)
    j1s = np.minimum(len(fine.y), np.ceil((hi[:, 1] - fine.y[0]) / fine.h) + 1).astype(int)
    i0s = np.maximum(0, np.floor((lo[:, 0] - fine.x[0]) / fine.h)).astype(int)
    i1s = np.minimum(len(fine.x), np.ceil((hi[:, 0] - fine.x[0]) / fine.h) + 1).astype(int)
    keep &= (k1s > k0s) & (j1s > j0s) & (i1s > i0s)
    half = np.float32(fine.h / 2)
    zf, yf, xf = fine.z.astype(np.float32), fine.y, fine.x
    in_lung_only = {_S["vessel"], _S["airway"]}
    for n in np.nonzero(keep)[0].tolist():
        t = tubes[n]
        a0, a1, a2 = t.a
        ks, js, is_ = slice(k0s[n], k1s[n]), slice(j0s[n], j1s[n]), slice(i0s[n], i1s[n])
        box = (ks, js, is_)
        pz = (zf[ks] - np.float32(a2))[:, None, None]
        py = (yf[js] - np.float32(a1))[None, :, None]
        px = (xf[is_] - np.float32(a0))[None, None, :]
        ab = np.array([t.b[0] - a0, t.b[1] - a1, t.b[2] - a2], dtype=np.float32)
        den = float(ab @ ab) or 1.0
        tt = np.clip((px * ab[0] + py * ab[1] + pz * ab[2]) / den, 0.0, 1.0)
        dx = px - tt * ab[0]
        dy = py - tt * ab[1]
        dz = pz - tt * ab[2]
        dist = np.sqrt(dx * dx + dy * dy + dz * dz)
        radius = t.r0 + tt * (t.r1 - t.r0)
        if max(t.r0, t.r1) >= half:
            occ = np.clip((radius - dist) / fine.h + 0.5, 0.0, 1.0)
        else:
            occ = (3.0 / fine.h**2) * radius * radius * np.clip(1.0 - dist / fine.h, 0.0, 1.0)
        if t.lung_only or not t.central and t.structure in in_lung_only:
            occ = occ * lung[box]  # pulmonary vessels and bronchi stay in the lungs
        if not occ.any():
            continue
        h = hu[box]
        h += occ * (t.hu - h)
        if t.lumen > 0:
            occ_l = np.clip((radius * t.lumen - dist) / fine.h + 0.5, 0.0, 1.0)
            h += occ_l * (AIR_HU - h)
        inside = occ >= 0.5
        struct[box][inside] = t.structure
        if t.central:
            lung[box][inside] = False


def _nodule_occupancy(
    spec: NoduleSpec, fine: _Fine
) -> tuple[tuple[slice, slice, slice], NDArray[np.float32], NDArray[np.float32], NDArray[np.float32]] | None:
    """Occupancy (0..1) of a nodule and of its solid core over its bounding box, and its texture (HU)."""
    c = np.array(spec.center_lps_mm)
    radius = spec.diameter_mm / 2
    amp = sum(abs(lb[0]) for lb in spec.lobes)
    reach = radius * max(spec.axes) * (1 + amp) + 2 * max(fine.h, spec.edge_mm)
    box = fine.box(c - reach, c + reach)
    if box is None:
        return None
    ks, js, is_ = box
    pz = (fine.z[ks] - c[2]).astype(np.float32)[:, None, None]
    py = (fine.y[js] - c[1]).astype(np.float32)[None, :, None]
    px = (fine.x[is_] - c[0]).astype(np.float32)[None, None, :]
    rot = np.array(spec.rotation, dtype=np.float32).reshape(3, 3)
    # coordinates in the ellipsoid frame, scaled by the semi-axes
    q = [(px * rot[0, n] + py * rot[1, n] + pz * rot[2, n]) / np.float32(spec.axes[n] * radius) for n in range(3)]
    rn = np.sqrt(q[0] ** 2 + q[1] ** 2 + q[2] ** 2) + np.float32(1e-6)
    surface = np.ones_like(rn)
    for amp_i, order, ax, ay, az, phase in spec.lobes:
        cosang = np.clip((q[0] * ax + q[1] * ay + q[2] * az) / rn, -1.0, 1.0)
        surface += np.float32(amp_i) * np.cos(np.float32(order) * np.arccos(cosang) + np.float32(phase))
    scale = np.float32(radius / max(fine.h, spec.edge_mm))
    occ = np.clip((surface - rn) * scale + 0.5, 0.0, 1.0)
    core_scale = np.float32(radius / fine.h)
    core = np.clip((surface * spec.core_fraction - rn) * core_scale + 0.5, 0.0, 1.0) if spec.core_fraction > 0 else np.zeros_like(occ)
    texture = np.zeros_like(occ)
    for kx, ky, kz, phase in spec.waves:
        texture += np.sin(px * kx + py * ky + pz * kz + np.float32(phase))
    if spec.waves:
        texture *= np.float32(spec.texture_hu / math.sqrt(len(spec.waves)))
    return box, occ, core, texture


def _render_nodules(
    specs: Sequence[NoduleSpec], fine: _Fine, hu: NDArray[np.float32], lung: NDArray[np.bool_], ids: NDArray[np.uint8], struct: NDArray[np.uint8]
) -> None:
    for n, spec in enumerate(specs, start=1):
        if spec.spicules:
            c = np.array(spec.center_lps_mm)
            radius = spec.diameter_mm / 2
            strands = [
                _Tube(
                    tuple(c + np.array(d) * 0.7 * radius),  # type: ignore[arg-type]
                    tuple(c + np.array(d) * (1.0 + length) * radius),  # type: ignore[arg-type]
                    r, 0.15, spec.hu, _S["spicule"], lung_only=True,
                )
                for *d, length, r in spec.spicules
            ]
            _render_tubes(strands, fine, hu, lung, struct)
        got = _nodule_occupancy(spec, fine)
        if got is None:
            continue
        box, occ, core, texture = got
        occ = occ * lung[box]  # never outside the lung region: the pleura clips a juxtapleural nodule
        core = core * lung[box]
        h = hu[box]
        if spec.kind == "solid":
            h += occ * (spec.hu + texture - h)
        else:
            # ground glass: vessels keep showing through (max), a part-solid core replaces
            h[...] = np.maximum(h, h + occ * (spec.hu + texture - h))
            if spec.kind == "part_solid":
                h += core * (spec.core_hu + 0.3 * texture - h)
        inside = occ >= 0.5
        ids[box][inside] = n
        struct[box][inside] = _S["nodule"]


def render_phantom(params: PhantomParams) -> Phantom:
    """Sample ``params`` on its grid and return the `Phantom`.

    Anatomy, tubes (vessels, airways) and nodules are drawn on planes at most 1.6 mm apart, averaged
    over each slice's thickness (partial volume), then noise and the reconstruction kernel are
    applied. Deterministic in ``params`` (the noise is seeded by ``params.seed``).

    Raises
    ------
    PhantomError
        Internal inconsistency of the slice planes (never expected; the message says so).
    """
    t0 = time.perf_counter()
    p = params
    anat = _Anatomy(p)
    fine = _Fine(p)
    hu = np.empty(fine.shape, dtype=np.float32)
    lung = np.zeros(fine.shape, dtype=bool)
    struct = np.zeros(fine.shape, dtype=np.uint8)
    ids = np.zeros(fine.shape, dtype=np.uint8)
    _render_anatomy(anat, fine, hu, lung, struct)
    _render_tubes(_trees(anat), fine, hu, lung, struct)
    _render_nodules(p.nodules, fine, hu, lung, ids, struct)

    nz, ny, nx = p.shape_zyx
    _average_slices(fine, hu, lung, ids, struct, bool(p.nodules))
    # slice k now sits in plane k of every array (in place, so the peak memory stays the planes')
    hu_s, lung_s, ids_s = hu[:nz], lung[:nz], ids[:nz]
    nod = (ids_s > 0) & lung_s
    labels = np.add(lung_s, nod, dtype=np.uint8)  # 0 background, 1 lung, 2 nodule (nodule ⊂ lung)
    nodule_ids = ids_s * nod if p.nodules else np.zeros_like(labels)
    del nod, lung, ids, lung_s, ids_s
    struct_s = struct[:nz].copy() if struct.shape[0] != nz else struct
    del struct

    hu_i16 = np.empty((nz, ny, nx), dtype=np.int16)
    outside = None
    if p.circular_fov:
        # many scanners reconstruct only the inscribed circle and fill the corners with −1024
        jj = (np.arange(ny) - (ny - 1) / 2) / (ny / 2)
        ii = (np.arange(nx) - (nx - 1) / 2) / (nx / 2)
        outside = jj[:, None] ** 2 + ii[None, :] ** 2 > 1.0
    noise_rng = _rng(p.seed, "noise")
    gain = _noise_gain(p)
    work = np.empty((min(_NOISE_SLAB, nz), ny, nx), dtype=np.float32)
    for k0 in range(0, nz, _NOISE_SLAB):
        slab = hu_s[k0 : k0 + _NOISE_SLAB]
        _add_blur_and_noise(slab, p, work[: slab.shape[0]], noise_rng, gain)
        if outside is not None:
            slab[:, outside] = MIN_HU
        np.clip(slab, MIN_HU, MAX_HU, out=slab)
        np.rint(slab, out=slab)
        hu_i16[k0 : k0 + _NOISE_SLAB] = slab
    del hu, hu_s, work

    affine = p.affine_lps
    inv_aff = np.linalg.inv(affine)
    counts = np.bincount(nodule_ids.ravel(), minlength=len(p.nodules) + 1)
    voxel_ml = p.slice_spacing_mm * p.pixel_spacing_mm**2 / 1000.0
    truths = []
    for n, spec in enumerate(p.nodules, start=1):
        if counts[n] == 0:
            continue
        ijk = inv_aff @ np.array([*spec.center_lps_mm, 1.0])
        truths.append(
            NoduleTruth(
                center_zyx_vox=(float(ijk[2]), float(ijk[1]), float(ijk[0])),
                center_lps_mm=spec.center_lps_mm,
                diameter_mm=spec.diameter_mm,
                kind=spec.kind,
                attached=spec.attached,
                index=n,
                voxel_count=int(counts[n]),
                volume_ml=float(counts[n] * voxel_ml),
                hu=spec.hu,
            )
        )
    return Phantom(
        hu_zyx=hu_i16,
        labels_zyx=labels,
        spacing_mm=p.spacing_mm,
        nodules=tuple(truths),
        params=p,
        seed=p.seed,
        affine_lps=affine,
        nodule_ids_zyx=nodule_ids,
        structures_zyx=np.ascontiguousarray(struct_s),
        slice_thickness_mm=p.slice_thickness_mm,
        seconds=time.perf_counter() - t0,
    )


def _kernel_filter(
    image: NDArray[np.float32], p: PhantomParams, work: NDArray[np.float32] | None, mode: str = "nearest"
) -> NDArray[np.float32]:
    """The reconstruction kernel, in place on ``image`` (in plane): a Gaussian point-spread function,
    then for sharp (lung/bone) kernels an unsharp mask ``(1 + a)·b − a·G_s(b)`` that overshoots edges
    and whitens the noise. ``work`` is a buffer of the same shape for the mask (allocated if None)."""
    sigma_px = p.blur_sigma_mm / p.pixel_spacing_mm
    if sigma_px > 0.05:
        for axis in (1, 2):
            ndimage.gaussian_filter1d(image, sigma_px, axis=axis, output=image, mode=mode, truncate=3.0)
    if p.sharpen > 0:
        s_px = max(p.sharpen_sigma_mm / p.pixel_spacing_mm, 0.3)
        tmp = work if work is not None and work.shape == image.shape else np.empty_like(image)
        ndimage.gaussian_filter1d(image, s_px, axis=1, output=tmp, mode=mode, truncate=3.0)
        ndimage.gaussian_filter1d(tmp, s_px, axis=2, output=tmp, mode=mode, truncate=3.0)
        image *= np.float32(1.0 + p.sharpen)
        tmp *= np.float32(p.sharpen)
        image -= tmp
    return image


def _noise_gain(p: PhantomParams) -> float:
    """Factor by which `_kernel_filter` scales white noise's standard deviation (its kernel's L2 norm,
    measured by filtering an impulse with exactly the same code)."""
    reach = int(3 * (p.blur_sigma_mm + p.sharpen_sigma_mm) / p.pixel_spacing_mm) + 4
    delta = np.zeros((1, 2 * reach + 1, 2 * reach + 1), dtype=np.float32)
    delta[0, reach, reach] = 1.0
    kernel = _kernel_filter(delta, p, None, mode="constant")
    return float(np.sqrt(np.sum(kernel.astype(np.float64) ** 2)))


def _add_blur_and_noise(
    hu: NDArray[np.float32],
    p: PhantomParams,
    work: NDArray[np.float32],
    rng: np.random.Generator,
    gain: float,
) -> NDArray[np.float32]:
    """White noise added to (a slab of) the partial-volume image, then the reconstruction kernel over
    both, in place: the noise becomes correlated (as in filtered back-projection) with the requested
    final std (``gain`` = `_noise_gain`). Everything is in plane, so slabs give the same image as the
    whole volume would. ``work`` is a buffer of ``hu``'s shape (contents discarded)."""
    if p.hu_offset:
        hu += np.float32(p.hu_offset)
    if p.noise_sigma_hu > 0:
        rng.standard_normal(out=work, dtype=np.float32)
        work *= np.float32(p.noise_sigma_hu / gain)
        hu += work
    return _kernel_filter(hu, p, work)


def _average_slices(
    fine: _Fine,
    hu: NDArray[np.float32],
    lung: NDArray[np.bool_],
    ids: NDArray[np.uint8],
    struct: NDArray[np.uint8],
    any_nodule: bool,
) -> None:
    """Average each slice's planes (weights of `_Fine`) into plane ``k`` of the same arrays, in place.

    HU is the weighted mean; lung and nodule labels need at least half the weight (the majority);
    the anatomy name comes from the heaviest plane. Slice k reads planes ≥ start[k] ≥ k only, and no
    later slice reads plane k, so writing plane k in place is safe.
    """
    nz = len(fine.start)
    if np.any(fine.start < np.arange(nz)) or np.any(np.diff(fine.start) < 1):
        # cannot happen with planes no farther apart than the slices; fail loudly rather than mix
        raise PhantomError("internal: slice planes overlap unexpectedly; report the parameters")
    ny, nx = hu.shape[1:]
    has_nodule = ids.reshape(ids.shape[0], -1).max(axis=1) > 0 if any_nodule else np.zeros(ids.shape[0], bool)
    acc = np.empty((ny, nx), dtype=np.float32)
    lung_f = np.empty((ny, nx), dtype=np.float32)
    nod_f = np.empty((ny, nx), dtype=np.float32)
    id_max = np.empty((ny, nx), dtype=np.uint8)
    for k in range(nz):
        weights = fine.weights[k]
        planes = [(float(w), int(fine.start[k]) + i) for i, w in enumerate(weights) if w > 0.0]
        if len(planes) == 1:
            q = planes[0][1]
            if q != k:
                hu[k], lung[k], ids[k], struct[k] = hu[q], lung[q], ids[q], struct[q]
            continue
        acc[...] = 0.0
        lung_f[...] = 0.0
        nod_f[...] = 0.0
        id_max[...] = 0
        for w, q in planes:
            acc += np.float32(w) * hu[q]
            lung_f += np.float32(w) * lung[q]
            if has_nodule[q]:
                nod_f += np.float32(w) * (ids[q] > 0)
                np.maximum(id_max, ids[q], out=id_max)
        heaviest = max(planes)[1]
        hu[k] = acc
        struct[k] = struct[heaviest]
        lung[k] = lung_f >= 0.5
        ids[k] = np.where(nod_f >= 0.5, id_max, 0)


# --------------------------------------------------------------------------------------- public API


def generate_phantom(
    seed: int,
    *,
    shape_zyx: tuple[int, int, int] | None = None,
    spacing_mm: tuple[float, float, float] | None = None,
    nodules: int | None = None,
    slice_thickness_mm: float | None = None,
    max_nodules: int = 5,
    nodule_kinds: Sequence[str] | None = None,
    nodule_attachments: Sequence[str] | None = None,
    nodule_diameter_mm: tuple[float, float] = (3.0, 30.0),
    noise_sigma_hu: float | None = None,
    blur_sigma_mm: float | None = None,
    contrast: bool | None = None,
    params: PhantomParams | None = None,
) -> Phantom:
    """Generate a synthetic chest CT phantom with its labels and nodule truth.

    The keyword arguments fix what would otherwise be drawn from ``seed`` (see
    `sample_phantom_params`, which documents each); ``params`` bypasses sampling entirely (e.g. a
    `dataclasses.replace` of another phantom's parameters). Arrays are ``[k, j, i]`` with k from
    inferior to superior.

    Examples
    --------
    >>> ph = generate_phantom(7, shape_zyx=(64, 128, 128), nodules=2)
    >>> ph.hu_zyx.dtype, ph.labels_zyx.shape
    (dtype('int16'), (64, 128, 128))

    Raises
    ------
    PhantomError
        An argument is out of range.
    """
    if params is None:
        params = sample_phantom_params(
            seed,
            shape_zyx=shape_zyx,
            spacing_mm=spacing_mm,
            slice_thickness_mm=slice_thickness_mm,
            nodules=nodules,
            max_nodules=max_nodules,
            nodule_kinds=nodule_kinds,
            nodule_attachments=nodule_attachments,
            nodule_diameter_mm=nodule_diameter_mm,
            noise_sigma_hu=noise_sigma_hu,
            blur_sigma_mm=blur_sigma_mm,
            contrast=contrast,
        )
    return render_phantom(params)


def write_phantom_series(phantom: Phantom, out_dir: Path, **kwargs: Any) -> list[Path]:
    """Write ``phantom`` as a DICOM CT series; see `models.phantom_dicom.write_phantom_series`."""
    from models.phantom_dicom import write_phantom_series as _write

    return _write(phantom, out_dir, **kwargs)


# --------------------------------------------------------------------------------------------- CLI


def _triple(text: str, kind: type) -> tuple[Any, Any, Any]:
    parts = [kind(v) for v in text.replace("x", ",").split(",")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected three values like 300,512,512, got {text!r}")
    return tuple(parts)  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m models.phantoms",
        description="Generate a synthetic chest CT phantom and write it as a DICOM CT series.",
    )
    parser.add_argument("--seed", type=int, required=True, help="generator seed (same seed, same files)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the series (created)")
    parser.add_argument("--shape", type=lambda t: _triple(t, int), help="slices,rows,columns (e.g. 300,512,512)")
    parser.add_argument("--spacing", type=lambda t: _triple(t, float), help="slice,row,column spacing in mm")
    parser.add_argument("--thickness", type=float, help="slice thickness in mm")
    parser.add_argument("--nodules", type=int, help="exact number of nodules (default: drawn, 0-5)")
    parser.add_argument("--noise", type=float, help="noise standard deviation in HU")
    parser.add_argument(
        "--transfer-syntax",
        default="1.2.840.10008.1.2.1",
        help="transfer syntax UID (Explicit VR LE default; RLE, JPEG 2000 or JPEG-LS lossless)",
    )
    parser.add_argument("--patient-name", default="PHANTOM^CHEST")
    parser.add_argument("--truth", type=Path, help="also write the labels and nodule truth to this .npz file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: generate, write, print one ``key=value`` summary line and one line per nodule."""
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        phantom = generate_phantom(
            args.seed,
            shape_zyx=args.shape,
            spacing_mm=args.spacing,
            slice_thickness_mm=args.thickness,
            nodules=args.nodules,
            noise_sigma_hu=args.noise,
        )
        t1 = time.perf_counter()
        paths = write_phantom_series(
            phantom, args.out, transfer_syntax_uid=args.transfer_syntax, patient_name=args.patient_name
        )
    except ValueError as exc:  # PhantomError (also when this module runs as __main__)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    t2 = time.perf_counter()
    if args.truth is not None:
        args.truth.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            args.truth,
            labels_zyx=phantom.labels_zyx,
            nodule_ids_zyx=phantom.nodule_ids_zyx,
            affine_lps=phantom.affine_lps,
            nodule_centers_lps_mm=np.array([n.center_lps_mm for n in phantom.nodules]).reshape(-1, 3),
            nodule_diameters_mm=np.array([n.diameter_mm for n in phantom.nodules]),
        )
    nz, ny, nx = phantom.shape_zyx
    print(
        f"event=phantom_written seed={args.seed} shape={nz}x{ny}x{nx} "
        f"spacing_mm={','.join(f'{s:.3f}' for s in phantom.spacing_mm)} "
        f"thickness_mm={phantom.slice_thickness_mm:.3f} files={len(paths)} nodules={len(phantom.nodules)} "
        f"generate_seconds={t1 - t0:.2f} write_seconds={t2 - t1:.2f} out={args.out}"
    )
    for n in phantom.nodules:
        x, y, z = n.center_lps_mm
        print(
            f"nodule={n.index} kind={n.kind} attached={n.attached} diameter_mm={n.diameter_mm:.1f} "
            f"volume_ml={n.volume_ml:.3f} center_lps_mm={x:.1f},{y:.1f},{z:.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
