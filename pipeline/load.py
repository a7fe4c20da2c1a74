"""Load one DICOM series into a volume with exact geometry and per-slice source references.

`group_series` sorts files and folders into series by reading headers only; `load_series` turns one
series' files into a `SourceSeries`: the volume in Hounsfield units (float32, array ``[k, j, i]``, slices
ascending along the slice normal), the LPS affine built from Image Position (Patient), Image Orientation
(Patient) and Pixel Spacing, the source instance/frame of every slice, and the instances' headers for the
SEG/SR encoders. Single-frame images (CT Image Storage and the like) and enhanced multi-frame images
(per-frame functional groups, PS3.3 C.7.6.16) are both accepted, in any file order and any transfer
syntax pydicom can decode (pylibjpeg for JPEG, JPEG-LS, JPEG 2000 and RLE).

Anything that makes the series unusable raises `InputRejectedError` with a reason code; anything that is
set aside (a localizer, an identical duplicate) is written into ``SourceSeries.notes``. Nothing is
dropped silently. This module must not touch SQLite, the network or torch, and never resamples: a
tilted or gappy series is rejected, not repaired.

Reason codes raised here: ``unreadable_file``, ``mixed_series``, ``missing_frame_of_reference``,
``mixed_frame_of_reference``, ``no_pixel_data``, ``unsupported_pixel_format``,
``unsupported_multiframe``, ``undecodable_pixel_data``, ``missing_geometry``, ``mixed_orientations``,
``mixed_image_sizes``, ``too_few_slices``, ``conflicting_duplicates``, ``gantry_tilt``,
``inconsistent_positions``, ``missing_slices``, ``irregular_spacing``. An operating-system error while
reading raises `TransientPipelineError` instead (retried).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import pixel_array

from pipeline.errors import InputRejectedError, TransientPipelineError
from pipeline.types import SourceFrame, SourceSeries, Volume

logger = logging.getLogger(__name__)

#: Elements longer than this are read from the file only when used, so the encoded pixel data of all
#: instances is never in memory at once; `_header` reads every other deferred element in.
_DEFER_BYTES = 64 * 1024

#: Image Orientation (Patient) cosines that differ by at most this are the same orientation (≈0.06°).
_ORIENTATION_TOLERANCE = 1e-3

#: Pixel Spacing values (mm) that differ by at most this are the same spacing.
_PIXEL_SPACING_TOLERANCE_MM = 1e-4

#: Images in a minority orientation/size group of at most this many images count as localizers
#: (scanners store one to three scout views: AP, lateral, and sometimes a second AP).
_MAX_LOCALIZER_IMAGES = 3

#: Slice positions closer than this along the normal are the same slice (mm).
_DUPLICATE_TOLERANCE_MM = 0.01

#: A slice may sit at most this fraction of the smallest pixel spacing away from the line through the
#: first slice along the normal; beyond it, the series is tilted or inconsistent (a voxel would move).
_MAX_IN_PLANE_SHIFT_FRACTION = 0.5

#: The slope (degrees) of the in-plane drift above which the shift is reported as gantry tilt.
_TILT_REPORT_DEGREES = 0.1

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


@dataclass(slots=True)
class _Frame:
    """One 2-D image found in the input: an instance's only frame or one frame of a multi-frame."""

    order: int
    instance: int
    frame_number: int | None
    sop_instance_uid: str
    sop_class_uid: str
    rows: int
    columns: int
    is_localizer: bool
    position: NDArray[np.float64] | None = None
    orientation: NDArray[np.float64] | None = None
    pixel_spacing: tuple[float, float] | None = None
    slope: float = 1.0
    intercept: float = 0.0


def _expand(paths: Iterable[Path]) -> list[Path]:
    """Files given directly, and every file under the folders given (recursive, sorted)."""
    return [path for path, _ in _expand_marked(paths)]


def _expand_marked(paths: Iterable[Path]) -> list[tuple[Path, bool]]:
    """Like `_expand`, each file marked True when it was found inside a folder (not named itself)."""
    files: list[tuple[Path, bool]] = []
    seen: set[Path] = set()
    for raw in paths:
        path = Path(raw)
        in_folder = path.is_dir()
        found = sorted(p for p in path.rglob("*") if p.is_file()) if in_folder else [path]
        for file in found:
            key = file.resolve()
            if key not in seen:
                seen.add(key)
                files.append((file, in_folder))
    return files


