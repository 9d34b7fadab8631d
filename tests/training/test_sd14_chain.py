"""The whole chain of docs/real-models.md on a pipeline of SD-1.4's architecture.

The pipeline (:func:`steering.sd14.build_sd14_pipeline`: SD-1.4's UNet with its
1280-channel up1.1, the 768-wide 12-layer CLIP text encoder, SD's VAE, DDIM) has seeded
random weights and defaults to 64 × 64 px, so the real commands run on SD-1.4 shapes in
minutes on CPUs, without downloading weights. The commands run through the `steer` command
line, in the order the doc gives them: collect → train → importance → export → bundle
fit-detector → bundle fit-swap → bundle tune → generate, then one job through a real
`steer worker` on a private Redis. Each step asserts its real output; none checks image
content, which random weights do not have.

Cost: every pipeline call is a batch of all its prompts at 2 steps, since a UNet call at
64 × 64 px costs about the same for 2 or 16 rows on CPU (it is bound by reading the weights).
"""

from __future__ import annotations

import copy
import gc
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
import typer
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

from steering.bundle import SteeringBundle
from steering.cli import _add_entry_point_groups
from steering.cli import app as steer_app

REPO = Path(__file__).resolve().parents[2]
STEPS = ["--steps", "2"]  # collect/generate: DDIM steps; the bundle commands follow the bundle
GUIDANCE = ["--guidance", "4"]
SIZE = 64  # px: latents 8 × 8, up1.1 2 × 2 tokens
COLOURS = ("red", "blue")  # one kind, two concepts: importance contrasts them
SHAPES = ("circle", "square", "cross")
N_LATENTS, K = 2560, 8  # a small SAE (d_in 1280 is the model's)


def _steer_program() -> typer.Typer:
    """The `steer` program as installed: the core's app with the entry-point groups added,
    as ``steering.cli.main`` does (on a copy, so the module's app stays as other tests see
    it)."""
    root = copy.copy(steer_app)
    root.registered_commands = list(steer_app.registered_commands)
    root.registered_groups = list(steer_app.registered_groups)
    _add_entry_point_groups(root)
    return root


STEER = _steer_program()


def _steer(args: list[Any]) -> str:
    """Run ``steer ARGS`` in this process; its output (fails with it on a non-zero exit)."""
    result = CliRunner().invoke(STEER, [str(a) for a in args])
    gc.collect()  # each command loads a 4 GB float32 pipeline in this process: free it now
    assert result.exit_code == 0, f"steer {' '.join(map(str, args))}:\n{result.output}" + (
        f"\n{result.exception!r}" if result.exception else "")
    return result.output


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def sd14_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SD-1.4's architecture with seeded random weights, saved in diffusers layout with a
    default size of 64 px (UNet sample_size 8) so that every command, the worker's warm-up
    included, runs at 64 × 64 px. Weights are stored as float16 (2 GB instead of 4 GB, a
    faster save); every command loads them as float32 (``SteeredPipeline.from_pretrained``
    passes its dtype), so the chain runs in float32."""
    from transformers import CLIPTokenizer

    from steering.sd14 import build_sd14_pipeline

    out = tmp_path_factory.mktemp("sd14") / "pipeline"
    tokenizer = CLIPTokenizer.from_pretrained(REPO / "assets" / "toy-pipeline" / "tokenizer")
    pipe = build_sd14_pipeline(tokenizer, torch.float32, seed=0)
    pipe.unet.register_to_config(sample_size=SIZE // 8)
    pipe.to(torch.float16).save_pretrained(out)
    del pipe
    gc.collect()
    return out


def _collect_rows() -> list[dict[str, Any]]:
    """Two prompts per colour and shape (labelled, for importance) and two unlabelled."""
    rows = [{"prompt": f"a {c} {s}", "concepts": {"colour": c}, "seed": 100 + 10 * i + j}
            for i, (c, s) in enumerate((c, s) for c in COLOURS for s in SHAPES)
            for j in range(2)]
    return [*rows, {"prompt": "a circle", "concepts": {}, "seed": 200},
            {"prompt": "a square", "concepts": {}, "seed": 201}]


def _detector_rows(holdout: float) -> list[dict[str, Any]]:
    """Per colour, prompts naming it whose seeds put exactly 3 in each split (the split is a
    hash of prompt and seed): the fewest runs with which every concept has ≥ 3 positives
    and ≥ 3 negatives in both splits (training.detector_fit.check_counts)."""
    from training.detector_fit import Run, heldout_split

    rows = []
    for base, colour in zip((1000, 2000), COLOURS, strict=True):
        need = {True: 3, False: 3}
        seed = base
        while any(need.values()):
            prompt = f"a {colour} {SHAPES[seed % 3]}"
            held = bool(heldout_split([Run(prompt, seed)], holdout)[0])
            if need[held]:
                rows.append({"prompt": prompt, "seed": seed})
                need[held] -= 1
            seed += 1
    return rows


def _pairs(seed_base: int) -> list[dict[str, Any]]:
    return [{"prompt": f"a red {s}", "counterfactual": f"a blue {s}", "seed": seed_base + i}
            for i, s in enumerate((*SHAPES, "circle"))]


def _wait(fn: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``fn`` until it returns something truthy (fails after ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
def private_redis_server() -> Iterator[Any]:
    """A redis-server of this test's own (never the shared one), stopped at the end."""
    from tests.service.conftest import PrivateRedis, free_port

    server = PrivateRedis(free_port())
    server.start()
    yield server
    server.stop()


