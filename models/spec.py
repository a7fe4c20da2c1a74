"""Model manifest schema (``model.toml``): the declarative description that travels with the weights.

A bundle is a folder holding ``model.toml``, the weights file it names and a model card. This module
parses the manifest strictly into frozen records (an unknown key, a missing key or a value of the wrong
type is a `SpecError` naming the key and the file) and decides, as a pure function, whether a series
suits a model (`ModelSpec.accepts`). It must stay importable without torch, numpy or pydicom: the
receiver routes complete studies with it and never loads torch.

Channel convention shared with `pipeline.infer` and `pipeline.postprocess`: the network's output channel
``c`` is the label whose ``value`` is ``c``; channel 0 is the implicit background and is not listed in
``[[labels]]``.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

MANIFEST_NAME = "model.toml"

#: Architectures `models.networks` can build from a state_dict (kept here so that the receiver can
#: reject a bundle without importing torch; a test keeps it equal to the networks' own list).
KNOWN_ARCHITECTURES: tuple[str, ...] = ("unet3d", "fcn3d")
#: Architectures of a candidate stage's classifier (``[candidates.architecture]``).
KNOWN_CANDIDATE_ARCHITECTURES: tuple[str, ...] = ("patch_classifier3d",)

#: Preprocessing operations `pipeline.preprocess.run_plan` knows (issue 3, item 2).
KNOWN_PREPROCESS_OPS: tuple[str, ...] = (
    "crop_lungs",
    "crop_body",
    "resample",
    "clip",
    "normalize",
    "denoise",
    "contrast_stretch",
    "histogram_equalize",
    "pad_to_multiple",
)

#: The keys each manifest table may hold, as (required, optional). "" is the top level, "labels" each
#: ``[[labels]]`` table, "preprocess" each ``[[preprocess]]`` table (its other keys are the operation's
#: parameters), "code" every coded concept (family, category, type, finding_site, study_finding.code).
#: ``architecture.params`` holds the network's constructor arguments (checked by `models.networks`).
MANIFEST_KEYS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "": (frozenset({"name", "version", "family", "architecture", "weights", "series", "inference",
                    "labels"}),
         frozenset({"description", "preprocess", "segmentation", "study_finding", "outputs", "candidates"})),
    "architecture": (frozenset({"name"}), frozenset({"params"})),
    "weights": (frozenset({"file", "sha256"}), frozenset({"format"})),
    "series": (frozenset({"modality"}),
               frozenset({"body_part", "min_slices", "max_slice_thickness_mm", "image_type_excludes",
                          "series_description_regex"})),
    "preprocess": (frozenset({"op"}), frozenset()),
    "inference": (frozenset({"patch_size_zyx"}),
                  frozenset({"overlap", "batch_size", "gaussian_sigma_scale",
                             "whole_volume_max_voxels", "mirror_axes", "mirror_max_voxels"})),
    "labels": (frozenset({"value", "name", "category", "type", "color_rgb"}),
               frozenset({"threshold", "peak_threshold", "min_size_mm3", "max_findings", "is_finding",
                          "finding_site", "edge_refinement", "edge_margin_mm", "edge_min_probability"})),
    "segmentation": (frozenset(), frozenset({"type"})),
    "study_finding": (frozenset({"name", "code"}), frozenset({"threshold", "source"})),
    "outputs": (frozenset(), frozenset({"seg_series_description", "sr_series_description"})),
    "candidates": (frozenset({"label", "architecture", "weights", "patch_size", "patch_spacing_mm"}),
                   frozenset({"scales_mm", "min_level", "min_response", "max_candidates", "window_hu",
                              "score_bias", "skip_probability", "max_level", "fill_outside_lungs",
                              "axial_turns"})),
    "code": (frozenset({"value", "scheme", "meaning"}), frozenset()),
}

DEFAULT_SR_SERIES_DESCRIPTION = "Measurement report - NOT FOR DIAGNOSTIC USE"
DEFAULT_SEG_SERIES_DESCRIPTION = "Segmentation - NOT FOR DIAGNOSTIC USE"


class ModelError(Exception):
    """Base of the errors of the `models` package."""


class SpecError(ModelError):
    """A manifest that cannot be used: the message names the file, the key and what is expected."""


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------


class FrozenMapping(Mapping[str, Any]):
    """A read-only, hashable mapping for manifest parameters (so that every spec record is hashable).

    Compares equal to any mapping with the same items; values are TOML scalars, tuples or nested
    `FrozenMapping` (see `_freeze`).
    """

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, Any] | None = None) -> None:
        self._items: dict[str, Any] = dict(items or {})

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._items.items())))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._items!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self._items,))


@dataclass(frozen=True, slots=True)
class CodeSpec:
    """A coded concept (SNOMED CT, DCM, ...): value, scheme designator, meaning."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True, slots=True)