def group_series(paths: Iterable[Path]) -> dict[str, list[Path]]:
    """Group DICOM files by Series Instance UID (0020,000E), reading headers only.

    Parameters
    ----------
    paths
        Files and/or folders; folders are searched recursively.

    Returns
    -------
    dict
        Series Instance UID → the series' files, in sorted path order. Files that are not DICOM (no
        ``DICM`` preamble, unreadable) or carry no Series Instance UID (a DICOMDIR) are left out with a
        debug log line.
    """
    groups: dict[str, list[Path]] = {}
    for path in _expand(paths):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
            logger.debug("event=file_ignored reason=not_dicom error=%s", type(exc).__name__)
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not uid:
            logger.debug("event=file_ignored reason=no_series_instance_uid")
            continue
        groups.setdefault(uid, []).append(path)
    return groups


def _first_item(*sequences: Any) -> Dataset | None:
    for seq in sequences:
        if seq is not None and len(seq) > 0:
            item: Dataset = seq[0]
            return item
    return None


def _functional_group(per_frame: Dataset | None, shared: Dataset | None, keyword: str) -> Dataset | None:
    """The item of a functional group macro for one frame: per-frame wins over shared (PS3.3 C.7.6.16)."""
    for group in (per_frame, shared):
        if group is not None and keyword in group:
            return _first_item(group[keyword].value)
    return None


def _floats(value: Any, count: int) -> NDArray[np.float64] | None:
    if value is None:
        return None
    try:
        numbers = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return numbers if numbers.shape == (count,) and np.all(np.isfinite(numbers)) else None


def _spacing(value: Any) -> tuple[float, float] | None:
    numbers = _floats(value, 2)
    if numbers is None or np.any(numbers <= 0):
        return None
    return (float(numbers[0]), float(numbers[1]))


def _is_localizer(image_type: Any) -> bool:
    if image_type is None:
        return False
    values = [image_type] if isinstance(image_type, str) else list(image_type)
    return any(str(v).strip().upper() == "LOCALIZER" for v in values)


def _frames_of(ds: Dataset, instance: int, start: int) -> list[_Frame]:
    """The 2-D frames of one instance with their geometry and rescale (stored value → HU)."""
    sop_uid = str(ds.get("SOPInstanceUID", ""))
    sop_class = str(ds.get("SOPClassUID", ""))
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    top_slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    top_intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    top_localizer = _is_localizer(ds.get("ImageType"))
    enhanced = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds

    if not enhanced:
        if n_frames > 1:
            raise InputRejectedError(
                "unsupported_multiframe",
                f"an instance holds {n_frames} frames without per-frame functional groups, so the "
                "frames have no positions; send single-frame or enhanced multi-frame images",
            )
        return [
            _Frame(
                order=start,
                instance=instance,
                frame_number=None,
                sop_instance_uid=sop_uid,
                sop_class_uid=sop_class,
                rows=rows,
                columns=columns,
                is_localizer=top_localizer,
                position=_floats(ds.get("ImagePositionPatient"), 3),
                orientation=_floats(ds.get("ImageOrientationPatient"), 6),
                pixel_spacing=_spacing(ds.get("PixelSpacing")),
                slope=top_slope,
                intercept=top_intercept,
            )
        ]

    shared = _first_item(ds.get("SharedFunctionalGroupsSequence"))
    per_frame_seq = ds.get("PerFrameFunctionalGroupsSequence") or []
    frames: list[_Frame] = []
    for f in range(n_frames):
        per_frame = per_frame_seq[f] if f < len(per_frame_seq) else None
        position = _functional_group(per_frame, shared, "PlanePositionSequence")
        orientation = _functional_group(per_frame, shared, "PlaneOrientationSequence")
        measures = _functional_group(per_frame, shared, "PixelMeasuresSequence")
        transform = _functional_group(per_frame, shared, "PixelValueTransformationSequence")
        frame_type = _functional_group(per_frame, shared, "CTImageFrameTypeSequence")
        slope, intercept = top_slope, top_intercept
        if transform is not None:
            slope = float(transform.get("RescaleSlope", slope) or slope)
            intercept = float(transform.get("RescaleIntercept", intercept) or intercept)
        localizer = top_localizer or (
            frame_type is not None and _is_localizer(frame_type.get("FrameType"))
        )
        frames.append(
            _Frame(
                order=start + f,
                instance=instance,
                frame_number=f + 1,
                sop_instance_uid=sop_uid,
                sop_class_uid=sop_class,
                rows=rows,
                columns=columns,
                is_localizer=localizer,
                position=None if position is None else _floats(position.get("ImagePositionPatient"), 3),
                orientation=None
                if orientation is None
                else _floats(orientation.get("ImageOrientationPatient"), 6),
                pixel_spacing=None if measures is None else _spacing(measures.get("PixelSpacing")),
                slope=slope,
                intercept=intercept,
            )
        )
    return frames


