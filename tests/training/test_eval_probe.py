"""The activation-patching probe (training/evaluation/probe.py) replays what it recorded."""

from __future__ import annotations

import numpy as np

from steering.pipeline import SteeredPipeline
from tests.conftest import ASSETS
from training.evaluation import probe

PROMPTS = ["a red circle on a striped background", "a blue square on a plain background"]
SEEDS = [5, 6]


def arrays(images) -> list[np.ndarray]:
    return [np.asarray(im) for im in images]


def test_replaying_a_run_into_itself_changes_nothing_and_a_swap_changes_the_image():
    steered = SteeredPipeline.from_pretrained(ASSETS / "toy-pipeline", ASSETS / "toy-bundle")
    blocks = probe.cross_attention_blocks(steered)
    assert len(blocks) == 7 and probe.HOOK_POINT_ONLY[0] in blocks
    plain = arrays(probe._run(steered, PROMPTS, SEEDS, 4, 4.0, (), None, None))
    recorded: dict[str, list] = {}
    again = arrays(probe._run(steered, PROMPTS, SEEDS, 4, 4.0, blocks, recorded, None))
    assert all(len(calls) == 4 for calls in recorded.values())  # one per step (CFG batched)
    replayed = arrays(probe._run(steered, PROMPTS, SEEDS, 4, 4.0, blocks, None, recorded))
    assert all(np.array_equal(a, b) for a, b in zip(plain, again, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(plain, replayed, strict=True))
    # The other prompt's hook-point activations, replayed into this prompt, change its image;
    # through the SAE (x + SAE(other) − SAE(x)) too.
    swapped = {probe.HOOK_POINT_ONLY[0]: recorded[probe.HOOK_POINT_ONLY[0]]}
    other = PROMPTS[::-1]
    for sae in (None, steered.sae):
        patched = arrays(probe._run(steered, other, SEEDS, 4, 4.0, probe.HOOK_POINT_ONLY, None,
                                    swapped, sae))
        unpatched = arrays(probe._run(steered, other, SEEDS, 4, 4.0, (), None, None))
        assert not np.array_equal(patched[0], unpatched[0])
