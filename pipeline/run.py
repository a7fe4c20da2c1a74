"""The one composition function of the pipeline: a series' files → a SEG and an SR written atomically.

`run_job` shows the whole flow: load → preprocess → infer → postprocess (back on the source grid) →
encode SEG and SR → write. It knows nothing of SQLite, networking or the job queue: the worker calls it
with files and a folder and records the returned `JobOutput`; the ``edge-node analyze`` command calls it
per series. Unusable input raises `pipeline.errors.InputRejectedError` (permanent: never retried);
resource trouble raises `pipeline.errors.TransientPipelineError`.
"""

from __future__ import annotations

import datetime
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from scipy import ndimage

from models.loader import load_model, resolve_device
from models.registry import ModelRegistry
from models.spec import CandidateStageSpec, ModelSpec, SeriesCandidate
from pipeline.candidates import (Candidate, detect_candidates, paint_candidates, sample_patches,
                                 score_candidates, window)
from pipeline.encode_seg import encode_seg, plan_segments
from pipeline.encode_sr import encode_sr
from pipeline.errors import InputRejectedError
from pipeline.infer import infer
from pipeline.load import load_series
from pipeline.postprocess import postprocess
from pipeline.preprocess import invert_to_source, run_plan
from pipeline.types import Finding, SegmentationResult, SourceSeries, StudyFinding, Volume
from pipeline.uids import plan_result_uids

log = logging.getLogger(__name__)