def _same_plane_kind(a: _Frame, b: _Frame) -> bool:
    return bool(np.max(np.abs(_orientation(a) - _orientation(b))) <= _ORIENTATION_TOLERANCE)


def _same_grid(a: _Frame, b: _Frame) -> bool:
    if (a.rows, a.columns) != (b.rows, b.columns):
        return False
    return all(
        abs(x - y) <= _PIXEL_SPACING_TOLERANCE_MM for x, y in zip(_pixel_spacing(a), _pixel_spacing(b))
    )


def _missing_geometry() -> InputRejectedError:
    return InputRejectedError(
        "missing_geometry",
        "an image lacks Image Position (Patient), Image Orientation (Patient) or Pixel "
        "Spacing (or their functional groups), so it cannot be placed in space",
    )


def _position(frame: _Frame) -> NDArray[np.float64]:
    if frame.position is None:
        raise _missing_geometry()
    return frame.position


def _orientation(frame: _Frame) -> NDArray[np.float64]:
    if frame.orientation is None:
        raise _missing_geometry()
    return frame.orientation


def _pixel_spacing(frame: _Frame) -> tuple[float, float]:
    if frame.pixel_spacing is None:
        raise _missing_geometry()
    return frame.pixel_spacing


def _decode(ds: Dataset) -> NDArray[Any]:
    """Decode the stored values; a corrupt or undecodable pixel stream is a permanent rejection.

    pydicom raises ValueError for pixel data shorter than Rows × Columns × frames and RuntimeError when
    every decoder plugin failed (a corrupt JPEG stream) or none supports the transfer syntax.
    """
    try:
        return pixel_array(ds)
    except (ValueError, RuntimeError, NotImplementedError, EOFError) as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", str(syntax))
        raise InputRejectedError(
            "undecodable_pixel_data",
            f"the pixel data of an image cannot be decoded ({type(exc).__name__}, transfer syntax "
            f"{name}); it is truncated or corrupt, or no decoder for it is installed",
        ) from exc


class _PixelSource:
    """Decodes stored values lazily: multi-frame instances once (cached), single frames on demand."""

    def __init__(self, datasets: list[Dataset]) -> None:
        self._datasets = datasets
        self._cache: dict[int, NDArray[Any]] = {}

    def release(self) -> None:
        """Drop the decoded multi-frame arrays."""
        self._cache.clear()

    def stored(self, frame: _Frame) -> NDArray[Any]:
        ds = self._datasets[frame.instance]
        if frame.frame_number is None:
            array = _decode(ds)
        else:
            if frame.instance not in self._cache:
                self._cache[frame.instance] = _decode(ds)
            array = self._cache[frame.instance]
            if array.ndim == 3:
                array = array[frame.frame_number - 1]
        if array.shape != (frame.rows, frame.columns):
            raise InputRejectedError(
                "unsupported_pixel_format",
                f"decoded pixel data has shape {array.shape}, expected Rows×Columns "
                f"{frame.rows}×{frame.columns}",
            )
        return array

    def hounsfield(self, frame: _Frame) -> NDArray[np.float32]:
        """Stored values × Rescale Slope + Rescale Intercept (PS3.3 C.11.1.1.2), as float32."""
        stored = self.stored(frame)
        if frame.slope == 1.0 and float(frame.intercept).is_integer() and stored.dtype.itemsize <= 2:
            # Exact in float32 (|values| < 2**24): skip the float64 round trip (a third of load time).
            hu = stored.astype(np.float32)
            hu += np.float32(frame.intercept)
            return hu
        return (stored.astype(np.float64) * frame.slope + frame.intercept).astype(np.float32)


