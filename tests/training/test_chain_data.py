"""The toy world's input files for the generic bundle commands: formats, coverage, seeds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from training.toyworld import chain_data as D
from training.toyworld.world import KINDS, SYNONYMS


def _words(kind: str) -> set[str]:
    return set(KINDS[kind]) | {w for c in KINDS[kind] for w in SYNONYMS.get(c, ())}


def test_detector_runs_leave_kinds_unnamed_in_thirds() -> None:
    rows = D.detector_rows(300)
    named = [sum(any(w in r["prompt"].split() for w in _words(k)) for k in KINDS)
             for r in rows]
    assert {n: named.count(n) for n in set(named)} == {3: 100, 2: 100, 1: 100}
    seeds = [r["seed"] for r in rows]
    assert len(set(seeds)) == 300 and min(seeds) == D.DETECTOR_SEED_BASE


def test_tune_prompts_name_the_concept_another_or_none() -> None:
    rows = D.tune_rows("red", 30)
    colours = [next((c for c in KINDS["colour"] if c in r["prompt"].split()), None)
               for r in rows]
    assert colours[0::3] == ["red"] * 10
    assert all(c not in (None, "red") for c in colours[1::3])
    assert colours[2::3] == [None] * 10
    assert not {r["seed"] for r in rows} & {r["seed"] for r in D.tune_rows("green", 30)}
    with pytest.raises(ValueError, match="other concepts"):
        D.candidates_of("red", ["circle"])


def test_cli_writes_every_file(tmp_path: Path) -> None:
    from training.toyworld.cli import app

    res = CliRunner().invoke(app, ["chain-data", "--out", str(tmp_path),
                                   "--concepts", "red", "--pairs", "3", "--runs", "6",
                                   "--tune", "6"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "pairs").iterdir()) == [
        "red-blue.jsonl", "red-green.jsonl", "red-yellow.jsonl"]
    pair = json.loads((tmp_path / "pairs" / "red-green.jsonl").read_text().splitlines()[0])
    assert set(pair) == {"prompt", "counterfactual", "seed"}
    assert pair["counterfactual"] == pair["prompt"].replace("red", "green")
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 6
    assert len((tmp_path / "tune" / "red.jsonl").read_text().splitlines()) == 6
