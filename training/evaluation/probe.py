"""Why one hook point is not enough: activation patching on the toy pipeline.

For prompts asking for concept c, generate while the outputs of some cross-attention blocks
are replaced, call by call, by those of the same prompt and seed with c swapped for another
concept of its kind. If patching the steering hook point alone (up1.1) does not turn c into
the other concept, no edit at that block can remove c without touching what the other
blocks still inject; patching every cross-attention block shows what is reachable.
Run on the tuning split; prints a table (``python -m training.evaluation.probe``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from steering.hooks import from_tokens, to_tokens
from steering.pipeline import SteeredPipeline
from steering.recording import BlockFn, generate_with
from steering.sae import TopKSAE
from training.evaluation.prompts import ua_set
from training.toyworld.captions import compose
from training.toyworld.classifier import AttributeClassifier
from training.toyworld.world import KINDS, kind_of

HOOK_POINT_ONLY = ("up_blocks.1.attentions.1",)


def cross_attention_blocks(steered: SteeredPipeline) -> tuple[str, ...]:
    """Names of every Transformer2DModel block of the UNet (where the prompt enters)."""
    return tuple(n for n, m in steered.pipe.unet.named_modules()
                 if type(m).__name__ == "Transformer2DModel")


def _run(steered: SteeredPipeline, prompts: list[str], seeds: list[int], steps: int,
         guidance: float, blocks: Sequence[str], record: dict[str, list] | None,
         replay: dict[str, list] | None, sae: TopKSAE | None = None) -> list[Any]:
    """Generate once, recording or replaying the blocks' outputs step by step (each block
    runs once per UNet call)."""

    def at(name: str) -> BlockFn:
        def fn(step: int, timestep: int, row: int | None, x: Tensor) -> Tensor | None:
            if record is not None:
                record.setdefault(name, []).append(x.clone())
                return None
            assert replay is not None
            if sae is None:
                return replay[name][step]
            # SAE-space swap: keep this run's error term, take the other run's code
            ours, theirs = (sae(to_tokens(a)) for a in (x, replay[name][step]))
            return x + from_tokens(theirs - ours, x)
        return fn

    return generate_with(steered, prompts, seeds, steps, guidance, {n: at(n) for n in blocks})


def patch_probe(steered: SteeredPipeline, judge: AttributeClassifier, concept: str,
                blocks: Sequence[str], n: int = 32, steps: int = 20, guidance: float = 4.0,
                sae: TopKSAE | None = None) -> dict[str, float]:
    """Share of images without ``concept`` and share keeping the other kinds, when ``blocks``
    carry the activations of the prompt with the concept swapped (with ``sae``: only its
    reconstruction changes, x + SAE(swapped) − SAE(x), the best any code edit can do)."""
    kind = kind_of(concept)
    others = [c for c in KINDS[kind] if c != concept]
    items = ua_set(concept, n, split="tune").items
    prompts, swapped, seeds = [], [], []
    for i, item in enumerate(items):
        labels = dict(item.asked)
        prompts.append(compose(labels["shape"], labels["colour"], labels["background"], 0))
        labels[kind] = others[i % len(others)]
        swapped.append(compose(labels["shape"], labels["colour"], labels["background"], 0))
        seeds.append(item.seed)
    recorded: dict[str, list] = {}
    with torch.no_grad():
        _run(steered, swapped, seeds, steps, guidance, blocks, recorded, None)
        images = _run(steered, prompts, seeds, steps, guidance, blocks, None, recorded, sae)
    preds = judge.predict(images)
    removed = sum(p[kind] != concept for p in preds) / n
    kept = sum(all(p[k] == item.asked[k] for k in item.asked if k != kind)
               for p, item in zip(preds, items, strict=True)) / n
    return {"concept": concept, "blocks": len(blocks), "removed": removed, "others_kept": kept}


def main(concepts: Sequence[str] = ("red", "blue", "circle", "cross", "striped"),
         n: int = 32) -> None:  # about 4 min on 2 CPU cores
    """Print the probe for the hook point alone and for every cross-attention block."""
    steered = SteeredPipeline.from_pretrained(Path("assets/toy-pipeline"),
                                              Path("assets/toy-bundle"))
    judge = AttributeClassifier.from_pretrained(Path("assets/toy-classifier"))
    every = cross_attention_blocks(steered)
    print("| concept | patched blocks | c removed | other kinds kept |")
    print("| --- | --- | --- | --- |")
    for concept in concepts:
        for label, blocks, sae in (
                ("up1.1 (hook point)", HOOK_POINT_ONLY, None),
                ("up1.1, SAE code only (error term kept)", HOOK_POINT_ONLY, steered.sae),
                (f"all {len(every)} cross-attention", every, None)):
            r = patch_probe(steered, judge, concept, blocks, n, sae=sae)
            print(f"| {concept} | {label} | {r['removed']:.2f} | {r['others_kept']:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