class LabelSpec:
    """One output label of a model, as the manifest declares it (``[[labels]]`` in model.toml).

    ``value`` is the label-map value and the network's output channel (≥ 1; 0 is background).
    ``category``/``type`` are the SEG segment's property category and type codes (SNOMED CT, CID 7150
    and CID 7151 families). ``threshold`` is the minimum softmax probability, ``peak_threshold`` the
    probability a connected component must reach somewhere to be kept (hysteresis: its extent still
    comes from ``threshold``; 0 = off), ``min_size_mm3`` the smallest connected component kept,
    ``max_findings`` the most components of a finding label kept per series (the highest-scoring
    ones; 0 = no limit), ``is_finding`` marks labels measured as findings in the SR (TID 1411),
    ``finding_site`` the anatomic site reported with them. ``edge_refinement`` (`EDGE_REFINEMENTS`)
    redraws each kept component's edge on the source image: ``"half_max"`` takes the voxels within
    ``edge_margin_mm`` of it, connected to its confident core (where that reaches the level), whose
    value is at least halfway from the surroundings to the median of the component's voxels standing
    out from them and whose probability is at least ``edge_min_probability``
    (`pipeline.postprocess.refine_edge`).
    """

    value: int
    name: str
    category: CodeSpec
    type: CodeSpec
    color_rgb: tuple[int, int, int]
    threshold: float = 0.5
    peak_threshold: float = 0.0
    min_size_mm3: float = 0.0
    max_findings: int = 0
    is_finding: bool = False
    finding_site: CodeSpec | None = None
    edge_refinement: str = "none"
    edge_margin_mm: float = 3.0
    edge_min_probability: float = 0.2


#: Values of ``[[labels]] edge_refinement``.
EDGE_REFINEMENTS = ("none", "half_max")


@dataclass(frozen=True, slots=True)
class StepSpec:
    """One preprocessing step of the plan (``[[preprocess]]``): operation name and its parameters.

    ``params`` is a read-only mapping; TOML arrays become tuples. Example:
    ``StepSpec("resample", {"spacing_mm": (2.5, 2.5, 2.5)})``.
    """

    op: str
    params: Mapping[str, Any] = field(default_factory=FrozenMapping)


@dataclass(frozen=True, slots=True)
class ArchitectureSpec:
    """``[architecture]``: the network's name in `models.networks` and its constructor parameters."""

    name: str
    params: Mapping[str, Any] = field(default_factory=FrozenMapping)


class WeightsFormat(StrEnum):
    STATE_DICT = "state_dict"
    TORCHSCRIPT = "torchscript"


@dataclass(frozen=True, slots=True)
class WeightsSpec:
    """``[weights]``: file name relative to the bundle, its lowercase hex sha256, and the format."""

    file: str
    sha256: str
    format: WeightsFormat = WeightsFormat.STATE_DICT


@dataclass(frozen=True, slots=True)
class SeriesCriteriaSpec:
    """``[series]``: which series the model analyses (declarative routing criteria).

    ``modality`` are accepted Modality (0008,0060) values; ``body_part`` accepted Body Part Examined
    (0018,0015) values (empty = any; a series without the attribute is accepted, since scanners often
    leave it out); ``min_slices`` the fewest slices; ``max_slice_thickness_mm`` the thickest Slice
    Thickness (0018,0050) accepted (None = any); ``image_type_excludes`` Image Type (0008,0008) values
    that exclude a series (e.g. LOCALIZER); ``series_description_regex`` a regular expression searched
    (case-insensitive) in Series Description (0008,103E), None = any.
    """

    modality: tuple[str, ...] = ("CT",)
    body_part: tuple[str, ...] = ()
    min_slices: int = 1
    max_slice_thickness_mm: float | None = None
    image_type_excludes: tuple[str, ...] = ("LOCALIZER",)
    series_description_regex: str | None = None


