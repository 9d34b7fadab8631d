"""UA / IRA / CRA on hand-built judgements, and the Wilson interval against known values."""

from __future__ import annotations

import math

import pytest

from training.evaluation.metrics import Judged, Rate, steering_metrics, wilson_interval

KIND_OF = {"red": "colour", "blue": "colour", "green": "colour", "circle": "shape",
           "square": "shape", "plain": "background"}


def judged(asked: dict[str, str], predicted: dict[str, str]) -> Judged:
    return Judged(asked, predicted)


def test_wilson_interval_matches_known_values() -> None:
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 1.0
    lo, hi = wilson_interval(380, 400)  # about ±2 points at 400 trials
    assert hi - lo < 0.05
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_ua_ira_cra_count_the_right_images() -> None:
    images = [
        # asks red: red gone (UA ok), shape kept (CRA ok)
        judged({"colour": "red", "shape": "circle"}, {"colour": "blue", "shape": "circle"}),
        # asks red: red still there (UA miss), shape lost (CRA miss)
        judged({"colour": "red", "shape": "circle"}, {"colour": "red", "shape": "square"}),
        # asks blue: blue kept (IRA ok), background kept (CRA ok)
        judged({"colour": "blue", "background": "plain"},
               {"colour": "blue", "background": "plain"}),
        # asks green: turned blue (IRA miss); no other kind asked: not in CRA
        judged({"colour": "green"}, {"colour": "blue"}),
        # asks no colour: neither UA nor IRA; shape kept (CRA ok)
        judged({"shape": "square"}, {"colour": "red", "shape": "square"}),
    ]
    m = steering_metrics(images, {"red"}, KIND_OF)
    assert m["UA"] == Rate(1, 2) and m["IRA"] == Rate(1, 2) and m["CRA"] == Rate(3, 4)
    assert m["UA"].to_dict()["value"] == 0.5


def test_several_suppressed_concepts_and_kinds() -> None:
    images = [judged({"colour": "red", "shape": "circle", "background": "plain"},
                     {"colour": "green", "shape": "square", "background": "plain"}),
              judged({"colour": "blue", "shape": "square", "background": "plain"},
                     {"colour": "blue", "shape": "square", "background": "dotted"})]
    m = steering_metrics(images, {"red", "circle"}, KIND_OF)
    # image 1: red gone and circle gone (one image removed); image 2: blue and square kept
    assert m["UA"] == Rate(1, 1) and m["IRA"] == Rate(2, 2)
    assert m["CRA"] == Rate(1, 2)  # only the background is another kind: lost in image 2
    with pytest.raises(ValueError, match="unknown concept"):
        steering_metrics(images, {"purple"}, KIND_OF)
    with pytest.raises(ValueError, match="at least one"):
        steering_metrics(images, set(), KIND_OF)


def test_a_concept_swapped_for_another_suppressed_one_is_not_removed() -> None:
    """Several concepts at once: an image is removed only when the judge finds none of the
    suppressed concepts — red turned green with green suppressed too still shows one."""
    images = [judged({"colour": "red", "shape": "circle"}, {"colour": "green", "shape": "circle"}),
              judged({"colour": "red", "shape": "circle"}, {"colour": "blue", "shape": "circle"}),
              judged({"colour": "green", "shape": "square"}, {"colour": "red", "shape": "square"})]
    m = steering_metrics(images, {"red", "green"}, KIND_OF)
    assert m["UA"] == Rate(1, 3)
    # across kinds: red gone but the suppressed circle is still there
    images = [judged({"colour": "red", "shape": "circle"}, {"colour": "blue", "shape": "circle"})]
    assert steering_metrics(images, {"red", "circle"}, KIND_OF)["UA"] == Rate(0, 1)


def test_implicit_metrics_pair_each_image_with_its_unedited_version() -> None:
    from training.evaluation.metrics import Paired, implicit_metrics

    pairs = [
        Paired({"colour": "red", "shape": "circle"}, {"colour": "green", "shape": "circle"}, True),
        Paired({"colour": "red", "shape": "circle"}, {"colour": "red", "shape": "circle"}, True),
        # no red unedited: untouched (no false edit, kept)
        Paired({"colour": "blue", "shape": "square"}, {"colour": "blue", "shape": "square"}, False),
        # no red unedited, but edited: a false edit that also lost the shape
        Paired({"colour": "blue", "shape": "square"}, {"colour": "blue", "shape": "circle"}, True),
    ]
    m = implicit_metrics(pairs, "red")
    assert m["removal"] == Rate(1, 2)
    assert m["false_edits"] == Rate(1, 2)
    assert m["kept"] == Rate(1, 2)
