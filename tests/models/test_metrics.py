import numpy as np
import pytest

from models.metrics import TrueNodule, dice, match_detections, roc_auc, sensitivity_by_size


def test_dice_of_identical_masks_is_one_and_of_disjoint_masks_zero() -> None:
    a = np.zeros((4, 4, 4), bool)
    a[1:3, 1:3, 1:3] = True
    b = np.zeros_like(a)
    b[0, 0, 0] = True
    assert dice(a, a) == 1.0
    assert dice(a, b) == 0.0
    assert dice(np.zeros_like(a), np.zeros_like(a)) == 1.0


def test_dice_counts_partial_overlap() -> None:
    a = np.zeros((1, 1, 4), bool)
    b = np.zeros_like(a)
    a[..., :2] = True
    b[..., 1:3] = True
    assert dice(a, b) == pytest.approx(0.5)


def test_detection_counts_hits_misses_and_false_positives() -> None:
    truth = np.zeros((20, 20, 20), np.uint8)
    truth[2:5, 2:5, 2:5] = 1
    truth[12:16, 12:16, 12:16] = 1
    pred = np.zeros(truth.shape, bool)
    pred[3:5, 3:5, 3:5] = True  # hits the first nodule
    pred[8, 0, 0] = True  # false positive
    nodules = [TrueNodule((3, 3, 3), 4.0), TrueNodule((13.5, 13.5, 13.5), 12.0)]
    result = match_detections(pred, truth, nodules)
    assert result.hits == (True, False)
    assert result.false_positives == 1
    sens = sensitivity_by_size([result])
    assert sens["<6mm"] == (1.0, 1)
    assert sens[">10mm"] == (0.0, 1)
    assert np.isnan(sens["6-10mm"][0])


def test_auc_is_one_for_perfect_ranking_and_half_for_ties() -> None:
    assert roc_auc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 1.0
    assert roc_auc([0.5, 0.5, 0.5, 0.5], [False, True, False, True]) == 0.5
    assert roc_auc([0.9, 0.1], [False, True]) == 0.0