def test_chain_on_sd14_architecture(sd14_pipeline: Path, tmp_path: Path,
                                    private_redis_server: Any) -> None:
    pipe = sd14_pipeline
    times: dict[str, float] = {}

    def timed(name: str, args: list[Any]) -> str:
        start = time.monotonic()
        out = _steer(args)
        times[name] = time.monotonic() - start
        return out

    # 1. collect: one labelled store serves SAE training and importance
    store = tmp_path / "store"
    prompts = _write_jsonl(tmp_path / "collect.jsonl", _collect_rows())
    timed("collect", ["collect", "--pipeline", pipe, "--prompts", prompts, "--out", store,
                      *STEPS, *GUIDANCE, "--size", SIZE, "--batch-size", 14,
                      "--prompts-per-shard", 7])
    info = json.loads((store / "store.json").read_text())
    assert info["d_in"] == 1280 and info["hook_point"] == "up_blocks.1.attentions.1"
    assert info["captured_steps"] == [0, 1] and info["height"] == SIZE
    assert info["num_prompts"] == 14 and info["num_shards"] == 2

    # 2. train a small SAE (d_in is the model's 1280)
    run = tmp_path / "run"
    timed("train", ["train", "--preset", "smoke", "--store", store, "--out", run,
                    "--steps", 10, "--num-latents", N_LATENTS, "--k", K, "--batch-size", 64,
                    "--chunk-rows", 16, "--buffer-blocks", 2])
    cfg = json.loads((run / "sae" / "cfg.json").read_text())
    assert (cfg["d_in"], cfg["num_latents"], cfg["k"]) == (1280, N_LATENTS, K)
    assert (run / "sae" / "sae.safetensors").is_file()

    # 3. importance and export (the concepts file gives the learned swap's γ range)
    tables, plots = tmp_path / "importance.safetensors", tmp_path / "plots"
    timed("importance", ["importance", "--sae", run / "sae", "--store", store, "--out",
                         tables, "--plots", plots])
    with safe_open(str(tables), "pt") as f:
        assert json.loads(f.metadata()["concepts"]) == ["blue", "red"]
        assert f.get_slice("scores").get_shape() == [2, 2, N_LATENTS]  # concepts, steps, n
    assert sorted(p.name for p in plots.iterdir()) == ["blue.png", "red.png"]
    concepts_file = tmp_path / "concepts.json"
    concepts_file.write_text(json.dumps(
        {"defaults": {"default_gamma": 1.0, "gamma_range": [0.25, 4.0]}}))
    bundle = tmp_path / "bundle"
    timed("export", ["export", "--sae", run / "sae", "--importance", tables, "--store", store,
                     "--concepts", concepts_file, "--out", bundle])
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert (manifest["d_in"], manifest["n_latents"], manifest["steps"]) == (1280, N_LATENTS, 2)
    assert manifest["pipeline_fingerprint"] == info["pipeline_fingerprint"]
    assert {c["name"]: c["gamma_range"] for c in manifest["concepts"]} == {
        "red": [0.25, 4.0], "blue": [0.25, 4.0]}

    # 4. fit-detector: prompt labels (random weights draw nothing a judge could see)
    runs = _write_jsonl(tmp_path / "runs.jsonl", _detector_rows(0.5))
    out = timed("fit-detector", ["bundle", "fit-detector", bundle, "--pipeline", pipe,
                                 "--runs", runs, "--labels", "prompt", "--holdout", 0.5,
                                 *GUIDANCE, "--batch-size", 12])
    assert "added detectors for 2 concepts (12 runs, prompt labels" in out
    loaded = SteeringBundle.load(bundle)
    assert loaded.detectors is not None
    assert set(loaded.detectors.concepts) == set(COLOURS)

    # 5. fit-swap from pairs whose counterfactual is free text
    pairs = _write_jsonl(tmp_path / "pairs.jsonl", _pairs(3000))
    out = timed("fit-swap", ["bundle", "fit-swap", bundle, "--pipeline", pipe, "--concept",
                             "red", "--pairs", pairs, "--anchor-label", "blue paint",
                             *GUIDANCE, "--batch-size", 8, "--work-dir", tmp_path / "fit"])
    assert "added the learned swap red → blue paint (4 prompt pairs" in out
    loaded = SteeringBundle.load(bundle)
    assert loaded.translations is not None
    assert loaded.translations.get("red").anchor == "blue paint"
    assert loaded.manifest.recipe.name == "translate"

    # 6. tune: one candidate, one γ, labelled by the stand-in judge
    tune_prompts = _write_jsonl(tmp_path / "tune.jsonl", [
        {"prompt": p, "seed": 4000 + i}
        for i, p in enumerate(("a red circle", "a blue square", "a red cross", "a square"))])
    timed("tune", ["bundle", "tune", bundle, "--pipeline", pipe, "--concept", "red",
                   "--candidate", f"blue={_write_jsonl(tmp_path / 'cand.jsonl', _pairs(5000))}",
                   "--prompts", tune_prompts, "--judge", "tests.training.sd14_judge:judge",
                   "--gammas", "1", "--rounds", 0, *GUIDANCE, "--work-dir",
                   tmp_path / "tune"])
    report = json.loads((bundle / "TUNE.json").read_text())["red"]
    assert report["labels"] == "judge" and report["prompts"] == 4
    assert report["unedited_showing"] == 2  # the judge calls half of each batch red
    assert report["chosen"]["candidate"] == "blue" and report["chosen"]["gamma"] == 1.0
    loaded = SteeringBundle.load(bundle)
    assert loaded.translations is not None and loaded.translations.get("red").anchor == "blue"

    # 7. generate with the edit: originals, steered images, sheet and result.json
    gen = tmp_path / "gen"
    timed("generate", ["generate", "--pipeline", pipe, "--bundle", bundle, "--prompt",
                       "a red circle", "--concept", "red", *STEPS, *GUIDANCE,
                       "--n-images", 1, "--out", gen])
    result = json.loads((gen / "result.json").read_text())
    assert result["edits"][0]["concept"] == "red" and result["steps"] == 2
    assert set(result["detection"][0]) == set(COLOURS)
    for name in ("original-0.png", "steered-0.png"):
        assert Image.open(gen / name).size == (SIZE, SIZE)
    assert (gen / "sheet.png").is_file()

    # 8. one job with the edit through a real `steer worker` on a private Redis
    start = time.monotonic()
    _serve_one_job(pipe, bundle, tmp_path, private_redis_server.url)
    times["worker"] = time.monotonic() - start
    print("sd14 chain, seconds per step:",
          ", ".join(f"{k} {v:.1f}" for k, v in times.items()))