@dataclass(frozen=True, slots=True)
class InferenceSpec:
    """``[inference]``: sliding-window parameters.

    ``patch_size_zyx`` the window in voxels (array order), ``overlap`` the fraction of a window shared
    with its neighbour along each axis (0 ≤ overlap < 1), ``batch_size`` windows per forward pass,
    ``gaussian_sigma_scale`` the Gaussian importance map's sigma as a fraction of the window size
    (nnU-Net uses 1/8). ``whole_volume_max_voxels`` > 0 lets a fully convolutional network see a volume
    of at most that many voxels as one window of its own size instead of overlapping windows (on a CPU
    this avoids computing the overlaps again; 0 = always use windows). ``mirror_axes`` (0 = z, 1 = y,
    2 = x) turns on test-time mirroring: each window also runs mirrored along every non-empty subset
    of these axes, and the mirrored-back logits are averaged (2^n forward passes for n axes), for
    volumes of at most ``mirror_max_voxels`` (0 = any size).
    """

    patch_size_zyx: tuple[int, int, int] = (64, 128, 128)
    overlap: float = 0.25
    batch_size: int = 2
    gaussian_sigma_scale: float = 0.125
    whole_volume_max_voxels: int = 0
    mirror_axes: tuple[int, ...] = ()
    mirror_max_voxels: int = 0


class SegmentationType(StrEnum):
    BINARY = "BINARY"
    FRACTIONAL = "FRACTIONAL"


@dataclass(frozen=True, slots=True)
class SegmentationSpec:
    """``[segmentation]``: the SEG's Segmentation Type (PS3.3 C.8.20.2)."""

    type: SegmentationType = SegmentationType.BINARY


class StudyFindingSource(StrEnum):
    HEAD = "head"
    MAX_COMPONENT_SCORE = "max_component_score"


@dataclass(frozen=True, slots=True)
class StudyFindingSpec:
    """``[study_finding]``: the study-level result, e.g. "nodule present".

    ``code`` names the finding in the SR's qualitative evaluation; ``threshold`` applies to the score in
    [0, 1]; ``source`` is ``head`` (sigmoid of the network's classification logit, falling back to the
    largest component score when the network has no head) or ``max_component_score``.
    """

    name: str
    code: CodeSpec
    threshold: float = 0.5
    source: StudyFindingSource = StudyFindingSource.HEAD


@dataclass(frozen=True, slots=True)
class OutputsSpec:
    """``[outputs]``: Series Description (0008,103E) of the SEG and SR series the model produces."""

    seg_series_description: str = DEFAULT_SEG_SERIES_DESCRIPTION
    sr_series_description: str = DEFAULT_SR_SERIES_DESCRIPTION


@dataclass(frozen=True, slots=True)
class CandidateStageSpec:
    """``[candidates]``: a second look at the lungs where the network found nothing
    (`pipeline.candidates`).

    Blob candidates on the network's input grid (Hessian dot filter at ``scales_mm``, smoothed input
    ≥ ``min_level`` and response ≥ ``min_response``, in the network input's units; at most
    ``max_candidates``, strongest first; none where the network's probability of ``label`` reaches
    ``skip_probability``) → a ``patch_size``³ cube at ``patch_spacing_mm`` from the source image,
    windowed to ``window_hu`` → the classifier (``architecture``, ``weights``) →
    ``sigmoid(logit + score_bias)`` → a ball in ``label``'s probability channel on the source grid.
    Before filtering, the input may be clipped to ``max_level`` and filled with the lungs' median
    outside them (``fill_outside_lungs``). The classifier may see each cube in ``axial_turns`` (1, 2 or
    4) turns in the axial plane, its logits averaged.
    """

    label: int
    architecture: ArchitectureSpec
    weights: WeightsSpec
    patch_size: int
    patch_spacing_mm: float
    scales_mm: tuple[float, ...] = (2.0, 3.0, 4.0, 6.0)
    min_level: float = 0.12
    min_response: float = 0.005
    max_candidates: int = 120
    window_hu: tuple[float, float] = (-1000.0, 400.0)
    score_bias: float = 0.0
    skip_probability: float = 0.5
    max_level: float | None = None
    fill_outside_lungs: bool = False
    axial_turns: int = 1