def _read(marked: Sequence[tuple[Path, bool]]) -> tuple[list[Dataset], list[Path]]:
    """Read the instances (large values deferred).

    A file named directly that is not DICOM is a rejection; inside a folder, files that are not DICOM
    or carry no Series Instance UID (a DICOMDIR, a README) are skipped with a debug log, as
    `group_series` does. An OS error (vanished file, I/O error) is transient: the spool may be briefly
    unavailable.
    """
    datasets, files = [], []
    for path, in_folder in marked:
        try:
            ds = pydicom.dcmread(path, defer_size=_DEFER_BYTES)
        except OSError as exc:
            raise TransientPipelineError(
                f"cannot read a file of the series ({exc.strerror or type(exc).__name__}); retry later"
            ) from exc
        except (InvalidDicomError, EOFError, ValueError) as exc:
            if in_folder:
                logger.debug("event=file_ignored reason=not_dicom error=%s", type(exc).__name__)
                continue
            raise InputRejectedError(
                "unreadable_file",
                f"a file of the series cannot be read as DICOM ({type(exc).__name__}); "
                "remove it or resend the series",
            ) from exc
        if in_folder and not ds.get("SeriesInstanceUID"):
            logger.debug("event=file_ignored reason=no_series_instance_uid")
            continue
        datasets.append(ds)
        files.append(path)
    return datasets, files


def _check_identity(datasets: list[Dataset]) -> tuple[str, str, str, str]:
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series) != 1:
        raise InputRejectedError(
            "mixed_series",
            f"the files belong to {len(series)} series; load each series separately (group_series)",
        )
    studies = {str(ds.get("StudyInstanceUID", "")) for ds in datasets}
    if len(studies) != 1:
        raise InputRejectedError("mixed_series", f"the files of one series name {len(studies)} studies")
    frames_of_reference = {str(ds.get("FrameOfReferenceUID", "")) for ds in datasets}
    if "" in frames_of_reference:
        raise InputRejectedError(
            "missing_frame_of_reference",
            "an image has no Frame of Reference UID (0020,0052), required for CT (PS3.3 C.7.4.1); "
            "without it no segmentation can be registered to the images",
        )
    if len(frames_of_reference) != 1:
        raise InputRejectedError(
            "mixed_frame_of_reference",
            "the images do not share one Frame of Reference UID (0020,0052), so their positions "
            "cannot be combined into one volume",
        )
    modality = str(datasets[0].get("Modality", ""))
    return studies.pop(), series.pop(), frames_of_reference.pop(), modality


def _set_aside_non_images(
    datasets: list[Dataset], files: list[Path], notes: list[str]
) -> tuple[list[Dataset], list[Path]]:
    """Drop instances that are not images at all (no Rows, no pixel data: a structured report or a
    presentation state filed into the series), with a note; an image without pixel data is rejected."""
    kept_datasets, kept_files = [], []
    for ds, path in zip(datasets, files):
        has_pixels = any(k in ds for k in _PIXEL_KEYWORDS)
        if has_pixels:
            kept_datasets.append(ds)
            kept_files.append(path)
        elif "Rows" in ds:
            raise InputRejectedError(
                "no_pixel_data",
                "an image instance has Rows and Columns but no Pixel Data (7FE0,0010); resend it",
            )
    if not kept_datasets:
        raise InputRejectedError("no_pixel_data", f"none of the {len(datasets)} instances holds pixel data")
    if len(kept_datasets) < len(datasets):
        notes.append(f"excluded {len(datasets) - len(kept_datasets)} non-image instance(s) (no pixel data)")
    return kept_datasets, kept_files


