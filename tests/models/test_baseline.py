import numpy as np

from models.baseline import detect_nodules_classical


def _lung_with(structures: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    hu = np.full((40, 64, 64), -850.0, dtype=np.float32)
    lung = np.ones(hu.shape, bool)
    lung[:, :, :2] = lung[:, :, -2:] = False
    for mask in structures:
        hu[mask] = 30.0
        lung[mask] = False  # a classical lung mask leaves dense structures out: holes to fill
    return hu, lung


def test_baseline_keeps_a_round_nodule_and_drops_a_vessel() -> None:
    z, y, x = np.mgrid[:40, :64, :64]
    nodule = (z - 20) ** 2 + (y - 20) ** 2 + (x - 20) ** 2 <= 4**2
    vessel = ((y - 45) ** 2 + (x - 45) ** 2 <= 1.5**2) & (z > 3) & (z < 37)
    hu, lung = _lung_with([nodule, vessel])
    result = detect_nodules_classical(hu, lung, (1.0, 1.0, 1.0))
    assert result.nodule_mask[20, 20, 20]
    assert not result.nodule_mask[vessel].any()
    assert len(result.component_scores) == 1
    assert result.study_score > 0.5


def test_baseline_reports_nothing_in_clear_lungs() -> None:
    hu, lung = _lung_with([])
    result = detect_nodules_classical(hu, lung, (1.0, 1.0, 1.0))
    assert not result.nodule_mask.any()
    assert result.study_score == 0.0
