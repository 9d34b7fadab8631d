"""Prompt files: round trip, errors naming line and field, concept kinds."""

import pytest

from training.activations.prompts import (
    PromptFileError,
    PromptRecord,
    concept_kinds,
    load_prompts,
    write_prompts,
)


def test_round_trip(tmp_path):
    recs = [PromptRecord(0, "a red circle", {"shape": "circle", "colour": "red"}, 12),
            PromptRecord(1, "a square", {}, 3, negative_prompt="blurry")]
    write_prompts(tmp_path / "p.jsonl", recs)
    assert load_prompts(tmp_path / "p.jsonl") == recs
    assert '"concepts": {"colour": "red", "shape": "circle"}' in (tmp_path / "p.jsonl").read_text()


@pytest.mark.parametrize("line, match", [
    ('{"prompt": "x", "seed": -1}', "line 2: field 'seed'"),
    ('{"prompt": "", "seed": 1}', "line 2: field 'prompt'"),
    ('{"prompt": "x", "seed": 1, "concepts": {"colour": 3}}', "line 2: field 'concepts'"),
    ('{"prompt": "x", "seed": 1, "label": "y"}', "line 2: field 'label'"),
    ('{"prompt": "x", "seed": 1', "line 2: not valid JSON"),
    ('', "line 2: empty line"),
])
def test_errors_name_line_and_field(tmp_path, line, match):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok", "seed": 0}\n' + line + '\n{"prompt": "ok", "seed": 0}\n')
    with pytest.raises(PromptFileError, match=match):
        load_prompts(path)


def test_concept_kinds_sorted_and_unique():
    recs = [PromptRecord(0, "p", {"shape": "square", "colour": "red"}, 0),
            PromptRecord(1, "p", {"colour": "blue", "shape": "circle"}, 1)]
    assert list(concept_kinds(recs).items()) == [
        ("blue", "colour"), ("red", "colour"), ("circle", "shape"), ("square", "shape")]
    with pytest.raises(PromptFileError, match="'red' is labelled with two kinds"):
        concept_kinds([*recs, PromptRecord(2, "p", {"background": "red"}, 2)])
