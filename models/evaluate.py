"""Evaluate the default model and the classical baseline on held-out phantoms (``make evaluate``).

Held-out phantoms use seeds no training or validation case uses (`EVALUATION_SEED_BASE`), with the
generator's full variation of geometry, anatomy, intensities, noise and nodules. For each one, in the
same run:

- the CNN: the bundle's plan → sliding-window inference → probabilities back on the source grid →
  postprocessing (exactly `pipeline.run.analyze_volume`, what `edge-node analyze` runs);
- the baseline: `pipeline.preprocess.segment_lungs_classical` for the lungs and
  `models.baseline.detect_nodules_classical` (threshold + region growing + size/shape filter) for the
  nodules.

Metrics on the source grid: lung Dice, nodule Dice (scans with nodules), per-nodule sensitivity by
size (< 6, 6–10, > 10 mm and ≥ 6 mm), false positives per scan, study-level ROC AUC; then split
at the bundle's thickest accepted slice (``[series] max_slice_thickness_mm``: the series the node
analyses, and the thicker ones it refuses). The tables are printed, written as JSON, and (with
``--write-card``) into the model card between the ``<!-- metrics:begin -->`` and
``<!-- metrics:end -->`` markers. This is an offline tool that uses
`pipeline` like `models.train`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from models.baseline import detect_nodules_classical
from models.metrics import DetectionResult, TrueNodule, dice, match_detections, roc_auc, sensitivity_by_size

logger = logging.getLogger(__name__)

EVALUATION_SEED_BASE = 30_000
STRESS_SEED_BASE = 40_000
#: Acquisitions the generator never produces, applied to held-out phantoms after generation: the
#: model must hold up on CT that does not look exactly like its training data.
PERTURBATIONS: dict[str, str] = {
    "miscalibrated": "HU x 1.05 + 40 (scanner calibration drift)",
    "low_dose": "extra white noise, sigma 60 HU (beyond the 10-40 HU of training)",
    "soft_kernel": "Gaussian blur, sigma 1.5 mm in every direction (smoother than any training kernel)",
}
DEFAULT_BUNDLE = Path(__file__).resolve().parent / "chest_ct_nodules"
CARD_BEGIN, CARD_END = "<!-- metrics:begin -->", "<!-- metrics:end -->"


@dataclass(frozen=True, slots=True)
class CaseScore:
    """One method's result on one phantom."""

    lung_dice: float
    nodule_dice: float | None
    detection: DetectionResult
    study_score: float
    has_nodule: bool


def evaluation_shape(seed: int) -> tuple[int, int, int]:
    """Acquisitions of the held-out set: 256–512 matrices, 40–200 slices (other draws than training)."""
    rng = np.random.default_rng([seed, 11])
    matrix = int(rng.choice([256, 320, 384, 448, 512]))
    slices = int(rng.integers(40, 201))
    return (slices, matrix, matrix)


def perturb(hu: np.ndarray, name: str, spacing_zyx_mm: Sequence[float], seed: int) -> np.ndarray:
    """Apply one of `PERTURBATIONS` to a float HU volume (deterministic per seed)."""
    from scipy import ndimage

    if name == "miscalibrated":
        return hu * 1.05 + 40.0
    if name == "low_dose":
        return hu + np.random.default_rng([seed, 60]).normal(0.0, 60.0, hu.shape).astype(np.float32)
    if name == "soft_kernel":
        return ndimage.gaussian_filter(hu, [1.5 / max(s, 1e-3) for s in spacing_zyx_mm])
    raise ValueError(f"unknown perturbation {name!r}; known: {', '.join(PERTURBATIONS)}")


