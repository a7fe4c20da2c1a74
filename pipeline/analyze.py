"""``edge-node analyze PATH... --out DIR``: run the pipeline on DICOM files or folders, without the node.

A thin edge (STYLE rule 2): it parses, groups the files into series (`pipeline.load.group_series`),
asks the model registry which models accept each series, calls `pipeline.run.run_job` per accepted
(series, model) and turns the outcome into a findings table (or JSON) and an exit code. ``node.cli``
imports this module only for this command, so the receiver never imports torch.

Exit codes:

- 0: every accepted series was analysed (the outputs are in ``--out``);
- 1: an analysis failed unexpectedly (the others still ran; see the message);
- 2: usage error (unknown model, missing path, bad option);
- 4: nothing analysable: no DICOM series found, no model accepts any series, or every series was
  rejected by the loader (reasons listed).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOTHING_ANALYSABLE = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the command's arguments on ``parser`` (``node.cli`` owns the parser)."""
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="DICOM files or folders (searched recursively)")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for the SEG and SR files (created)")
    parser.add_argument("--model", metavar="NAME", help="run only this model (its series criteria still apply)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N (default: auto)")
    parser.add_argument(
        "--model-dir", type=Path, metavar="DIR", help="folder of model bundles (default: the models shipped with the package)"
    )
    parser.epilog = "exit codes: 0 analysed, 1 an analysis failed, 2 usage error, 4 nothing analysable"


@dataclass
class _Report:
    analysed: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)