def _serve_one_job(pipe: Path, bundle: Path, tmp_path: Path, redis_url: str) -> None:
    """Start a worker on ``pipe`` + ``bundle``, run one suppressing job, check its images."""
    from service.images import ImageStore
    from service.schemas import ConceptEditIn
    from tests.service.conftest import fast_settings
    from tests.service.worker_support import record, start_worker, submit, wait_ready

    # Heartbeats far longer than a CPU step under contention, so the worker is never
    # declared dead mid-job.
    settings = fast_settings(tmp_path / "data", redis_url, pipeline_dir=pipe,
                             bundle_dir=bundle, worker_heartbeat_s=2,
                             worker_heartbeat_ttl_s=120, job_timeout_s=600)
    conn = redis.Redis.from_url(redis_url)
    worker = start_worker(settings, "w-sd14", tmp_path)
    try:
        info = wait_ready(conn, worker, lambda fn, timeout, what: _wait(fn, 300, what))
        job_id = submit(conn, settings, prompt="a red circle", seed=7, steps=2, guidance=4.0,
                        n_images=1, concepts=[ConceptEditIn(name="red")])

        def finished() -> Any:
            assert worker.alive(), f"worker exited:\n{worker.log()[-3000:]}"
            rec = record(conn, settings, job_id)
            return rec if rec.status in {"succeeded", "failed", "canceled"} else None

        rec = _wait(finished, 300, f"job {job_id}")
        assert rec.status == "succeeded", f"{rec.error}\n{worker.log()[-3000:]}"
        out = rec.outcome
        assert out is not None and len(out.images) == 1 and out.seeds == [7]
        assert (out.parameters["width"], out.parameters["height"]) == (SIZE, SIZE)
        assert out.parameters["concepts"][0]["name"] == "red"
        assert out.provenance["pipeline_fingerprint"] == info["fingerprint"]
        assert out.provenance["steering_recipe"]["name"] == "translate"
        assert out.provenance["steering_swaps"]["red"] == "blue"
        png = ImageStore.from_settings(settings).path(out.images[0]["id"])
        assert Image.open(png).size == (SIZE, SIZE)
    finally:
        worker.proc.kill()
        worker.proc.wait(10)
        conn.close()