def _select_stack(frames: list[_Frame], notes: list[str]) -> list[_Frame]:
    """Set localizers and small off-orientation groups aside (noted); reject real mixtures."""
    localizers = [f for f in frames if f.is_localizer]
    if localizers:
        notes.append(f"excluded {len(localizers)} localizer image(s) (Image Type LOCALIZER)")
    candidates = [f for f in frames if not f.is_localizer]
    if not candidates:
        raise InputRejectedError("too_few_slices", "the series holds only localizer images")
    placed = [
        f
        for f in candidates
        if f.position is not None and f.orientation is not None and f.pixel_spacing is not None
    ]
    unplaced = len(candidates) - len(placed)
    if not placed:
        raise _missing_geometry()
    groups: list[list[_Frame]] = []
    for frame in placed:
        for group in groups:
            if _same_plane_kind(group[0], frame) and _same_grid(group[0], frame):
                group.append(frame)
                break
        else:
            groups.append([frame])
    groups.sort(key=len, reverse=True)
    main, others = groups[0], groups[1:]
    if not others and not unplaced:
        return main
    n_other = sum(len(g) for g in others)
    few = all(len(g) <= _MAX_LOCALIZER_IMAGES for g in others) and unplaced <= _MAX_LOCALIZER_IMAGES
    if few and len(main) > max(n_other + unplaced, _MAX_LOCALIZER_IMAGES):
        if n_other:
            notes.append(
                f"excluded {n_other} image(s) whose orientation or size differs from the main stack of "
                f"{len(main)} (taken for localizers)"
            )
        if unplaced:
            notes.append(
                f"excluded {unplaced} image(s) without Image Position/Orientation (Patient) or Pixel "
                "Spacing (e.g. a dose screen)"
            )
        return main
    if unplaced:
        raise _missing_geometry()
    if any(not _same_plane_kind(main[0], g[0]) for g in others):
        raise InputRejectedError(
            "mixed_orientations",
            f"the series mixes {len(groups)} image orientations ({', '.join(str(len(g)) for g in groups)} "
            "images); send one orientation per series",
        )
    raise InputRejectedError(
        "mixed_image_sizes",
        f"the series mixes {len(groups)} image sizes or pixel spacings "
        f"({', '.join(str(len(g)) for g in groups)} images); send one matrix per series",
    )


