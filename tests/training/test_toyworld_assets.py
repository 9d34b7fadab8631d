"""The shipped toy assets: size, offline loading, classifier accuracy, generation quality,
and proof that the conditioning flows through the hooked block."""

import json
import os

import numpy as np
import pytest
import torch
from diffusers.hooks import ModelHook
from typer.testing import CliRunner

from steering.cli import app
from steering.hooks import attached, output_tensor, replace_output
from steering.pipeline import GenerationRequest, SteeredPipeline
from tests.conftest import ASSETS, make_bundle
from training.toyworld.captions import canonical_caption
from training.toyworld.classifier import AttributeClassifier
from training.toyworld.data import labels, to_tensor
from training.toyworld.render import random_scene, render_batch
from training.toyworld.world import KINDS

PIPELINE = ASSETS / "toy-pipeline"
CLASSIFIER = ASSETS / "toy-classifier"


@pytest.fixture(scope="module")
def steered():
    os.environ["HF_HUB_OFFLINE"] = "1"
    return SteeredPipeline.from_pretrained(PIPELINE)


@pytest.fixture(scope="module")
def classifier():
    return AttributeClassifier.from_pretrained(CLASSIFIER)


def test_assets_are_small_and_documented():
    size = sum(f.stat().st_size for d in (PIPELINE, CLASSIFIER) for f in d.rglob("*"))
    assert size <= 20e6
    assert "steer toyworld build" in (ASSETS / "BUILD.md").read_text()
    figures = json.loads((ASSETS / "toyworld-eval.json").read_text())
    assert set(figures["generation"]["full_caption"]) == set(KINDS)


def test_shipped_tokenizer_is_the_training_tokenizer(steered, tmp_path):
    from training.toyworld.tokenizer import build_clip_tokenizer

    reference = build_clip_tokenizer(tmp_path)
    for text in ("a red circle on a striped background", "a crimson box", ""):
        assert steered.pipe.tokenizer(text).input_ids == reference(text).input_ids
    assert steered.pipe.tokenizer("a red circle").input_ids == [49406, 320, 736, 7117, 49407]


def test_pipeline_is_fp16_on_disk_with_ddim_without_clipping():
    config = json.loads((PIPELINE / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "DDIMScheduler" and config["clip_sample"] is False
    from safetensors import safe_open

    with safe_open(str(PIPELINE / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16


@torch.no_grad()
def test_classifier_accuracy_on_held_out_renders(classifier):
    images, scenes = render_batch(np.random.default_rng(424242), 400)
    logits = classifier(to_tensor(images))
    y = labels(scenes)
    for i, kind in enumerate(KINDS):
        assert (logits[kind].argmax(-1) == y[:, i]).float().mean() >= 0.98, kind


def test_generated_images_show_the_prompt(steered, classifier):
    rng = np.random.default_rng(77)
    scenes = [random_scene(rng) for _ in range(16)]
    images = steered.pipe(
        prompt=[canonical_caption(s) for s in scenes], num_inference_steps=20,
        guidance_scale=4.0, generator=[torch.Generator().manual_seed(900 + i) for i in range(16)],
    ).images
    preds = classifier.predict(images)
    for kind in KINDS:
        hits = sum(p[kind] == s.label(kind) for p, s in zip(preds, scenes, strict=True))
        assert hits >= 14, (kind, hits)


class SwapCondHalves(ModelHook):
    """Swaps the cond activations of the first and second half of the prompts."""

    def post_forward(self, module, output):
        x = output_tensor(output)
        uncond, cond = x.chunk(2)
        a, b = cond.chunk(2)
        return replace_output(output, torch.cat([uncond, b, a]))


def test_conditioning_flows_through_the_hooked_block(steered, classifier):
    seeds = list(range(4))
    prompts = (["a red square on a plain background"] * 4
               + ["a blue square on a plain background"] * 4)

    def colours(hooks):
        with attached(hooks):
            images = steered.pipe(
                prompt=prompts, num_inference_steps=20, guidance_scale=4.0,
                generator=[torch.Generator().manual_seed(s) for s in seeds + seeds]).images
        return [p["colour"] for p in classifier.predict(images)]

    plain = colours([])
    swapped = colours([(steered.block, "swap", SwapCondHalves())])
    assert plain == ["red"] * 4 + ["blue"] * 4
    changed = sum(a != b for a, b in zip(plain, swapped, strict=True))
    assert changed >= 6, swapped


def test_steer_generate_offline_writes_images_and_sheet(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bundle = make_bundle(PIPELINE, tmp_path / "bundle", steps=20)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "generate", "--prompt", "a red circle", "--pipeline", str(PIPELINE),
        "--bundle", str(bundle), "--concept", "+blue:40", "--concept", "circle",
        "--n-images", "2", "--seed", "5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.iterdir())
    assert names == ["original-5.png", "original-6.png", "result.json", "sheet.png",
                     "steered-5.png", "steered-6.png"]
    record = json.loads((out / "result.json").read_text())
    assert record["seeds"] == [5, 6] and [e["concept"] for e in record["edits"]] == ["blue",
                                                                                     "circle"]
    assert set(record["detection"][0]) == {"red", "green", "blue", "circle", "square"}


def test_steer_generate_rejects_unknown_concept(tmp_path):
    bundle = make_bundle(PIPELINE, tmp_path / "bundle", steps=20)
    result = CliRunner().invoke(app, [
        "generate", "--prompt", "x", "--pipeline", str(PIPELINE), "--bundle", str(bundle),
        "--concept", "purple", "--out", str(tmp_path / "o")])
    assert result.exit_code != 0
    assert "unknown concept 'purple'" in result.output


def test_request_without_bundle_has_no_detection(steered):
    result = steered.generate(GenerationRequest(prompt="a triangle", steps=5, n_images=1))
    assert result.detection == [] and len(result.images) == 1


def test_steer_generate_without_edits_writes_a_grid(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "generate", "--prompt", "a green triangle", "--pipeline", str(PIPELINE),
        "--n-images", "3", "--steps", "10", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "grid.png", "image-0.png", "image-1.png", "image-2.png", "result.json"]
