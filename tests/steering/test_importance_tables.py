"""Tests for importance tables: nearest-row lookup, feature selection, storage, validation."""

import pytest
import torch

from steering.importance_tables import ImportanceTables

C, N = 3, 50


def _tables(timesteps: list[int]) -> ImportanceTables:
    g = torch.Generator().manual_seed(0)
    t = len(timesteps)
    return ImportanceTables(
        concepts=["red", "green", "circle"],
        scores=torch.randn(C, t, N, generator=g),
        means=torch.rand(C, t, N, generator=g),
        timesteps=torch.tensor(timesteps),
    )


def test_nearest_row_lookup() -> None:
    tabs = _tables([980, 780, 580, 380, 180])  # DDIM 5 steps, descending like diffusers
    assert tabs.row_for_timestep(980) == 0
    assert tabs.row_for_timestep(999) == 0
    assert tabs.row_for_timestep(700) == 1
    assert tabs.row_for_timestep(680) == 1  # tie between 780 and 580 -> first row
    assert tabs.row_for_timestep(0) == 4
    # a request with 10 steps maps onto the 5-row table
    ten = list(range(900, -1, -100))
    assert tabs.rows_for_timesteps(ten) == [0, 1, 1, 2, 2, 3, 3, 4, 4, 4]
    # and a 3-step request
    assert tabs.rows_for_timesteps([999, 666, 333]) == [0, 2, 3]


def test_selected_features_match_quantile() -> None:
    tabs = _tables([900, 500, 100])
    for pct in (0.0, 50.0, 90.0, 99.0):
        for c in range(C):
            for row in range(3):
                s = tabs.scores[c, row]
                q = torch.quantile(s, pct / 100, interpolation="linear")
                expect = torch.tensor(sorted(j for j in range(N) if s[j] > q), dtype=torch.int64)
                got = tabs.selected_features(c, row, pct)
                assert got.dtype == torch.int64
                assert torch.equal(got, expect)
    by_name = tabs.selected_features("green", 1, 90.0)
    assert torch.equal(by_name, tabs.selected_features(1, 1, 90.0))
    assert tabs.selected_features("green", 1, 90.0) is by_name  # cached
    assert len(tabs.selected_features("red", 0, 99.0)) == 1
    with pytest.raises(ValueError, match="percentile"):
        tabs.selected_features(0, 0, 100.0)


def test_unknown_concept_lists_known() -> None:
    tabs = _tables([1, 2])
    with pytest.raises(KeyError) as ei:
        tabs.concept_index("blue")
    assert "red, green, circle" in str(ei.value)


def test_save_load_roundtrip(tmp_path) -> None:
    tabs = _tables([900, 500, 100])
    path = tmp_path / "importance.safetensors"
    tabs.save(path)
    back = ImportanceTables.load(path)
    assert back.concepts == tabs.concepts
    assert torch.equal(back.scores, tabs.scores) and back.scores.dtype == torch.float32
    assert torch.equal(back.means, tabs.means)
    assert torch.equal(back.timesteps, tabs.timesteps) and back.timesteps.dtype == torch.int64


def test_validate_names_tensor_and_shapes() -> None:
    with pytest.raises(ValueError, match=r"means has shape \[3, 2, 49\].*\[3, 2, 50\]"):
        ImportanceTables(["a", "b", "c"], torch.zeros(3, 2, 50), torch.zeros(3, 2, 49),
                         torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"timesteps has shape \[3\]"):
        ImportanceTables(["a", "b", "c"], torch.zeros(3, 2, 50), torch.zeros(3, 2, 50),
                         torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="concepts lists 2 names"):
        ImportanceTables(["a", "b"], torch.zeros(3, 2, 50), torch.zeros(3, 2, 50),
                         torch.tensor([1, 2]))
