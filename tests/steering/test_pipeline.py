"""SteeredPipeline end to end on a tiny random pipeline: identity, seeds, hooks, cancel."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.hooks import ModelHook

from steering.bundle import BundleError
from steering.edits import ConceptEdit, EditError
from steering.hooks import active_hook_names
from steering.pipeline import GenerationCanceled, GenerationRequest, SteeredPipeline
from tests.conftest import TINY_STEPS, make_bundle


@pytest.fixture(scope="module")
def steered(tiny_pipeline_dir, tiny_bundle_dir):
    return SteeredPipeline.from_pretrained(tiny_pipeline_dir, tiny_bundle_dir)


def request(**kw):
    base = dict(prompt="a red circle", negative_prompt="blurry", seed=7, steps=TINY_STEPS,
                guidance=4.0, n_images=2)
    return GenerationRequest(**(base | kw))


def plain_images(pipe_dir, req):
    """The plain diffusers pipeline, same seeds, no hooks: the reference images."""
    pipe = StableDiffusionPipeline.from_pretrained(pipe_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=req.prompt, negative_prompt=req.negative_prompt,
               num_inference_steps=req.steps, guidance_scale=req.guidance, height=32, width=32,
               num_images_per_prompt=req.n_images,
               generator=[torch.Generator().manual_seed(s) for s in req.seeds])
    return [np.asarray(im) for im in out.images]


def arrays(result):
    return [np.asarray(im) for im in result.images]


@pytest.mark.parametrize("edits", [(), (ConceptEdit("red", 0.0), ConceptEdit("circle", 0.0))])
def test_no_active_edit_is_bit_identical_to_plain_diffusers(steered, tiny_pipeline_dir, edits):
    req = request(edits=edits)
    got = arrays(steered.generate(req))
    want = plain_images(tiny_pipeline_dir, req)
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))


def test_each_image_reproducible_alone(steered):
    both = steered.generate(request(edits=[ConceptEdit("red", 20.0)]))
    second = steered.generate(request(seed=8, n_images=1, edits=[ConceptEdit("red", 20.0)]))
    assert both.seeds == [7, 8] and second.seeds == [8]
    assert np.array_equal(arrays(both)[1], arrays(second)[0])


def test_active_edit_changes_images_and_reports_detection(steered):
    plain = steered.generate(request())
    amplified = steered.generate(request(edits=[ConceptEdit.parse("+blue:40")]))
    assert not np.array_equal(arrays(plain)[0], arrays(amplified)[0])
    assert [e.to_dict()["concept"] for e in amplified.edits] == ["blue"]
    assert len(plain.detection) == 2
    assert set(plain.detection[0]) == {"red", "green", "blue", "circle", "square"}
    assert all(np.isfinite(v) for d in plain.detection for v in d.values())


def test_progress_and_hooks_removed(steered):
    seen = []
    steered.generate(request(edits=[ConceptEdit("red", 10.0)]),
                     progress=lambda s, t: seen.append((s, t)))
    assert seen == [(i + 1, TINY_STEPS) for i in range(TINY_STEPS)]
    assert active_hook_names(steered.pipe.unet) == []
    assert active_hook_names(steered.block) == []


def test_cancel_between_steps_and_hooks_removed(steered):
    seen = []
    with pytest.raises(GenerationCanceled) as err:
        steered.generate(request(edits=[ConceptEdit("red", 10.0)]),
                         progress=lambda s, t: seen.append(s), should_cancel=lambda: len(seen) >= 2)
    assert err.value.step == 2 and seen == [1, 2]
    assert active_hook_names(steered.pipe.unet) == [] and active_hook_names(steered.block) == []


def test_exception_in_callback_removes_hooks(steered):
    def explode(step, total):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        steered.generate(request(edits=[ConceptEdit("red", 10.0)]), progress=explode)
    assert active_hook_names(steered.block) == []
    # The next call is unaffected.
    assert len(steered.generate(request(n_images=1)).images) == 1


def test_unknown_concept_lists_known(steered):
    with pytest.raises(EditError, match="known: red, green, blue, circle, square"):
        steered.generate(request(edits=[ConceptEdit("purple")]))


def test_bundle_for_another_pipeline_is_refused(tiny_pipeline_dir, tiny_bundle_dir, tmp_path):
    other = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    with torch.no_grad():
        other.unet.up_blocks[1].attentions[1].proj_out.weight.add_(0.01)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(BundleError, match="fingerprint"):
        SteeredPipeline.from_pretrained(tmp_path / "other", tiny_bundle_dir)
    # A bundle made for that pipeline loads.
    make_bundle(tmp_path / "other", tmp_path / "bundle")
    SteeredPipeline.from_pretrained(tmp_path / "other", tmp_path / "bundle")


def test_missing_folder_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model_index\.json"):
        SteeredPipeline.from_pretrained(tmp_path)


def test_capture_hook_hands_over_the_cond_half_every_step(steered):
    from steering.hooks import CaptureHook, StepTracker, attached, output_tensor

    captured, full = [], []

    class Record(ModelHook):
        def post_forward(self, module, output):
            full.append(output_tensor(output).clone())
            return output

    tracker = StepTracker()
    capture = CaptureHook(tracker, lambda s, t, x: captured.append((s, t, x.clone())), cfg=True)
    pipe = steered.pipe
    with attached([(pipe.unet, "tracker", tracker), (steered.block, "capture", capture),
                   (steered.block, "record", Record())]):
        pipe(prompt="a red circle", num_inference_steps=TINY_STEPS, guidance_scale=4.0,
             num_images_per_prompt=2, generator=[torch.Generator().manual_seed(i)
                                                 for i in range(2)])
    pipe.scheduler.set_timesteps(TINY_STEPS)
    assert [s for s, _, _ in captured] == list(range(TINY_STEPS))
    assert [t for _, t, _ in captured] == pipe.scheduler.timesteps.tolist()
    for (_, _, x), out in zip(captured, full, strict=True):
        assert x.shape == (2, 8 * 8, 64)  # [B, H·W, C] at the toy's up1.1
        torch.testing.assert_close(x, out.chunk(2)[1].flatten(2).transpose(1, 2))


def test_other_step_count_uses_nearest_table_rows(steered):
    result = steered.generate(request(steps=TINY_STEPS + 3, edits=[ConceptEdit("red", 20.0)]))
    assert len(result.images) == 2 and len(result.detection) == 2


def test_sd_folder_shipping_pndm_is_switched_to_ddim(tiny_pipeline_dir, tmp_path):
    from diffusers import DDIMScheduler, PNDMScheduler

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config)  # as SD-1.4 ships
    pipe.save_pretrained(tmp_path / "sd")
    steered = SteeredPipeline.from_pretrained(tmp_path / "sd")
    assert isinstance(steered.pipe.scheduler, DDIMScheduler)
    assert steered.pipe.scheduler.config.clip_sample is False
