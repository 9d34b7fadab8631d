"""The toy world's pieces: renderer, captions, tokenizer, resumable training loop."""

from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

from training.toyworld.captions import canonical_caption, caption
from training.toyworld.loop import train
from training.toyworld.render import _RGB, random_scene, render
from training.toyworld.tokenizer import build_clip_tokenizer
from training.toyworld.world import (
    BACKGROUNDS,
    COLOURS,
    KINDS,
    SHAPES,
    SYNONYMS,
    Scene,
    kind_of,
)


def test_world_has_enough_concepts_of_each_kind():
    assert len(SHAPES) >= 4 and len(COLOURS) >= 4 and len(BACKGROUNDS) >= 3
    assert kind_of("red") == "colour" and kind_of("striped") == "background"


def test_render_is_deterministic_and_shows_the_colour_at_the_centre():
    for colour in COLOURS:
        scene = random_scene(np.random.default_rng(1), colour=colour, shape="square")
        a = render(scene, np.random.default_rng(2))
        b = render(scene, np.random.default_rng(2))
        assert a.shape == (32, 32, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
        centre = a[round(scene.cy - 0.5), round(scene.cx - 0.5)].astype(int)
        assert np.abs(centre - np.array(_RGB[colour])).max() <= 20


def test_backgrounds_differ_in_texture():
    rng = np.random.default_rng(0)
    stds = {}
    for bg in BACKGROUNDS:
        scene = Scene("circle", "red", bg, cx=16.0, cy=24.0, size=6.0)
        stds[bg] = render(scene, rng)[:8].std()  # the top rows are background only
    assert stds["plain"] < 1 < stds["striped"] and stds["dotted"] > 1


def test_captions_vary_leave_out_attributes_and_use_synonyms():
    rng = np.random.default_rng(0)
    caps = [caption(random_scene(rng), rng) for _ in range(3000)]
    words = Counter(w for c in caps for w in c.replace(",", "").split())
    for concept in (*SHAPES, *COLOURS, *BACKGROUNDS):
        assert words[concept] > 0
    for synonyms in SYNONYMS.values():
        assert all(words[s] > 0 for s in synonyms)
    assert words["shape"] > 0  # shape left out
    assert any(c.startswith("a ") and "background" not in c for c in caps)  # background left out
    assert any(c.endswith("background, a shape") or ", a " in c for c in caps)  # template 1
    assert any(" in " in c for c in caps)  # template 2
    scene = random_scene(rng, shape="cross", colour="blue", background="dotted")
    assert canonical_caption(scene) == "a blue cross on a dotted background"


def test_tokenizer_is_clip_bpe(tmp_path):
    tok = build_clip_tokenizer(tmp_path)
    assert len(tok) == 49408
    assert tok("a red circle").input_ids == [49406, 320, 736, 7117, 49407]
    assert tok.model_max_length == 32


def test_training_loop_resumes_to_the_same_weights(tmp_path):
    def run(total, path, stop_after=None):
        torch.manual_seed(0)
        model = nn.Linear(4, 2)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

        def step_fn(step):
            if stop_after is not None and step == stop_after:
                raise KeyboardInterrupt  # simulates a kill after a checkpoint
            g = torch.Generator().manual_seed(step)
            x = torch.randn(8, 4, generator=g)
            return model(x).pow(2).mean()

        train("t", {"m": model}, opt, total, step_fn, path, warmup=2, save_every=3)
        return model

    full = run(6, tmp_path / "a.pt")
    with pytest.raises(KeyboardInterrupt):
        run(6, tmp_path / "b.pt", stop_after=4)
    resumed = run(6, tmp_path / "b.pt")
    for p, q in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    assert set(KINDS) == {"shape", "colour", "background"}
