"""Concept edit parsing and validation against the bundle's concept specs."""

import re

import pytest

from steering.concepts import ConceptSpec
from steering.edits import ConceptEdit, Direction, EditError, resolve_edits

SPECS = {
    "red": ConceptSpec("red", "colour", 5.0, (1.0, 30.0), 99.0),
    "circle": ConceptSpec("circle", "shape", 3.0, (1.0, 10.0), 98.0),
}


def test_parse_forms():
    assert ConceptEdit.parse("red") == ConceptEdit("red")
    assert ConceptEdit.parse("red:20") == ConceptEdit("red", 20.0)
    assert ConceptEdit.parse("-red:20:99.5") == ConceptEdit("red", 20.0, 99.5)
    assert ConceptEdit.parse("+blue:5") == ConceptEdit("blue", 5.0, direction=Direction.AMPLIFY)
    with pytest.raises(EditError, match="must be numbers"):
        ConceptEdit.parse("red:lots")
    with pytest.raises(EditError, match="cannot parse"):
        ConceptEdit.parse("red:1:2:3")


def test_defaults_filled_and_gamma_zero_is_off():
    red, circle = resolve_edits([ConceptEdit("red"), ConceptEdit("circle", 0.0)], SPECS)
    assert (red.gamma, red.percentile, red.direction) == (5.0, 99.0, Direction.SUPPRESS)
    assert red.active and not circle.active


@pytest.mark.parametrize(
    ("edit", "field", "words"),
    [
        (ConceptEdit("purple"), "concept", "known: red, circle"),
        (ConceptEdit("red", 31.0), "gamma", "[1.0, 30.0]"),
        (ConceptEdit("red", 0.5), "gamma", "outside its range"),
        (ConceptEdit("red", None, 100.0), "percentile", "[0, 100)"),
        (ConceptEdit("red", float("nan")), "gamma", "outside"),
    ],
)
def test_invalid_edits_name_the_field(edit, field, words):
    with pytest.raises(EditError, match=re.escape(words)) as err:
        resolve_edits([edit], SPECS)
    assert err.value.field == field


def test_no_bundle_lists_none():
    with pytest.raises(EditError, match="no steering bundle"):
        resolve_edits([ConceptEdit("red")], {})