@dataclass(frozen=True, slots=True)
class SeriesCandidate:
    """What routing knows of a series from its headers, without pixels.

    ``slice_thickness_mm`` None when the attribute is missing; ``image_type`` the Image Type values
    (upper case); ``body_part`` and ``series_description`` empty when missing.
    """

    modality: str
    body_part: str = ""
    slice_count: int = 0
    slice_thickness_mm: float | None = None
    image_type: tuple[str, ...] = ()
    series_description: str = ""


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A parsed ``model.toml``: everything the pipeline needs to run a model, apart from the weights.

    ``bundle_dir`` is the folder holding the manifest; ``weights_path`` the absolute weights file.
    """

    name: str
    version: str
    description: str
    family: CodeSpec
    architecture: ArchitectureSpec
    weights: WeightsSpec
    series: SeriesCriteriaSpec
    preprocess: tuple[StepSpec, ...]
    inference: InferenceSpec
    labels: tuple[LabelSpec, ...]
    segmentation: SegmentationSpec
    study_finding: StudyFindingSpec | None
    outputs: OutputsSpec
    bundle_dir: Path
    candidates: CandidateStageSpec | None = None

    @property
    def weights_path(self) -> Path:
        return self.bundle_dir / self.weights.file

    @property
    def out_channels(self) -> int:
        """Output channels the network must produce: background plus the highest label value."""
        return max(label.value for label in self.labels) + 1

    def label(self, value: int) -> LabelSpec:
        for label in self.labels:
            if label.value == value:
                return label
        raise KeyError(f"model {self.name} has no label {value}")

    def accepts(self, candidate: SeriesCandidate) -> tuple[bool, str]:
        """Whether this model analyses the series; see `accepts`."""
        return accepts(self.series, candidate)


# --------------------------------------------------------------------------------------------------
# Routing (pure)
# --------------------------------------------------------------------------------------------------


def accepts(criteria: SeriesCriteriaSpec, candidate: SeriesCandidate) -> tuple[bool, str]:
    """Decide whether a series meets a model's series criteria.

    Parameters
    ----------
    criteria
        The model's ``[series]`` criteria.
    candidate
        Header summary of the series.

    Returns
    -------
    tuple[bool, str]
        ``(True, "accepted")``, or ``(False, reason)`` with a short reason naming the attribute that
        failed, e.g. ``"modality MR not in CT"``. Never includes patient data.
    """
    modality = candidate.modality.strip().upper()
    if modality not in criteria.modality:
        return False, f"modality {modality or '(missing)'} not in {'/'.join(criteria.modality)}"
    body_part = candidate.body_part.strip().upper()
    if criteria.body_part and body_part and body_part not in criteria.body_part:
        return False, f"body part {body_part} not in {'/'.join(criteria.body_part)}"
    if candidate.slice_count < criteria.min_slices:
        return False, f"{candidate.slice_count} slices, fewer than {criteria.min_slices}"
    thickness = candidate.slice_thickness_mm
    limit = criteria.max_slice_thickness_mm
    if limit is not None and thickness is not None and thickness > limit + 1e-6:
        return False, f"slice thickness {thickness:g} mm above {limit:g} mm"
    image_type = {value.strip().upper() for value in candidate.image_type}
    excluded = sorted(image_type.intersection(criteria.image_type_excludes))
    if excluded:
        return False, f"image type {'/'.join(excluded)} excluded"
    regex = criteria.series_description_regex
    if regex is not None and re.search(regex, candidate.series_description, re.IGNORECASE) is None:
        return False, "series description does not match the model's pattern"
    return True, "accepted"


# --------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------


def load_spec(path: Path) -> ModelSpec:
    """Read and validate a manifest.

    Parameters
    ----------
    path
        A bundle folder or its ``model.toml``.

    Raises
    ------
    SpecError
        Missing or unreadable file, invalid TOML, unknown/missing keys, wrong types or values.
    """
    path = Path(path)
    manifest = path / MANIFEST_NAME if path.is_dir() else path
    try:
        with manifest.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise SpecError(f"{manifest}: no {MANIFEST_NAME} in the bundle") from None
    except OSError as exc:
        raise SpecError(f"{manifest}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{manifest}: invalid TOML: {exc}") from None
    return parse_spec(data, bundle_dir=manifest.parent, source=str(manifest))


def parse_spec(data: Mapping[str, Any], *, bundle_dir: Path, source: str = MANIFEST_NAME) -> ModelSpec:
    """Validate a manifest already read as a mapping (see `load_spec`).

    Raises
    ------
    SpecError
        Naming ``source`` and the dotted key that is wrong.
    """
    p = _Parser(source)
    top = p.table(data, "", section="")
    name = p.string(top, "name")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        p.fail("name", "must be letters, digits, '_', '-' or '.' (it names the model in logs and CLIs)")
    version = p.string(top, "version")
    description = p.string(top, "description", default="")
    family = p.code(top["family"], "family")
    weights = _parse_weights(p, top["weights"])
    architecture = _parse_architecture(p, top["architecture"],
                                       buildable=weights.format is WeightsFormat.STATE_DICT)
    series = _parse_series(p, top["series"])
    preprocess = _parse_preprocess(p, top.get("preprocess", []))
    inference = _parse_inference(p, top["inference"])
    labels = _parse_labels(p, top["labels"])
    segmentation = _parse_segmentation(p, top.get("segmentation", {}))
    study_finding = (_parse_study_finding(p, top["study_finding"]) if "study_finding" in top else None)
    outputs = _parse_outputs(p, top.get("outputs", {}))
    candidates = _parse_candidates(p, top["candidates"], labels) if "candidates" in top else None
    out_channels = architecture.params.get("out_channels")
    expected = max(label.value for label in labels) + 1
    if out_channels is not None and out_channels != expected:
        p.fail("architecture.params.out_channels",
               f"is {out_channels} but the labels need {expected} (background + label values)")
    return ModelSpec(name=name, version=version, description=description, family=family,
                     architecture=architecture, weights=weights, series=series,
                     preprocess=preprocess, inference=inference, labels=labels,
                     segmentation=segmentation, study_finding=study_finding, outputs=outputs,
                     bundle_dir=Path(bundle_dir), candidates=candidates)


def _parse_architecture(p: _Parser, raw: Any, *, buildable: bool, key: str = "architecture",
                        known: tuple[str, ...] = KNOWN_ARCHITECTURES) -> ArchitectureSpec:
    """``buildable``: state_dict weights need one of the ``known`` networks; TorchScript carries its own."""
    t = p.table(raw, key, section="architecture")
    name = p.string(t, "name", prefix=key)
    if buildable and name not in known:
        p.fail(f"{key}.name", f"{name!r} is unknown; use one of {', '.join(known)}")
    params = p.table(t.get("params", {}), f"{key}.params", open_keys=True)
    return ArchitectureSpec(name=name, params=_freeze(params))


def _parse_weights(p: _Parser, raw: Any, *, key: str = "weights") -> WeightsSpec:
    t = p.table(raw, key, section="weights")
    file = p.string(t, "file", prefix=key)
    if Path(file).is_absolute() or ".." in Path(file).parts:
        p.fail(f"{key}.file", "must be a file name inside the bundle folder")
    sha256 = p.string(t, "sha256", prefix=key).lower()
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        p.fail(f"{key}.sha256", "must be 64 hexadecimal digits")
    fmt = p.enum(t, "format", WeightsFormat, prefix=key, default=WeightsFormat.STATE_DICT)
    return WeightsSpec(file=file, sha256=sha256, format=fmt)


def _parse_candidates(p: _Parser, raw: Any, labels: tuple[LabelSpec, ...]) -> CandidateStageSpec:
    t = p.table(raw, "candidates", section="candidates")
    label = p.integer(t, "label", prefix="candidates", minimum=1)
    if label not in {spec.value for spec in labels}:
        p.fail("candidates.label", f"is {label}, which no [[labels]] table declares")
    architecture = _parse_architecture(p, t["architecture"], buildable=True, key="candidates.architecture",
                                       known=KNOWN_CANDIDATE_ARCHITECTURES)
    weights = _parse_weights(p, t["weights"], key="candidates.weights")
    if weights.format is not WeightsFormat.STATE_DICT:
        p.fail("candidates.weights.format", "must be 'state_dict' (the classifier is built from its architecture)")
    scales = t.get("scales_mm", [2.0, 3.0, 4.0, 6.0])
    if (not isinstance(scales, list) or not scales
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in scales)):
        p.fail("candidates.scales_mm", "must be a non-empty list of positive numbers (mm)")
    window = t.get("window_hu", [-1000.0, 400.0])
    if (not isinstance(window, list) or len(window) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in window)
            or not window[0] < window[1]):
        p.fail("candidates.window_hu", "must be [low, high] HU with low < high")
    skip = p.number(t, "skip_probability", prefix="candidates", default=0.5, positive=True)
    if skip > 1.0:
        p.fail("candidates.skip_probability", "must be in (0, 1]")
    min_level = p.number(t, "min_level", prefix="candidates", default=0.12)
    turns = p.integer(t, "axial_turns", prefix="candidates", default=1, minimum=1, maximum=4)
    if turns not in (1, 2, 4):
        p.fail("candidates.axial_turns", f"is {turns}, which must be 1, 2 or 4")
    max_level = p.number(t, "max_level", prefix="candidates", default=None)
    if max_level is not None and not max_level > min_level:
        p.fail("candidates.max_level", f"is {max_level}, which must be above min_level ({min_level})")
    return CandidateStageSpec(
        label=label,
        architecture=architecture,
        weights=weights,
        patch_size=p.integer(t, "patch_size", prefix="candidates", minimum=4, maximum=128),
        patch_spacing_mm=p.number(t, "patch_spacing_mm", prefix="candidates", positive=True),
        scales_mm=tuple(float(v) for v in scales),
        min_level=min_level,
        min_response=p.number(t, "min_response", prefix="candidates", default=0.005, minimum=0.0),
        max_candidates=p.integer(t, "max_candidates", prefix="candidates", default=120, minimum=0,
                                 maximum=10000),
        window_hu=(float(window[0]), float(window[1])),
        score_bias=p.number(t, "score_bias", prefix="candidates", default=0.0),
        skip_probability=skip,
        max_level=max_level,
        fill_outside_lungs=p.boolean(t, "fill_outside_lungs", prefix="candidates", default=False),
        axial_turns=turns,
    )


def _parse_series(p: _Parser, raw: Any) -> SeriesCriteriaSpec:
    t = p.table(raw, "series", section="series")
    modality = tuple(v.upper() for v in p.strings(t, "modality", prefix="series"))
    body_part = tuple(v.upper() for v in p.strings(t, "body_part", prefix="series", default=()))
    min_slices = p.integer(t, "min_slices", prefix="series", default=1, minimum=1)
    thickness = p.number(t, "max_slice_thickness_mm", prefix="series", default=None, positive=True)
    excludes = tuple(v.upper() for v in p.strings(t, "image_type_excludes", prefix="series",
                                                  default=("LOCALIZER",)))
    regex = p.string(t, "series_description_regex", prefix="series", default=None)
    if regex is not None:
        try:
            re.compile(regex)
        except re.error as exc:
            p.fail("series.series_description_regex", f"is not a valid regular expression: {exc}")
    return SeriesCriteriaSpec(modality=modality, body_part=body_part, min_slices=min_slices,
                              max_slice_thickness_mm=thickness, image_type_excludes=excludes,
                              series_description_regex=regex)


def _parse_preprocess(p: _Parser, raw: Any) -> tuple[StepSpec, ...]:
    if not isinstance(raw, list):
        p.fail("preprocess", "must be an array of tables ([[preprocess]])")
    steps = []
    for n, item in enumerate(raw):
        key = f"preprocess[{n}]"
        t = p.table(item, key, section="preprocess", open_keys=True)
        op = p.string(t, "op", prefix=key)
        if op not in KNOWN_PREPROCESS_OPS:
            p.fail(f"{key}.op", f"{op!r} is unknown; use one of {', '.join(KNOWN_PREPROCESS_OPS)}")
        params = {k: v for k, v in t.items() if k != "op"}
        steps.append(StepSpec(op=op, params=_freeze(params)))
    return tuple(steps)


def _parse_inference(p: _Parser, raw: Any) -> InferenceSpec:
    t = p.table(raw, "inference", section="inference")
    patch = t["patch_size_zyx"]
    if (not isinstance(patch, list) or len(patch) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in patch)):
        p.fail("inference.patch_size_zyx", "must be three positive integers [z, y, x]")
    overlap = p.number(t, "overlap", prefix="inference", default=0.25)
    if not 0.0 <= overlap < 1.0:
        p.fail("inference.overlap", "must be in [0, 1)")
    batch = p.integer(t, "batch_size", prefix="inference", default=2, minimum=1)
    sigma = p.number(t, "gaussian_sigma_scale", prefix="inference", default=0.125, positive=True)
    whole = p.integer(t, "whole_volume_max_voxels", prefix="inference", default=0, minimum=0)
    mirror = t.get("mirror_axes", [])
    if (not isinstance(mirror, list) or len(set(mirror)) != len(mirror)
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 2 for v in mirror)):
        p.fail("inference.mirror_axes", "must be a list of distinct axes among 0 (z), 1 (y), 2 (x)")
    return InferenceSpec(patch_size_zyx=(patch[0], patch[1], patch[2]), overlap=overlap,
                         batch_size=batch, gaussian_sigma_scale=sigma, whole_volume_max_voxels=whole,
                         mirror_axes=tuple(sorted(mirror)),
                         mirror_max_voxels=p.integer(t, "mirror_max_voxels", prefix="inference", default=0,
                                                     minimum=0))


def _parse_labels(p: _Parser, raw: Any) -> tuple[LabelSpec, ...]:
    if not isinstance(raw, list) or not raw:
        p.fail("labels", "must be a non-empty array of tables ([[labels]]); background is implicit")
    labels: list[LabelSpec] = []
    for n, item in enumerate(raw):
        key = f"labels[{n}]"
        t = p.table(item, key, section="labels")
        value = p.integer(t, "value", prefix=key, minimum=1, maximum=255)
        color = t["color_rgb"]
        if (not isinstance(color, list) or len(color) != 3
                or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255
                           for c in color)):
            p.fail(f"{key}.color_rgb", "must be three integers 0-255")
        threshold = p.number(t, "threshold", prefix=key, default=0.5)
        if not 0.0 <= threshold <= 1.0:
            p.fail(f"{key}.threshold", "must be in [0, 1]")
        peak = p.number(t, "peak_threshold", prefix=key, default=0.0)
        if not 0.0 <= peak <= 1.0:
            p.fail(f"{key}.peak_threshold", "must be in [0, 1]")
        refinement = p.string(t, "edge_refinement", prefix=key, default="none")
        if refinement not in EDGE_REFINEMENTS:
            p.fail(f"{key}.edge_refinement", f"must be one of {', '.join(EDGE_REFINEMENTS)}, got {refinement!r}")
        edge_probability = p.number(t, "edge_min_probability", prefix=key, default=0.2)
        if not 0.0 <= edge_probability <= 1.0:
            p.fail(f"{key}.edge_min_probability", "must be in [0, 1]")
        labels.append(LabelSpec(
            value=value,
            name=p.string(t, "name", prefix=key),
            category=p.code(t["category"], f"{key}.category"),
            type=p.code(t["type"], f"{key}.type"),
            color_rgb=(color[0], color[1], color[2]),
            threshold=threshold,
            peak_threshold=peak,
            min_size_mm3=p.number(t, "min_size_mm3", prefix=key, default=0.0, minimum=0.0),
            max_findings=int(p.number(t, "max_findings", prefix=key, default=0, minimum=0)),
            is_finding=p.boolean(t, "is_finding", prefix=key, default=False),
            finding_site=(p.code(t["finding_site"], f"{key}.finding_site")
                          if "finding_site" in t else None),
            edge_refinement=refinement,
            edge_margin_mm=p.number(t, "edge_margin_mm", prefix=key, default=3.0, minimum=0.0),
            edge_min_probability=edge_probability,
        ))
    values = [label.value for label in labels]
    if len(set(values)) != len(values):
        p.fail("labels", f"label values must be unique, got {values}")
    names = [label.name for label in labels]
    if len(set(names)) != len(names):
        p.fail("labels", f"label names must be unique, got {names}")
    return tuple(sorted(labels, key=lambda label: label.value))


def _parse_segmentation(p: _Parser, raw: Any) -> SegmentationSpec:
    t = p.table(raw, "segmentation", section="segmentation")
    return SegmentationSpec(type=p.enum(t, "type", SegmentationType, prefix="segmentation",
                                        default=SegmentationType.BINARY))


def _parse_study_finding(p: _Parser, raw: Any) -> StudyFindingSpec:
    t = p.table(raw, "study_finding", section="study_finding")
    threshold = p.number(t, "threshold", prefix="study_finding", default=0.5)
    if not 0.0 <= threshold <= 1.0:
        p.fail("study_finding.threshold", "must be in [0, 1]")
    return StudyFindingSpec(
        name=p.string(t, "name", prefix="study_finding"),
        code=p.code(t["code"], "study_finding.code"),
        threshold=threshold,
        source=p.enum(t, "source", StudyFindingSource, prefix="study_finding",
                      default=StudyFindingSource.HEAD),
    )


def _parse_outputs(p: _Parser, raw: Any) -> OutputsSpec:
    t = p.table(raw, "outputs", section="outputs")
    seg = p.string(t, "seg_series_description", prefix="outputs",
                   default=DEFAULT_SEG_SERIES_DESCRIPTION)
    sr = p.string(t, "sr_series_description", prefix="outputs", default=DEFAULT_SR_SERIES_DESCRIPTION)
    for key, value in (("seg_series_description", seg), ("sr_series_description", sr)):
        if not value or len(value) > 64:  # LO value representation: at most 64 characters
            p.fail(f"outputs.{key}", "must be 1 to 64 characters (VR LO)")
    return OutputsSpec(seg_series_description=seg, sr_series_description=sr)


def _freeze(value: Any) -> Any:
    """Make TOML values immutable and hashable: tables → `FrozenMapping`, arrays → tuples."""
    if isinstance(value, dict):
        return FrozenMapping({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


_MISSING: Any = object()


class _Parser:
    """Typed accessors that raise `SpecError` naming the manifest and the dotted key."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, message: str) -> None:
        raise SpecError(f"{self.source}: {key} {message}")

    def table(self, raw: Any, key: str, *, section: str | None = None,
              open_keys: bool = False) -> dict[str, Any]:
        required, optional = MANIFEST_KEYS[section] if section is not None else (frozenset(), frozenset())
        where = key or "top level"
        if not isinstance(raw, dict):
            self.fail(where, "must be a table")
        prefix = f"{key}." if key else ""
        if not open_keys:
            unknown = sorted(set(raw) - set(required) - set(optional))
            if unknown:
                allowed = ", ".join(sorted(set(required) | set(optional)))
                raise SpecError(f"{self.source}: unknown key {prefix}{unknown[0]} "
                                f"(allowed in {where}: {allowed})")
        missing = sorted(set(required) - set(raw))
        if missing:
            raise SpecError(f"{self.source}: missing key {prefix}{missing[0]}")
        return raw

    def _get(self, t: dict[str, Any], key: str, default: Any) -> Any:
        if key in t:
            return t[key]
        return default

    def string(self, t: dict[str, Any], key: str, *, prefix: str = "", default: Any = _MISSING) -> Any:
        value = self._get(t, key, default)
        if value is _MISSING or (value is not default and not isinstance(value, str)):
            self.fail(_dotted(prefix, key), "must be a string")
        return value

    def strings(self, t: dict[str, Any], key: str, *, prefix: str = "",
                default: Any = _MISSING) -> tuple[str, ...]:
        value = self._get(t, key, default)
        if value is default and value is not _MISSING:
            return tuple(value)
        if isinstance(value, str):
            return (value,)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.fail(_dotted(prefix, key), "must be a string or an array of strings")
        return tuple(value)

    def integer(self, t: dict[str, Any], key: str, *, prefix: str = "", default: Any = _MISSING,
                minimum: int | None = None, maximum: int | None = None) -> Any:
        value = self._get(t, key, default)
        if value is default and value is not _MISSING:
            return value
        if not isinstance(value, int) or isinstance(value, bool):
            self.fail(_dotted(prefix, key), "must be an integer")
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            self.fail(_dotted(prefix, key), f"must be in [{minimum}, {maximum}], got {value}")
        return value

    def number(self, t: dict[str, Any], key: str, *, prefix: str = "", default: Any = _MISSING,
               minimum: float | None = None, positive: bool = False) -> Any:
        value = self._get(t, key, default)
        if value is default and value is not _MISSING:
            return value
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            self.fail(_dotted(prefix, key), "must be a finite number")
        if positive and value <= 0:
            self.fail(_dotted(prefix, key), "must be positive")
        if minimum is not None and value < minimum:
            self.fail(_dotted(prefix, key), f"must be at least {minimum}")
        return float(value)

    def boolean(self, t: dict[str, Any], key: str, *, prefix: str = "", default: Any = _MISSING) -> Any:
        value = self._get(t, key, default)
        if not isinstance(value, bool):
            self.fail(_dotted(prefix, key), "must be true or false")
        return value

    def enum(self, t: dict[str, Any], key: str, enum: type[StrEnum], *, prefix: str = "",
             default: Any = _MISSING) -> Any:
        value = self._get(t, key, default)
        if value is default and value is not _MISSING:
            return value
        try:
            return enum(value)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in enum)
            self.fail(_dotted(prefix, key), f"must be one of {allowed}, got {value!r}")

    def code(self, raw: Any, key: str) -> CodeSpec:
        t = self.table(raw, key, section="code")
        return CodeSpec(value=self.string(t, "value", prefix=key),
                        scheme=self.string(t, "scheme", prefix=key),
                        meaning=self.string(t, "meaning", prefix=key))


def _dotted(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key