def evaluate_case(seed: int, bundle: Path, perturbation: str | None = None) -> dict[str, Any]:
    """Generate the held-out phantom of ``seed`` (optionally perturbed) and score the CNN and the baseline
    (``"cnn"``, ``"baseline"``: `CaseScore`; ``"slice_thickness_mm"``: the phantom's)."""
    from models.loader import load_model, resolve_device
    from models.phantoms import generate_phantom
    from models.spec import load_spec
    from pipeline.preprocess import segment_lungs_classical
    from pipeline.run import analyze_volume
    from pipeline.types import Volume

    phantom = generate_phantom(seed, shape_zyx=evaluation_shape(seed))
    volume = Volume(phantom.hu_zyx.astype(np.float32), phantom.affine_lps)
    if perturbation is not None:
        volume = volume.with_array(perturb(volume.array_zyx, perturbation, volume.spacing_mm, seed)
                                   .astype(np.float32))
    truth_lung = phantom.labels_zyx >= 1
    truth_nodule = phantom.labels_zyx == 2
    nodules = [TrueNodule(tuple(n.center_zyx_vox), n.diameter_mm) for n in phantom.nodules]  # type: ignore[arg-type]
    has_nodule = bool(truth_nodule.any())

    spec = load_spec(bundle)
    handle = load_model(spec, resolve_device("cpu"))
    result = analyze_volume(volume, spec, handle).result
    label_map = np.asarray(result.label_map.array_zyx)
    cnn_nodule = label_map == 2
    cnn_score = result.study_finding.score if result.study_finding is not None else 0.0
    cnn = CaseScore(
        lung_dice=dice(label_map >= 1, truth_lung),
        nodule_dice=dice(cnn_nodule, truth_nodule) if has_nodule else None,
        detection=match_detections(cnn_nodule, truth_nodule, nodules),
        study_score=float(cnn_score),
        has_nodule=has_nodule,
    )

    lung_mask = segment_lungs_classical(volume)
    base = detect_nodules_classical(volume.array_zyx, lung_mask, volume.spacing_mm)
    baseline = CaseScore(
        lung_dice=dice(lung_mask | base.nodule_mask, truth_lung),
        nodule_dice=dice(base.nodule_mask, truth_nodule) if has_nodule else None,
        detection=match_detections(base.nodule_mask, truth_nodule, nodules),
        study_score=base.study_score,
        has_nodule=has_nodule,
    )
    return {"cnn": cnn, "baseline": baseline, "slice_thickness_mm": float(phantom.slice_thickness_mm)}


def summarize(scores: Sequence[CaseScore]) -> dict[str, Any]:
    """Aggregate per-case scores of one method into the table's figures."""
    nodule_dices = [s.nodule_dice for s in scores if s.nodule_dice is not None]
    sensitivity = sensitivity_by_size([s.detection for s in scores])
    return {
        "cases": len(scores),
        "lung_dice": float(np.mean([s.lung_dice for s in scores])),
        "nodule_dice": float(np.mean(nodule_dices)) if nodule_dices else float("nan"),
        "sensitivity": {k: {"value": v, "nodules": n} for k, (v, n) in sensitivity.items()},
        "false_positives_per_scan": float(np.mean([s.detection.false_positives for s in scores])),
        "study_auc": roc_auc([s.study_score for s in scores], [s.has_nodule for s in scores]),
    }


