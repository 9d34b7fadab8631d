"""The detection-threshold calibration rule and figures, on hand-made scores."""

from __future__ import annotations

import pytest

from training.toyworld.detection_check import (
    asks_for,
    choose_threshold,
    detection_prompts,
    precision_recall,
    precision_recall_at,
)


def test_precision_recall_counts_image_by_image():
    asked = [True, True, True, False, False]
    flagged = [True, True, False, True, False]
    assert precision_recall(asked, flagged) == (2 / 3, 2 / 3)
    assert precision_recall([True, False], [True, False]) == (1.0, 1.0)
    assert precision_recall([True, True, False, False], [True, True, True, True]) == (0.5, 1.0)


def test_precision_recall_is_zero_when_nothing_is_flagged_or_asked():
    assert precision_recall([True, False], [False, False]) == (0.0, 0.0)
    assert precision_recall([False, False], [True, False]) == (0.0, 0.0)


def test_precision_recall_needs_one_flag_per_image():
    with pytest.raises(ValueError):
        precision_recall([True, False], [True])


def test_separable_scores_give_the_midpoint_of_the_gap():
    threshold = choose_threshold([0.9, 0.5, 1.1], [0.0, 0.3, 0.1])
    assert threshold == pytest.approx(0.4)
    assert precision_recall_at([0.9, 0.5, 1.1], [0.0, 0.3, 0.1], threshold) == (1.0, 1.0)


def test_a_score_at_a_threshold_is_flagged():
    assert precision_recall_at([0.5], [0.4999], 0.5) == (1.0, 1.0)
    assert precision_recall_at([0.4999], [0.5], 0.5) == (0.0, 0.0)


def test_touching_scores_are_an_overlap_not_a_gap():
    # max(other) == min(asked): no threshold separates them; ≥ 0.5 flags all three (P 2/3,
    # R 1), ≥ 0.9 only the top one (P 1, R 1/2). 0.5 is the lowest score: no gap below it.
    assert choose_threshold([0.5, 0.9], [0.5]) == 0.5


def test_overlapping_scores_give_the_gap_below_the_score_maximising_min_precision_recall():
    asked = [0.2, 0.6, 0.7, 0.8, 0.9]
    other = [0.0, 0.1, 0.3, 0.65]
    # Flagged at score ≥ t: t = 0.2 → P 5/7, R 1; 0.3 → P 4/6, R 4/5; 0.6 → P 4/5, R 4/5;
    # 0.65 → P 3/4, R 3/5; 0.7 → P 1, R 3/5. min(P, R) is largest (0.8) at 0.6; the
    # threshold is the midpoint between it and the next lower score, 0.3.
    threshold = choose_threshold(asked, other)
    assert threshold == pytest.approx(0.45)
    assert precision_recall_at(asked, other, threshold) == (0.8, 0.8)


def test_ties_go_to_the_lowest_score():
    # ≥ 0.4 → P 1/2, R 1/2; ≥ 0.5 → P 1, R 1/2: the same min; the lower, 0.4, wins (even
    # though 0.5 is more precise), moved down to the gap below it: (0.3 + 0.4) / 2.
    assert choose_threshold([0.1, 0.5], [0.2, 0.3, 0.4]) == pytest.approx(0.35)
    # ≥ 0.1 → P 1/2, R 1; ≥ 0.4 → P 1, R 1/2: 0.1, the lowest score, itself.
    assert choose_threshold([0.1, 0.4], [0.2, 0.3]) == 0.1


def test_choose_threshold_needs_both_kinds_of_scores():
    with pytest.raises(ValueError, match="asking for the concept"):
        choose_threshold([], [0.1])
    with pytest.raises(ValueError):
        choose_threshold([0.9], [])


def test_detection_prompts_follow_the_documented_scheme():
    subset = detection_prompts(1_200_000)
    full = detection_prompts(1_100_000, all_templates=True)
    assert (len(subset), len(full)) == (48 + 12, 48 * 3 + 12)  # × 2 images: 120 and 312
    assert subset[0] == ("a red circle on a plain background",
                         {"shape": "circle", "colour": "red", "background": "plain"},
                         1_200_000)
    assert subset[1][2] == 1_200_000 + (3 * 1 + 1) * 2  # combination 1 in template 1
    assert subset[48] == ("a circle on a plain background",
                          {"shape": "circle", "background": "plain"}, 1_200_500)
    same_seeds = {(p, s + 100_000) for p, _, s in full}  # the subset is part of the full set
    assert {(p, s) for p, _, s in subset} <= same_seeds
    seeds = [s + j for _, _, s in full for j in (0, 1)]
    assert len(set(seeds)) == 312
    assert asks_for(subset[0][1], "red") and not asks_for(subset[48][1], "red")
    assert asks_for(subset[48][1], "circle") and not asks_for(subset[0][1], "striped")
