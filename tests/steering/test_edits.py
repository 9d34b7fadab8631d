"""Concept edit parsing and validation against the bundle's concept specs."""

import json
import re
from pathlib import Path

import pytest

from steering.concepts import ConceptSpec
from steering.edits import ConceptEdit, Direction, EditError, check_closed_kinds, resolve_edits
from steering.manifest import BundleError, BundleManifest

TOY_MANIFEST = Path(__file__).resolve().parents[2] / "assets" / "toy-bundle" / "manifest.json"

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


# -- closed kinds (bundle format 5) ----------------------------------------------------------

def _closed(*kinds: str) -> BundleManifest:
    return BundleManifest.from_dict(json.loads(TOY_MANIFEST.read_text()) | {
        "closed_kinds": list(kinds)})


def _of_kind(m: BundleManifest, kind: str) -> list[str]:
    return [c.name for c in m.concepts if c.kind == kind]


def test_suppressing_every_concept_of_a_closed_kind_is_refused():
    m = _closed("colour")
    colours = _of_kind(m, "colour")
    with pytest.raises(EditError) as ei:
        check_closed_kinds([*colours, _of_kind(m, "shape")[0]], m)
    assert ei.value.field == "concepts"
    msg = str(ei.value)
    assert "kind 'colour' is closed" in msg and ", ".join(colours) in msg
    assert "no counterfactual" in msg and "keep at least one" in msg
    check_closed_kinds(colours[1:], m)  # one colour left: fine
    check_closed_kinds(_of_kind(m, "shape"), m)  # shape is not closed here
    check_closed_kinds(colours, _closed())  # no closed kinds: anything goes


def test_closed_kinds_round_trip_and_must_name_a_bundle_kind():
    text = TOY_MANIFEST.read_text()
    assert BundleManifest.from_json(text).to_json() == text  # unset: not written, same bytes
    m = _closed("colour", "shape")
    back = BundleManifest.from_json(m.to_json())
    assert back.closed_kinds == ["colour", "shape"] and back == m
    assert list(back.to_dict())[-1] == "closed_kinds"
    with pytest.raises(BundleError, match=r"closed_kinds names \['size'\], which no concept "
                       r"has; the bundle's kinds are"):
        _closed("size")
    with pytest.raises(BundleError, match=r"closed_kinds\[0\]: must be a non-empty string"):
        _closed(" ")
