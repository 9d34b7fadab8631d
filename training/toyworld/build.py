"""`steer toyworld build`: tokenizer, VAE, classifier, UNet + text encoder, evaluation, BUILD.md.

Every stage checkpoints into ``work_dir``; rerunning the same command resumes where it stopped.
"""

from __future__ import annotations

import json
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from training.toyworld.classifier import AttributeClassifier, held_out_accuracy, train_classifier
from training.toyworld.evaluate import EVAL_GUIDANCE, EVAL_STEPS, evaluate_pipeline
from training.toyworld.models import sampling_scheduler
from training.toyworld.report import write_build_report
from training.toyworld.tokenizer import build_clip_tokenizer
from training.toyworld.train_pipeline import train_unet
from training.toyworld.train_vae import train_vae

PIPELINE_DIR = "toy-pipeline"
CLASSIFIER_DIR = "toy-classifier"
EVAL_FILE = "toyworld-eval.json"


class StageTimer:
    """Wall time per stage, accumulated across resumed runs in work_dir/times.json."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.times: dict[str, float] = json.loads(path.read_text()) if path.exists() else {}

    def run(self, name: str, fn):
        start = time.perf_counter()
        result = fn()
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start
        self.path.write_text(json.dumps(self.times, indent=2))
        return result


def _record_run(work_dir: Path, args: dict) -> list[dict]:
    """Append this invocation to work_dir/runs.json: a resumed build says how it was made."""
    path = work_dir / "runs.json"
    runs = json.loads(path.read_text()) if path.exists() else []
    runs.append({"started": datetime.now(UTC).isoformat(timespec="seconds"), **args})
    path.write_text(json.dumps(runs, indent=2))
    return runs


def save_pipeline(pipe: StableDiffusionPipeline, directory: Path, vocab_dir: Path) -> None:
    """Save the pipeline in fp16 in SD-1.x's folder layout.

    The tokenizer folder gets SD-1.x's vocab.json + merges.txt (which transformers 4 and 5
    both load) instead of the 3.6 MB tokenizer.json that transformers 5 writes.
    """
    if directory.exists():
        shutil.rmtree(directory)
    pipe.to(torch.float16).save_pretrained(directory, safe_serialization=True)
    pipe.to(torch.float32)
    tok_dir = directory / "tokenizer"
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(vocab_dir / name, tok_dir / name)
    (tok_dir / "tokenizer.json").unlink(missing_ok=True)


def load_pipeline(directory: Path) -> StableDiffusionPipeline:
    """The shipped toy pipeline, upcast to fp32 for CPU."""
    return StableDiffusionPipeline.from_pretrained(
        directory, torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False
    )


def build(
    out_dir: Path,
    work_dir: Path,
    seed: int = 0,
    vae_steps: int = 800,
    classifier_steps: int = 800,
    unet_steps: int = 5000,
    unet_scenes: int = 32768,
    eval_full: int = 200,
    eval_per_prompt: int = 16,
    eval_classifier: int = 2000,
) -> dict:
    """Build (or resume building) the toy pipeline and classifier into ``out_dir``."""
    work_dir.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    timer = StageTimer(work_dir / "times.json")
    runs = _record_run(work_dir, {"seed": seed, "vae_steps": vae_steps,
                                  "classifier_steps": classifier_steps, "unet_steps": unet_steps,
                                  "unet_scenes": unet_scenes})
    vocab_dir = work_dir / "tokenizer"
    tokenizer = build_clip_tokenizer(vocab_dir)
    vae = timer.run("vae", lambda: train_vae(work_dir, seed, vae_steps))
    classifier = timer.run(
        "classifier", lambda: train_classifier(work_dir, seed, vae, classifier_steps))
    accuracy = held_out_accuracy(classifier, seed, vae, eval_classifier)
    classifier.save_pretrained(out_dir / CLASSIFIER_DIR)
    unet, text_encoder = timer.run(
        "unet", lambda: train_unet(work_dir, seed, vae, tokenizer, unet_steps,
                                           n_scenes=unet_scenes))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=sampling_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    save_pipeline(pipe, out_dir / PIPELINE_DIR, vocab_dir)
    shipped = load_pipeline(out_dir / PIPELINE_DIR)
    probe = "a red circle"
    if shipped.tokenizer(probe).input_ids != tokenizer(probe).input_ids:
        raise RuntimeError(f"the saved tokenizer in {out_dir / PIPELINE_DIR} does not "
                           "reproduce the training tokenizer; refusing to ship it")
    shipped_classifier = AttributeClassifier.from_pretrained(out_dir / CLASSIFIER_DIR)
    quality = timer.run("evaluate", lambda: evaluate_pipeline(
        shipped, shipped_classifier, n_full=eval_full, per_prompt=eval_per_prompt))
    results = {
        "seed": seed,
        "steps": {"vae": vae_steps, "classifier": classifier_steps, "unet": unet_steps,
                  "unet_scenes": unet_scenes},
        "sampling": {"scheduler": "DDIM", "steps": EVAL_STEPS, "guidance": EVAL_GUIDANCE},
        "classifier_accuracy": accuracy,
        "classifier_eval_n": eval_classifier,
        "generation": quality,
        "seconds": timer.times,
        "runs": runs,
    }
    (out_dir / EVAL_FILE).write_text(json.dumps(results, indent=2))
    write_build_report(out_dir, results)
    return results
