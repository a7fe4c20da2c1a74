"""`make evaluate`: perturbations, aggregation and the model card's metrics section."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.evaluate import (
    CARD_BEGIN,
    CARD_END,
    CaseScore,
    by_slice_thickness,
    format_stress_table,
    format_table,
    format_thickness_table,
    perturb,
    summarize,
    write_card,
)
from models.metrics import DetectionResult


def _score(lung: float, nodule: float | None, hits: tuple[bool, ...], diameters: tuple[float, ...], fp: int,
           study: float, has: bool) -> CaseScore:
    return CaseScore(lung, nodule, DetectionResult(hits, diameters, fp, sum(hits) + fp), study, has)


def _report() -> dict:
    cnn = [_score(0.96, 0.8, (True, False), (12.0, 4.0), 1, 0.9, True), _score(0.98, None, (), (), 0, 0.1, False)]
    base = [_score(0.90, 0.5, (False, False), (12.0, 4.0), 3, 0.4, True), _score(0.92, None, (), (), 2, 0.6, False)]
    return {"cases": 2, "seeds": [30000, 30001], "nodules": 2, "scans_with_nodules": 1,
            "cnn": summarize(cnn), "baseline": summarize(base), "minutes": 0.1, "device": "CPU"}


def test_summary_averages_per_scan_and_counts_detections_by_size() -> None:
    report = _report()
    assert report["cnn"]["lung_dice"] == pytest.approx(0.97)
    assert report["cnn"]["nodule_dice"] == pytest.approx(0.8)  # scans without nodules do not count
    assert report["cnn"]["sensitivity"][">10mm"]["value"] == 1.0
    assert report["cnn"]["sensitivity"]["<6mm"]["value"] == 0.0
    assert report["cnn"]["false_positives_per_scan"] == pytest.approx(0.5)
    assert report["cnn"]["study_auc"] == 1.0 and report["baseline"]["study_auc"] == 0.0


def test_card_section_between_the_markers_is_replaced_and_the_rest_kept(tmp_path: Path) -> None:
    card = tmp_path / "README.md"
    card.write_text(f"# Card\nbefore\n{CARD_BEGIN}\nold table\n{CARD_END}\nafter\n", encoding="utf-8")
    report = _report()
    report["operating_point"] = {"threshold": 0.4, "peak_threshold": 0.8, "min_size_mm3": 14.0}
    report["stress"] = {"cases": 2, "seeds": [40000, 40001], "minutes": 0.2,
                        "perturbations": {"low_dose": "noise"},
                        "low_dose": {"cnn": report["cnn"], "baseline": report["baseline"]}}
    write_card(card, report)
    text = card.read_text(encoding="utf-8")
    assert "old table" not in text and text.startswith("# Card\nbefore\n") and text.endswith(f"{CARD_END}\nafter\n")
    assert format_table(report) in text and format_stress_table(report["stress"]) in text
    assert "| Lung Dice | ≥ 0.95 | 0.970 | 0.910 |" in text
    assert "| low_dose: noise | 0.970 / 0.910 |" in text
    assert "nodule probability ≥ 0.4, components peaking at ≥ 0.8 and of at least 14 mm³" in text


def test_figures_are_split_at_the_thickest_slice_the_node_accepts(tmp_path: Path) -> None:
    thin = {"cnn": _score(0.96, 0.8, (True, True), (12.0, 7.0), 0, 0.9, True),
            "baseline": _score(0.90, 0.5, (False, False), (12.0, 7.0), 3, 0.4, True), "slice_thickness_mm": 5.0}
    thick = {"cnn": _score(0.95, 0.4, (False,), (8.0,), 2, 0.3, True),
             "baseline": _score(0.90, 0.1, (False,), (8.0,), 5, 0.4, True), "slice_thickness_mm": 7.5}
    split = by_slice_thickness([thin, thick, dict(thin, slice_thickness_mm=1.25)], 5.0)
    assert split["accepted"]["cases"] == 2 and split["thicker"]["cases"] == 1
    assert split["accepted"]["cnn"]["sensitivity"][">=6mm"] == {"value": 1.0, "nodules": 4}
    assert split["thicker"]["cnn"]["sensitivity"][">=6mm"] == {"value": 0.0, "nodules": 1}
    assert split["thicker"]["cnn"]["false_positives_per_scan"] == 2.0
    table = format_thickness_table(split)
    assert "| ≤ 5 mm (analysed by the node) | 2 | 0.800 / 0.500 | 1.000 / 0.000 (n=2) | 1.000 / 0.000 (n=4) | 0.000 / 3.000 |" in table
    assert "| > 5 mm (refused by the node's series criteria) | 1 | 0.400 / 0.100 |" in table
    card = tmp_path / "README.md"
    card.write_text(f"{CARD_BEGIN}\n{CARD_END}\n", encoding="utf-8")
    report = _report()
    report["by_slice_thickness"] = split
    write_card(card, report)
    assert table in card.read_text(encoding="utf-8")
    empty = by_slice_thickness([thin], 5.0)
    assert empty["thicker"] == {"cases": 0, "cnn": None, "baseline": None}
    assert "| > 5 mm (refused by the node's series criteria) | 0 |" in format_thickness_table(empty)


def test_card_without_markers_is_an_error(tmp_path: Path) -> None:
    card = tmp_path / "README.md"
    card.write_text("# Card\n", encoding="utf-8")
    with pytest.raises(RuntimeError, match="metrics:begin"):
        write_card(card, _report())


def test_perturbations_are_deterministic_and_do_what_they_say() -> None:
    rng = np.random.default_rng(0)
    hu = rng.normal(-850.0, 20.0, (16, 32, 32)).astype(np.float32)
    assert np.allclose(perturb(hu, "miscalibrated", (1, 1, 1), 5), hu * 1.05 + 40.0)
    noisy = perturb(hu, "low_dose", (1, 1, 1), 5)
    assert np.array_equal(noisy, perturb(hu, "low_dose", (1, 1, 1), 5))
    assert np.std(noisy - hu) == pytest.approx(60.0, rel=0.05)
    smooth = perturb(hu, "soft_kernel", (2.0, 0.7, 0.7), 5)
    assert smooth.std() < 0.5 * hu.std() and abs(float(smooth.mean() - hu.mean())) < 1.0
    with pytest.raises(ValueError, match="unknown perturbation"):
        perturb(hu, "motion", (1, 1, 1), 5)