def run(args: argparse.Namespace, *, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Execute the command; returns the exit code (see the module docstring)."""
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    from models.loader import DeviceError, resolve_device
    from models.registry import ModelRegistry
    from models.spec import ModelError
    from pipeline.errors import InputRejectedError, PipelineError
    from pipeline.load import group_series
    from pipeline.run import run_job

    missing = [str(p) for p in args.paths if not Path(p).exists()]
    if missing:
        print(f"edge-node analyze: no such file or folder: {', '.join(missing)}", file=err)
        return EXIT_USAGE
    if args.model_dir is not None and not Path(args.model_dir).is_dir():
        print(f"edge-node analyze: --model-dir {args.model_dir} is not a folder", file=err)
        return EXIT_USAGE
    try:
        resolve_device(args.device)
    except DeviceError as exc:
        print(f"edge-node analyze: --device: {exc}", file=err)
        return EXIT_USAGE
    registry = ModelRegistry(args.model_dir)
    for problem in registry.problems:
        print(f"edge-node analyze: model bundle skipped: {problem.path}: {problem.reason}", file=err)
    if args.model is not None and args.model not in registry:
        known = ", ".join(spec.name for spec in registry.list()) or "none"
        print(f"edge-node analyze: no model named {args.model!r} (available: {known})", file=err)
        return EXIT_USAGE

    groups = group_series([Path(p) for p in args.paths])
    report = _Report()
    for series_uid, files in groups.items():
        candidate = _candidate(files)
        decisions = [(spec, ok, why) for spec, ok, why in registry.decisions(candidate) if args.model in (None, spec.name)]
        accepted = [spec for spec, ok, _ in decisions if ok]
        if not accepted:
            reasons = "; ".join(f"{spec.name}: {why}" for spec, _, why in decisions) or "no models installed"
            report.skipped.append({"series_instance_uid": series_uid, "files": len(files), "reason": reasons})
            continue
        for spec in accepted:
            try:
                job = run_job(files, args.out, model=spec, device=args.device)
            except InputRejectedError as exc:
                report.rejected.append(
                    {"series_instance_uid": series_uid, "model": spec.name, "reason": getattr(exc, "reason", ""), "message": str(exc)}
                )
            except (PipelineError, ModelError, OSError, RuntimeError, ValueError) as exc:
                log.exception("event=analyze_failed model=%s", spec.name)
                report.failed.append(
                    {"series_instance_uid": series_uid, "model": spec.name, "error": f"{type(exc).__name__}: {exc}"}
                )
            else:
                report.analysed.append(_job_json(job))

    if args.json:
        json.dump(
            {"analysed": report.analysed, "skipped": report.skipped, "rejected": report.rejected, "failed": report.failed},
            out,
            indent=2,
        )
        out.write("\n")
    else:
        _print_table(report, out)
    if not groups:
        print("edge-node analyze: no DICOM files found", file=err)
    if report.failed:
        return EXIT_FAILURE
    if not report.analysed:
        return EXIT_NOTHING_ANALYSABLE
    return EXIT_OK


def _candidate(files: list[Path]) -> Any:
    """Routing facts from the first readable header of a series (no pixels read)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from models.spec import SeriesCandidate

    header = None
    for path in files:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
            break
        except (InvalidDicomError, OSError):
            continue
    if header is None:
        return SeriesCandidate(modality="")
    frames = int(header.get("NumberOfFrames", 1) or 1)
    thickness = header.get("SliceThickness")
    if thickness in (None, "") and "SharedFunctionalGroupsSequence" in header:
        try:
            thickness = header.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SliceThickness
        except (AttributeError, IndexError):
            thickness = None
    image_type = header.get("ImageType") or []
    return SeriesCandidate(
        modality=str(header.get("Modality", "")).upper(),
        body_part=str(header.get("BodyPartExamined", "") or "").upper(),
        slice_count=len(files) * frames if frames > 1 else len(files),
        slice_thickness_mm=float(thickness) if thickness not in (None, "") else None,
        image_type=tuple(str(v).upper() for v in ([image_type] if isinstance(image_type, str) else image_type)),
        series_description=str(header.get("SeriesDescription", "") or ""),
    )


def _job_json(job: Any) -> dict[str, Any]:
    study = job.study_finding
    return {
        "series_instance_uid": job.series_instance_uid,
        "study_instance_uid": job.study_instance_uid,
        "model": job.model_name,
        "model_version": job.model_version,
        "device": job.device,
        "seg_path": str(job.seg_path),
        "sr_path": str(job.sr_path),
        "seg_sop_instance_uid": job.seg_sop_instance_uid,
        "sr_sop_instance_uid": job.sr_sop_instance_uid,
        "findings": [
            {
                "label": f.label,
                "index": f.index,
                "volume_ml": round(f.volume_ml, 4),
                "diameter_mm": round(f.diameter_mm, 2),
                "centroid_lps_mm": [round(v, 2) for v in f.centroid_lps_mm],
                "mean_hu": round(f.mean_hu, 1),
                "std_hu": round(f.std_hu, 1),
                "score": round(f.score, 4),
                "tracking_uid": f.tracking_uid,
            }
            for f in job.findings
        ],
        "study_finding": None
        if study is None
        else {"name": study.name, "score": round(study.score, 4), "present": study.present, "threshold": study.threshold},
        "timings_s": {
            name: round(getattr(job.timings, name), 3)
            for name in ("load", "model", "preprocess", "infer", "postprocess", "encode", "write")
        },
        "notes": list(job.notes),
    }


def _print_table(report: _Report, out: TextIO) -> None:
    for item in report.analysed:
        study = item["study_finding"]
        verdict = "" if study is None else f"  {study['name']}: {'yes' if study['present'] else 'no'} (score {study['score']:.2f})"
        print(f"series {item['series_instance_uid']}  model {item['model']} {item['model_version']}{verdict}", file=out)
        print(f"  SEG {item['seg_path']}", file=out)
        print(f"  SR  {item['sr_path']}", file=out)
        for note in item["notes"]:
            print(f"  note: {note}", file=out)
        if item["findings"]:
            print(f"  {'#':>3}  {'label':<12} {'volume_ml':>10} {'diam_mm':>8} {'score':>6}  centroid_lps_mm", file=out)
            for f in item["findings"]:
                centroid = ", ".join(f"{v:.1f}" for v in f["centroid_lps_mm"])
                print(
                    f"  {f['index']:>3}  {f['label']:<12} {f['volume_ml']:>10.3f} {f['diameter_mm']:>8.1f} {f['score']:>6.2f}  ({centroid})",
                    file=out,
                )
        else:
            print("  no findings", file=out)
    for item in report.skipped:
        print(f"skipped series {item['series_instance_uid']} ({item['files']} files): {item['reason']}", file=out)
    for item in report.rejected:
        print(f"rejected series {item['series_instance_uid']} by {item['model']}: {item['message']}", file=out)
    for item in report.failed:
        print(f"FAILED series {item['series_instance_uid']} with {item['model']}: {item['error']}", file=out)