def _fmt(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def format_table(report: dict[str, Any]) -> str:
    """A Markdown table: one row per metric, one column per method, with the goal."""
    cnn, base = report["cnn"], report["baseline"]
    rows = [
        ("Lung Dice", "≥ 0.95", cnn["lung_dice"], base["lung_dice"]),
        ("Nodule Dice (scans with nodules)", "≥ 0.75", cnn["nodule_dice"], base["nodule_dice"]),
    ]
    for key, label in (("<6mm", "< 6 mm"), ("6-10mm", "6–10 mm"), (">10mm", "> 10 mm"), (">=6mm", "≥ 6 mm")):
        goal = "≥ 0.90" if key == ">=6mm" else ""
        n = cnn["sensitivity"][key]["nodules"]
        rows.append((f"Sensitivity {label} (n={n})", goal, cnn["sensitivity"][key]["value"],
                     base["sensitivity"][key]["value"]))
    rows.append(("False positives per scan", "≤ 1", cnn["false_positives_per_scan"],
                 base["false_positives_per_scan"]))
    rows.append(("Study-level AUC (nodule present)", "≥ 0.95", cnn["study_auc"], base["study_auc"]))
    lines = ["| Metric | Goal | CNN | Classical baseline |", "|---|---|---|---|"]
    lines += [f"| {name} | {goal} | {_fmt(c)} | {_fmt(b)} |" for name, goal, c, b in rows]
    return "\n".join(lines)


def write_card(card: Path, report: dict[str, Any]) -> None:
    """Replace the metrics section of the model card (between the markers) with this run's table."""
    text = card.read_text(encoding="utf-8")
    begin, end = text.find(CARD_BEGIN), text.find(CARD_END)
    if begin < 0 or end < begin:
        raise RuntimeError(f"{card} has no {CARD_BEGIN} … {CARD_END} section to fill")
    block = (f"{CARD_BEGIN}\n{report['cases']} held-out phantoms (seeds {report['seeds'][0]}–{report['seeds'][-1]}), "
             f"{report['nodules']} nodules, {report['scans_with_nodules']} scans with nodules; "
             f"`make evaluate` ({report['minutes']} min on {report['device']}).")
    point = report.get("operating_point")
    if point:
        block += (f" Operating point (`model.toml`): nodule probability ≥ {point['threshold']:g}, components "
                  f"peaking at ≥ {point['peak_threshold']:g} and of at least {point['min_size_mm3']:g} mm³.")
    block += f"\n\n{format_table(report)}\n"
    if "by_slice_thickness" in report:
        split = report["by_slice_thickness"]
        block += (f"\nThe same run by slice thickness (CNN / baseline): the node analyses series of at most "
                  f"{split['limit_mm']:g} mm (`[series] max_slice_thickness_mm`); the thicker phantoms (few "
                  f"slices over the chest) stay in the held-out set as a test of robustness.\n\n"
                  f"{format_thickness_table(split)}\n")
    if "stress" in report:
        stress = report["stress"]
        block += (f"\nRobustness: {stress['cases']} further held-out phantoms (seeds {stress['seeds'][0]}–"
                  f"{stress['seeds'][-1]}) under acquisitions the generator never produces "
                  f"({stress['minutes']} min):\n\n{format_stress_table(stress)}\n")
    card.write_text(text[:begin] + block + text[end:], encoding="utf-8")


def evaluate(bundle: Path, cases: int, workers: int) -> dict[str, Any]:
    """Evaluate ``cases`` held-out phantoms with ``workers`` processes; return the report."""
    from models.spec import load_spec

    seeds = [EVALUATION_SEED_BASE + i for i in range(cases)]
    started = time.perf_counter()
    results: list[dict[str, CaseScore]] = []
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        for i, result in enumerate(pool.map(evaluate_case, seeds, [bundle] * len(seeds)), start=1):
            results.append(result)
            logger.info("event=evaluated case=%d/%d cnn_lung_dice=%.3f cnn_fp=%d", i, len(seeds),
                        result["cnn"].lung_dice, result["cnn"].detection.false_positives)
    report: dict[str, Any] = {
        "cases": cases,
        "seeds": seeds,
        "nodules": sum(len(r["cnn"].detection.hits) for r in results),
        "scans_with_nodules": sum(r["cnn"].has_nodule for r in results),
        "cnn": summarize([r["cnn"] for r in results]),
        "baseline": summarize([r["baseline"] for r in results]),
        "minutes": round((time.perf_counter() - started) / 60.0, 1),
        "device": f"CPU, {workers} worker process(es)",
        "operating_point": operating_point(bundle),
    }
    limit = load_spec(bundle).series.max_slice_thickness_mm
    if limit is not None:
        report["by_slice_thickness"] = by_slice_thickness(results, float(limit))
    return report


def by_slice_thickness(results: Sequence[dict[str, Any]], limit_mm: float) -> dict[str, Any]:
    """The figures split at the bundle's thickest accepted slice: the series the node analyses
    (``accepted``: slices ≤ ``limit_mm``) and the thicker ones it refuses (``thicker``), which the
    held-out set keeps as a test of robustness."""
    out: dict[str, Any] = {"limit_mm": limit_mm}
    for key, keep in (("accepted", lambda t: t <= limit_mm), ("thicker", lambda t: t > limit_mm)):
        chosen = [r for r in results if keep(r["slice_thickness_mm"])]
        out[key] = {"cases": len(chosen), "cnn": summarize([r["cnn"] for r in chosen]) if chosen else None,
                    "baseline": summarize([r["baseline"] for r in chosen]) if chosen else None}
    return out


def format_thickness_table(split: dict[str, Any]) -> str:
    """A Markdown table of `by_slice_thickness`: one row per group, CNN / baseline per metric."""
    lines = ["| Slices | Scans | Nodule Dice | Sensitivity 6–10 mm | Sensitivity ≥ 6 mm | FP per scan |",
             "|---|---|---|---|---|---|"]
    limit = f"{split['limit_mm']:g}"
    for key, name in (("accepted", f"≤ {limit} mm (analysed by the node)"),
                      ("thicker", f"> {limit} mm (refused by the node's series criteria)")):
        group = split[key]
        c, b = group["cnn"], group["baseline"]
        if c is None:
            lines.append(f"| {name} | 0 | | | | |")
            continue
        sens = [f"{_fmt(c['sensitivity'][k]['value'])} / {_fmt(b['sensitivity'][k]['value'])} "
                f"(n={c['sensitivity'][k]['nodules']})" for k in ("6-10mm", ">=6mm")]
        lines.append(f"| {name} | {group['cases']} | {_fmt(c['nodule_dice'])} / {_fmt(b['nodule_dice'])} | "
                     f"{sens[0]} | {sens[1]} | "
                     f"{_fmt(c['false_positives_per_scan'])} / {_fmt(b['false_positives_per_scan'])} |")
    return "\n".join(lines)


def operating_point(bundle: Path) -> dict[str, float] | None:
    """The finding label's thresholds the evaluation ran with (from the bundle's ``model.toml``)."""
    from models.spec import load_spec

    finding = next((label for label in load_spec(bundle).labels if label.is_finding), None)
    if finding is None:
        return None
    return {"threshold": finding.threshold, "peak_threshold": finding.peak_threshold,
            "min_size_mm3": finding.min_size_mm3}


def evaluate_stress(bundle: Path, cases: int, workers: int) -> dict[str, Any]:
    """Each perturbation of `PERTURBATIONS` on ``cases`` other held-out phantoms: CNN and baseline."""
    seeds = [STRESS_SEED_BASE + i for i in range(cases)]
    jobs = [(seed, name) for name in PERTURBATIONS for seed in seeds]
    report: dict[str, Any] = {"cases": cases, "seeds": seeds, "perturbations": dict(PERTURBATIONS)}
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(evaluate_case, [s for s, _ in jobs], [bundle] * len(jobs), [n for _, n in jobs]))
    for name in PERTURBATIONS:
        chosen = [r for (_, n), r in zip(jobs, results) if n == name]
        report[name] = {"cnn": summarize([r["cnn"] for r in chosen]),
                        "baseline": summarize([r["baseline"] for r in chosen])}
    report["minutes"] = round((time.perf_counter() - started) / 60.0, 1)
    return report