def load_series(
    paths: Sequence[Path],
    *,
    spacing_tolerance: float = 0.1,
    duplicate_tolerance_mm: float = _DUPLICATE_TOLERANCE_MM,
) -> SourceSeries:
    """Load one series into a volume in HU with exact LPS geometry.

    Parameters
    ----------
    paths
        The series' files (and/or folders, searched recursively; there, files that are not DICOM are
        skipped). All must carry the same Series Instance UID, Study Instance UID and Frame of
        Reference UID.
    spacing_tolerance
        Largest accepted deviation of a gap between neighbouring slices from the series' median gap,
        as a fraction of that median (0.1 = 10 %). A gap near a multiple of the median means missing
        slices (``missing_slices``), any other deviation ``irregular_spacing``.
    duplicate_tolerance_mm
        Slices whose positions along the normal differ by less than this (mm) are the same slice:
        identical pixel data → all but the first dropped (noted); different → ``conflicting_duplicates``.

    Returns
    -------
    SourceSeries
        ``volume.array_zyx`` float32 ``[k, j, i]`` in HU (stored value × Rescale Slope + Rescale
        Intercept, per frame for enhanced images), ``k`` ascending along the slice normal
        (row cosine × column cosine); ``volume.affine_lps`` as in `pipeline.types` with the slice
        spacing (last − first position along the normal) / (n − 1); ``frames[k]`` the source of slice
        ``k``; ``datasets`` one header per used instance (pixel data removed) in volume order.

    Raises
    ------
    InputRejectedError
        With the reason codes listed in the module docstring. Gantry tilt is rejected, not resampled:
        the message names the tilt angle.
    TransientPipelineError
        A file could not be read for an operating-system reason (vanished, I/O error).
    """
    datasets, files = _read(_expand_marked(paths))
    if not datasets:
        raise InputRejectedError("too_few_slices", "no DICOM files were given")
    study_uid, series_uid, frame_of_reference_uid, modality = _check_identity(datasets)

    notes: list[str] = []
    datasets, files = _set_aside_non_images(datasets, files, notes)
    for ds in datasets:
        if "PixelData" not in ds or int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            raise InputRejectedError(
                "unsupported_pixel_format",
                "only single-sample (MONOCHROME) integer Pixel Data is supported",
            )

    frames: list[_Frame] = []
    for index, ds in enumerate(datasets):
        frames.extend(_frames_of(ds, index, len(frames)))

    stack = _select_stack(frames, notes)
    reference = stack[0]
    row_cosine, column_cosine = _orientation(reference)[:3], _orientation(reference)[3:]
    normal = np.cross(row_cosine, column_cosine)
    normal /= np.linalg.norm(normal)

    def along(frame: _Frame) -> float:
        return float(_position(frame) @ normal)

    stack.sort(key=lambda f: (along(f), f.order))
    pixels = _PixelSource(datasets)
    stack = _drop_duplicates(stack, along, pixels, duplicate_tolerance_mm, notes)
    if len(stack) < 2:
        raise InputRejectedError(
            "too_few_slices", f"the series has {len(stack)} usable slice(s); at least 2 are needed"
        )

    reference = stack[0]
    pixel_spacing = _pixel_spacing(reference)
    sources = [(f.sop_instance_uid, f.frame_number) for f in stack]
    if len(set(sources)) != len(sources):
        raise InputRejectedError(
            "conflicting_duplicates",
            "one SOP Instance UID appears at two slice positions; an instance was changed without a "
            "new UID: resend the series",
        )
    positions = np.array([_position(f) for f in stack], dtype=np.float64)
    _check_in_plane_drift(positions, normal, pixel_spacing, datasets[reference.instance])
    distances = positions @ normal
    _check_spacing(distances, spacing_tolerance)
    slice_spacing = float((distances[-1] - distances[0]) / (len(stack) - 1))

    affine = np.eye(4, dtype=np.float64)
    affine[:3, 0] = row_cosine * pixel_spacing[1]
    affine[:3, 1] = column_cosine * pixel_spacing[0]
    affine[:3, 2] = normal * slice_spacing
    affine[:3, 3] = positions[0]

    array = np.empty((len(stack), reference.rows, reference.columns), dtype=np.float32)
    for k, frame in enumerate(stack):
        array[k] = pixels.hounsfield(frame)
        if frame.frame_number is None:
            _drop_pixels(datasets[frame.instance])  # free the encoded pixels once decoded
    pixels.release()

    used_instances = list(dict.fromkeys(frame.instance for frame in stack))  # volume order, unique
    headers = tuple(_header(datasets[i]) for i in used_instances)
    source_frames = tuple(
        SourceFrame(
            sop_instance_uid=f.sop_instance_uid,
            sop_class_uid=f.sop_class_uid,
            frame_number=f.frame_number,
            image_position_lps_mm=(float(p[0]), float(p[1]), float(p[2])),
        )
        for f, p in zip(stack, positions)
    )
    volume = Volume(array_zyx=array, affine_lps=affine)
    logger.info(
        "event=series_loaded modality=%s slices=%d rows=%d columns=%d spacing_mm=%.4g,%.4g,%.4g "
        "instances=%d notes=%d",
        modality,
        array.shape[0],
        array.shape[1],
        array.shape[2],
        *volume.spacing_mm,
        len(headers),
        len(notes),
    )
    for note in notes:
        logger.info("event=series_note note=%r", note)
    return SourceSeries(
        volume=volume,
        frames=source_frames,
        datasets=headers,
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        frame_of_reference_uid=frame_of_reference_uid,
        modality=modality,
        files=tuple(files[i] for i in used_instances),
        notes=tuple(notes),
    )


def _drop_pixels(ds: Dataset) -> None:
    for keyword in _PIXEL_KEYWORDS:
        if keyword in ds:
            delattr(ds, keyword)


def _header(ds: Dataset) -> Dataset:
    """The instance's header without pixel data, for highdicom ``source_images``.

    Deferred elements other than the pixel data are read in now, so the header no longer depends on
    the file (the spool may move or retire it before the encoders run).
    """
    _drop_pixels(ds)
    for _ in ds:  # iterating converts each raw element, reading deferred values from the file
        pass
    return ds