def _process_umask() -> int:
    """The process' umask, read without changing it (Linux ≥ 4.7 lists it in /proc/self/status);
    0o022 where it cannot be read. `os.umask` would have to set it, racing with other threads."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


#: Permissions of written results: rw-r--r-- less the umask (mkstemp alone would give rw-------).
RESULT_FILE_MODE = 0o644 & ~_process_umask()


@dataclass(frozen=True, slots=True)
class StageTimings:
    """Wall-clock seconds per stage of one job (``model``: loading the weights, or the warm-cache hit)."""

    load: float = 0.0
    model: float = 0.0
    preprocess: float = 0.0
    infer: float = 0.0
    postprocess: float = 0.0
    encode: float = 0.0
    write: float = 0.0

    @property
    def total(self) -> float:
        return self.load + self.model + self.preprocess + self.infer + self.postprocess + self.encode + self.write


@dataclass(frozen=True, slots=True)
class JobOutput:
    """What one analysis produced: the written files, the findings and how long each stage took.

    ``seg_path`` and ``sr_path`` are final (renamed into place, fsynced). UIDs are the derived result
    UIDs (`pipeline.uids`), identical for a re-run of the same input with the same model.
    """

    seg_path: Path
    sr_path: Path
    findings: tuple[Finding, ...]
    study_finding: StudyFinding | None
    timings: StageTimings
    model_name: str
    model_version: str
    study_instance_uid: str
    series_instance_uid: str
    seg_series_instance_uid: str
    seg_sop_instance_uid: str
    sr_series_instance_uid: str
    sr_sop_instance_uid: str
    device: str = "cpu"
    notes: tuple[str, ...] = field(default=())


def series_candidate(source: SourceSeries) -> SeriesCandidate:
    """What routing needs to know of a loaded series (models.spec.SeriesCandidate)."""
    header = source.datasets[0] if source.datasets else Dataset()
    thickness = _float_or_none(header.get("SliceThickness"))
    if thickness is None:
        thickness = _shared_slice_thickness(header)
    return SeriesCandidate(
        modality=str(source.modality or header.get("Modality", "")).upper(),
        body_part=str(header.get("BodyPartExamined", "") or "").upper(),
        slice_count=len(source.frames),
        slice_thickness_mm=thickness,
        image_type=tuple(str(v).upper() for v in _as_list(header.get("ImageType"))),
        series_description=str(header.get("SeriesDescription", "") or ""),
    )


def select_model(source: SourceSeries, registry: ModelRegistry) -> ModelSpec:
    """The first model (by name) whose series criteria accept the series.

    Raises
    ------
    InputRejectedError
        ``no_model``: no model accepts the series; the message lists each model's reason.
    """
    decisions = registry.decisions(series_candidate(source))
    for spec, accepted, _ in decisions:
        if accepted:
            return spec
    reasons = "; ".join(f"{spec.name}: {reason}" for spec, _, reason in decisions) or "no models installed"
    raise _rejected("no_model", f"no model accepts this series ({reasons})")


def run_job(
    paths: Sequence[Path],
    out_dir: Path,
    *,
    model: ModelSpec | None = None,
    registry: ModelRegistry | None = None,
    device: str = "auto",
    seg_series_description: str | None = None,
    sr_series_description: str | None = None,
    predecessor_sr_paths: Sequence[Path] = (),
    content_datetime: datetime.datetime | None = None,
) -> JobOutput:
    """Analyse one series and write its SEG and SR into ``out_dir``.

    Parameters
    ----------
    paths
        The series' files (one series; use `pipeline.load.group_series` to split a folder).
    out_dir
        Where ``SEG_<SOP Instance UID>.dcm`` and ``SR_<SOP Instance UID>.dcm`` are written (created if
        needed). Each file is written to a temporary file in ``out_dir``, fsynced and renamed, so a
        reader never sees a partial file; the names derive from our result UIDs, never from received
        values.
    model
        The model to run; None = the first model of ``registry`` whose series criteria accept the series.
    registry
        Where to look for a model when ``model`` is None (default: the shipped bundles).
    device
        ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
    seg_series_description, sr_series_description
        Series Description of the outputs; None or empty = the model manifest's ``[outputs]``.
    predecessor_sr_paths
        SR files of an earlier analysis of the same study that this one supersedes (the study changed,
        so the result UIDs are new); the new SR names them as predecessor documents.
    content_datetime
        Content/creation date and time of both outputs; None = now. The worker passes the time its job
        was created, so a re-run of the same job writes byte-identical files under the same UIDs.

    Returns
    -------
    JobOutput

    Raises
    ------
    InputRejectedError
        The series cannot be analysed (the loader's reasons, or ``no_model``).
    TransientPipelineError
        Resources ran out (e.g. memory during inference); retrying later may succeed.
    """
    started = time.perf_counter()
    paths = [Path(p) for p in paths]
    source = load_series(paths)
    t_load = time.perf_counter()
    if model is None:
        if registry is None:
            registry = ModelRegistry()
        model = select_model(source, registry)
    handle = load_model(model, resolve_device(device))
    t_model = time.perf_counter()

    analysis = analyze_volume(source.volume, model, handle)
    result = analysis.result
    t_pre = t_model + analysis.preprocess_seconds
    t_infer = t_pre + analysis.infer_seconds
    uids = plan_result_uids([frame.sop_instance_uid for frame in source.frames], model.name, model.version)
    result = replace(
        result, findings=tuple(replace(f, tracking_uid=uids.tracking_uid(f.index)) for f in result.findings)
    )
    t_post = time.perf_counter()

    layout = plan_segments(result, uids)
    seg = encode_seg(
        source,
        result,
        model,
        uids,
        layout=layout,
        series_description=seg_series_description or None,
        content_datetime=content_datetime,
    )
    previous = [pydicom.dcmread(p, stop_before_pixels=True) for p in predecessor_sr_paths]
    sr = encode_sr(
        source,
        result,
        seg,
        model,
        uids,
        layout=layout,
        series_description=sr_series_description or None,
        previous_versions=previous,
        content_datetime=content_datetime,
    )
    t_encode = time.perf_counter()

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seg_path = write_dataset_atomically(seg, out_dir / f"SEG_{uids.seg_sop_instance_uid}.dcm")
    sr_path = write_dataset_atomically(sr, out_dir / f"SR_{uids.sr_sop_instance_uid}.dcm")
    t_write = time.perf_counter()

    timings = StageTimings(
        load=t_load - started,
        model=t_model - t_load,
        preprocess=t_pre - t_model,
        infer=t_infer - t_pre,
        postprocess=t_post - t_infer,
        encode=t_encode - t_post,
        write=t_write - t_encode,
    )
    study = result.study_finding
    log.info(
        "event=job_done model=%s version=%s device=%s slices=%d findings=%d study_finding=%s seconds=%.3f "
        "load=%.3f preprocess=%.3f infer=%.3f postprocess=%.3f encode=%.3f write=%.3f",
        model.name,
        model.version,
        handle.device,
        len(source.frames),
        len(result.findings),
        "none" if study is None else ("present" if study.present else "absent"),
        t_write - started,
        timings.load,
        timings.preprocess,
        timings.infer,
        timings.postprocess,
        timings.encode,
        timings.write,
    )
    return JobOutput(
        seg_path=seg_path,
        sr_path=sr_path,
        findings=result.findings,
        study_finding=study,
        timings=timings,
        model_name=model.name,
        model_version=model.version,
        study_instance_uid=source.study_instance_uid,
        series_instance_uid=source.series_instance_uid,
        seg_series_instance_uid=uids.seg_series_instance_uid,
        seg_sop_instance_uid=uids.seg_sop_instance_uid,
        sr_series_instance_uid=uids.sr_series_instance_uid,
        sr_sop_instance_uid=uids.sr_sop_instance_uid,
        device=str(handle.device),
        notes=tuple(source.notes),
    )


@dataclass(frozen=True, slots=True)
class VolumeAnalysis:
    """What `analyze_volume` returns: the result on the source grid and the seconds of each stage."""

    result: SegmentationResult
    preprocess_seconds: float
    infer_seconds: float
    postprocess_seconds: float
    #: The candidate stage's candidates with their scores (empty for a model without one).
    candidates: tuple[tuple[Candidate, float], ...] = ()


def analyze_volume(volume: Volume, model: ModelSpec, handle: Any) -> VolumeAnalysis:
    """Run a model on a volume in HU: plan → sliding-window inference → (the bundle's candidate stage:
    blobs on the network's grid, classified and painted on the source grid) → back to the source
    grid → postprocessing. The one analysis path, shared by `run_job` and the model evaluation
    (`models.evaluate`), so what is measured is what the node runs.

    Findings carry no tracking UIDs yet (`run_job` derives them from the source instances).
    """
    started = time.perf_counter()
    preprocessed, records = run_plan(volume, model.preprocess)
    t_pre = time.perf_counter()
    output = infer(handle, np.asarray(preprocessed.array_zyx, dtype=np.float32)[None], model.inference)
    study_logit = output.study_logit
    stage = model.candidates
    classifier = getattr(handle, "candidates", None)
    found: list[Candidate] = []
    if stage is not None and classifier is not None:
        found = find_candidates(preprocessed, output.probabilities_czyx, stage)
    t_infer = time.perf_counter()
    probabilities = _probabilities_on_source(output.probabilities_czyx, records, model.labels)
    del output, preprocessed  # the preprocessed-grid arrays are no longer needed (memory)
    scored: tuple[tuple[Candidate, float], ...] = ()
    second = 0.0  # the candidate stage's classification counts as inference, not postprocessing
    if stage is not None and classifier is not None and stage.label in probabilities:
        t_second = time.perf_counter()
        others = [p for value, p in probabilities.items() if value != stage.label]
        scored = second_look(volume, probabilities[stage.label], found, stage, model.label(stage.label),
                             classifier, getattr(handle, "device", "cpu"), others)
        second = time.perf_counter() - t_second
    fractional = str(getattr(model.segmentation.type, "value", model.segmentation.type)).upper() == "FRACTIONAL"
    result = postprocess(
        probabilities,
        volume,
        model.labels,
        study_logit=study_logit,
        study_finding=model.study_finding,
        keep_probabilities=fractional,
    )
    return VolumeAnalysis(result, t_pre - started, t_infer - t_pre + second,
                          time.perf_counter() - t_infer - second, scored)


def find_candidates(preprocessed: Volume, probabilities_czyx: np.ndarray, stage: CandidateStageSpec) -> list[Candidate]:
    """The candidate stage's blobs on the network's grid: in and next to the lungs the network drew
    (every non-background channel, holes filled), away from what it already calls ``stage.label``.

    Filling matters because a solid nodule the network misses can come out as background inside the
    lung (a hole), and ``fill_outside_lungs`` would then erase its centre before the dot filter looks."""
    lungs = ndimage.binary_fill_holes(probabilities_czyx[0] <= 0.5)
    covered = ndimage.binary_dilation(probabilities_czyx[stage.label] >= stage.skip_probability, iterations=2)
    return detect_candidates(preprocessed, lungs, scales_mm=stage.scales_mm, min_level=stage.min_level,
                             min_response=stage.min_response, max_candidates=stage.max_candidates,
                             covered_zyx=covered, max_level=stage.max_level,
                             fill_outside_lungs=stage.fill_outside_lungs)


def second_look(volume: Volume, probability_zyx: np.ndarray, candidates: Sequence[Candidate],
                stage: CandidateStageSpec, label: Any, classifier: Any, device: Any,
                others: Sequence[np.ndarray] = ()) -> tuple[tuple[Candidate, float], ...]:
    """Classify ``candidates`` on cubes of the source image and paint those that reach the label's
    peak threshold (its threshold when it has none) into ``probability_zyx`` (in place), lowering the
    other labels' channels ``others`` there (see `paint_candidates`)."""
    started = time.perf_counter()
    patches = window(sample_patches(volume, [c.center_lps_mm for c in candidates], size=stage.patch_size,
                                    spacing_mm=stage.patch_spacing_mm), *stage.window_hu)
    scores = score_candidates(classifier, patches, device, bias=stage.score_bias, axial_turns=stage.axial_turns)
    accept = max(float(label.threshold), float(label.peak_threshold))
    painted = paint_candidates(probability_zyx, volume, candidates, scores, min_score=accept, others=others)
    log.info("event=candidates label=%s candidates=%d accepted=%d seconds=%.2f", label.name, len(candidates),
             painted, time.perf_counter() - started)
    return tuple((c, float(v)) for c, v in zip(candidates, scores, strict=True))


def write_dataset_atomically(dataset: Dataset, path: Path) -> Path:
    """Write a DICOM file so that ``path`` is either absent or complete: temporary file in the same
    folder, fsync, rename over ``path``, fsync of the folder. Returns ``path``."""
    path = Path(path)
    fd, temp_name = tempfile.mkstemp(prefix=".tmp-", suffix=".dcm", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), RESULT_FILE_MODE)  # mkstemp creates 0600
            dataset.save_as(handle, enforce_file_format=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return path


def _probabilities_on_source(
    probabilities_czyx: np.ndarray,
    records: Sequence[Any],
    labels: Sequence[Any],
) -> dict[int, np.ndarray]:
    """Map the labels' channels back onto the source grid, one channel at a time.

    The background channel is never read by postprocessing, so it is not mapped (a third of the
    work for a two-label model); one channel at a time bounds the temporaries to one volume.
    """
    return {
        spec.value: invert_to_source(probabilities_czyx[spec.value], records, order=1)
        for spec in labels
        if 0 < spec.value < probabilities_czyx.shape[0]
    }


def _rejected(reason: str, message: str) -> InputRejectedError:
    return InputRejectedError(reason, message)


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (str, bytes)):
        return [value]
    try:
        return list(value)
    except TypeError:
        return [value]


def _float_or_none(value: Any) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _shared_slice_thickness(header: Dataset) -> float | None:
    try:
        return _float_or_none(header.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SliceThickness)
    except (AttributeError, IndexError, KeyError):
        return None