def format_stress_table(stress: dict[str, Any]) -> str:
    """A Markdown table: one row per perturbation, CNN / baseline per metric."""
    lines = ["| Perturbation | Lung Dice (CNN / baseline) | Nodule Dice | Sensitivity ≥ 6 mm | FP per scan |",
             "|---|---|---|---|---|"]
    for name, what in stress["perturbations"].items():
        c, b = stress[name]["cnn"], stress[name]["baseline"]
        lines.append(f"| {name}: {what} | {_fmt(c['lung_dice'])} / {_fmt(b['lung_dice'])} | "
                     f"{_fmt(c['nodule_dice'])} / {_fmt(b['nodule_dice'])} | "
                     f"{_fmt(c['sensitivity']['>=6mm']['value'])} / {_fmt(b['sensitivity']['>=6mm']['value'])} | "
                     f"{_fmt(c['false_positives_per_scan'])} / {_fmt(b['false_positives_per_scan'])} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--cases", type=int, default=50, help="held-out phantoms (default 50)")
    parser.add_argument("--workers", type=int, default=2, help="processes (each runs one case)")
    parser.add_argument("--stress-cases", type=int, default=10,
                        help="phantoms per perturbation in the robustness table (0: skip it)")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    parser.add_argument("--write-card", action="store_true", help="write the table into the bundle's README.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    import torch

    torch.set_num_threads(max(1, (torch.get_num_threads() or 1) // max(1, args.workers)))
    report = evaluate(args.bundle, args.cases, args.workers)
    if args.stress_cases > 0:
        report["stress"] = evaluate_stress(args.bundle, args.stress_cases, args.workers)
    print(format_table(report))
    if "by_slice_thickness" in report:
        print()
        print(format_thickness_table(report["by_slice_thickness"]))
    if "stress" in report:
        print()
        print(format_stress_table(report["stress"]))
    out = args.json or (args.bundle / "evaluation.json")
    out.write_text(json.dumps(report, indent=2, default=float) + "\n")
    if args.write_card:
        write_card(args.bundle / "README.md", report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