def _drop_duplicates(
    stack: list[_Frame],
    along: Any,
    pixels: _PixelSource,
    tolerance_mm: float,
    notes: list[str],
) -> list[_Frame]:
    """Keep the first of each run of slices at one position; identical pixels only, else reject."""
    kept: list[_Frame] = []
    dropped = 0
    for frame in stack:
        if kept and abs(along(frame) - along(kept[-1])) < tolerance_mm:
            first = kept[-1]
            same_place = bool(np.max(np.abs(_position(first) - _position(frame))) < tolerance_mm)
            if not same_place or not np.array_equal(pixels.hounsfield(first), pixels.hounsfield(frame)):
                raise InputRejectedError(
                    "conflicting_duplicates",
                    f"two images lie at {along(frame):.3f} mm along the slice normal but differ in "
                    "pixel data or in-plane position; remove the stale instances and resend",
                )
            dropped += 1
            continue
        kept.append(frame)
    if dropped:
        notes.append(f"dropped {dropped} identical duplicate slice(s)")
    return kept


def _check_in_plane_drift(
    positions: NDArray[np.float64],
    normal: NDArray[np.float64],
    pixel_spacing: tuple[float, float],
    header: Dataset,
) -> None:
    """Reject stacks whose slices do not lie on the normal through the first (tilt or jumble)."""
    offsets = positions - positions[0]
    along = offsets @ normal
    perpendicular = offsets - np.outer(along, normal)
    shift = np.linalg.norm(perpendicular, axis=1)
    limit = _MAX_IN_PLANE_SHIFT_FRACTION * min(pixel_spacing)
    if float(shift.max()) <= limit:
        return
    tilt_degrees = math.degrees(math.atan2(float(shift[-1]), abs(float(along[-1])) or 1e-12))
    stated = header.get("GantryDetectorTilt")
    stated_text = "" if stated is None else f"; Gantry/Detector Tilt (0018,1120) = {float(stated):g}°"
    if tilt_degrees >= _TILT_REPORT_DEGREES and _is_linear(shift, along):
        raise InputRejectedError(
            "gantry_tilt",
            f"slices are stacked {tilt_degrees:.2f}° off the slice normal (gantry tilt{stated_text}); "
            "tilted series are not resampled: reconstruct the series without tilt",
        )
    raise InputRejectedError(
        "inconsistent_positions",
        f"slice positions stray up to {float(shift.max()):.2f} mm in-plane from the line along the "
        "slice normal; the images do not form one stack",
    )


def _is_linear(shift: NDArray[np.float64], along: NDArray[np.float64]) -> bool:
    """Whether the in-plane shift grows in proportion to the distance along the normal (a tilt)."""
    if abs(float(along[-1])) == 0.0:
        return False
    expected = np.abs(along) * (shift[-1] / abs(float(along[-1])))
    return bool(np.max(np.abs(shift - expected)) <= max(1e-3, 0.05 * float(shift[-1])))


def _check_spacing(distances: NDArray[np.float64], tolerance: float) -> None:
    """Reject missing slices and irregular spacing beyond ``tolerance`` (fraction of the median gap)."""
    gaps = np.diff(distances)
    nominal = float(np.median(gaps))
    deviation = np.abs(gaps - nominal) / nominal
    if float(deviation.max()) <= tolerance:
        return
    ratios = gaps / nominal
    multiples = np.rint(ratios)
    missing = (multiples >= 2) & (np.abs(ratios - multiples) <= tolerance)
    irregular = (deviation > tolerance) & ~missing
    if missing.any() and not irregular.any():
        n_missing = int((multiples[missing] - 1).sum())
        raise InputRejectedError(
            "missing_slices",
            f"{n_missing} slice(s) missing: {int(missing.sum())} gap(s) of up to "
            f"{float(gaps[missing].max()):.3g} mm where the spacing is {nominal:.3g} mm; resend the "
            "complete series",
        )
    worst = float(gaps[np.argmax(deviation)])
    raise InputRejectedError(
        "irregular_spacing",
        f"slice gaps vary from {float(gaps.min()):.3g} to {float(gaps.max()):.3g} mm around "
        f"{nominal:.3g} mm (worst {worst:.3g} mm, tolerance {tolerance:.0%}); send a series "
        "reconstructed at regular spacing",
    )
