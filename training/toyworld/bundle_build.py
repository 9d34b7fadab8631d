"""`steer toyworld bundle`: the whole training chain on the toy world → assets/toy-bundle.

prompts → `collect` (three stores) → `train` (preset ``toy``) → held-out FVU → `importance`
→ per-kind defaults tuned on tuning seeds → `export` → a judged removal check per concept on
other seeds → BUILD.md. Each stage resumes from
``work_dir`` (collection by shard, training from its checkpoint), so rerunning continues.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import torch

from steering.bundle import SteeringBundle, sha256_file
from steering.pipeline import SteeredPipeline
from training.toyworld.build import StageTimer, load_pipeline
from training.toyworld.classifier import AttributeClassifier
from training.toyworld.evaluate import EVAL_GUIDANCE, EVAL_STEPS
from training.toyworld.prompt_sets import write_prompt_sets
from training.toyworld.steering_check import removal_table, tune_kind_defaults
from training.toyworld.world import KINDS

# First steering defaults, tuned per kind on tuning seeds (steering_check.TUNE_SEED_BASE)
# over this grid of the gated replacement recipe (γ = 1 swaps the concept exactly);
# `steer eval --write-defaults` then sets the shipped ones from its larger sweep.
# gamma_range bounds what the API accepts.
TUNE_GAMMAS = (1.0, 2.0, 3.0, 5.0)
TUNE_PERCENTILES = (90.0, 95.0, 97.0)
GAMMA_RANGE = [0.5, 100.0]


def _collect_all(pipe, prompt_files: dict[str, Path], stores_dir: Path) -> dict[str, Path]:
    """Collect (or resume) one store per prompt set, every step of the eval schedule."""
    from training.activations.collect import collect

    stores = {}
    for name, path in prompt_files.items():
        out = stores_dir / name
        collect(pipe, path, out, steps=EVAL_STEPS, guidance=EVAL_GUIDANCE,
                prompts_per_shard=32, batch_size=32,
                command=f"steer collect --prompts {path.name} --out {name} "
                        f"--steps {EVAL_STEPS} --guidance {EVAL_GUIDANCE}")
        stores[name] = out
    return stores


def _train(stores: dict[str, Path], sae_dir: Path, preset: str, steps: int | None, seed: int):
    """Train the SAE on the ``sae`` and ``importance`` stores (resumes from its checkpoint)."""
    from training.activations.loader import MemmapSource
    from training.activations.store import ActivationStore
    from training.trainer.loop import train_sae
    from training.trainer.presets import get_preset

    source = MemmapSource([ActivationStore.open(stores[n]) for n in ("sae", "importance")])
    cfg = get_preset(preset).config(d_in=source.d_in, total_steps=steps, seed=seed)
    resume = (sae_dir / "checkpoints").exists()
    train_sae(cfg, source, sae_dir, resume=resume)
    return cfg


def _heldout(sae_dir: Path, store: Path) -> dict[str, float]:
    """FVU, L0 and dead latents of the trained SAE on the held-out store."""
    from steering.sae import TopKSAE
    from training.activations.loader import MemmapSource
    from training.activations.store import ActivationStore
    from training.trainer.evaluate import evaluate_sae

    sae = TopKSAE.from_pretrained(sae_dir / "sae")
    return evaluate_sae(sae, MemmapSource([ActivationStore.open(store)]))


def _importance(sae_dir: Path, store: Path, tables_path: Path, plots: Path) -> None:
    """Importance tables from the canonical-caption store, plus one heat map per concept."""
    from steering.sae import TopKSAE
    from training.activations.store import ActivationStore
    from training.importance import compute_importance, write_heatmaps

    tables = compute_importance(TopKSAE.from_pretrained(sae_dir / "sae"),
                                ActivationStore.open(store))
    tables.save(tables_path)
    write_heatmaps(tables, plots)


def build_bundle(pipeline_dir: Path, classifier_dir: Path, out: Path, work_dir: Path,
                 preset: str = "toy", train_steps: int | None = None, seed: int = 0,
                 check_count: int = 8) -> dict:
    """Run (or resume) the chain and write ``out`` (the bundle) with its BUILD.md."""
    from training.export import ConceptsSpec, export_bundle

    work_dir.mkdir(parents=True, exist_ok=True)
    timer = StageTimer(work_dir / "times.json")
    command = shlex.join(["steer", *sys.argv[1:]]) if sys.argv else "steer toyworld bundle"
    pipe = load_pipeline(pipeline_dir)
    prompt_files = write_prompt_sets(work_dir / "prompts")
    stores = timer.run("collect", lambda: _collect_all(pipe, prompt_files, work_dir / "stores"))
    sae_dir = work_dir / "sae"
    cfg = timer.run("train", lambda: _train(stores, sae_dir, preset, train_steps, seed))
    heldout = timer.run("heldout", lambda: _heldout(sae_dir, stores["heldout"]))
    tables_path = work_dir / "importance.safetensors"
    timer.run("importance", lambda: _importance(sae_dir, stores["importance"], tables_path,
                                                work_dir / "plots"))
    classifier = AttributeClassifier.from_pretrained(classifier_dir)

    def export(kinds: dict[str, dict]) -> SteeredPipeline:
        spec = ConceptsSpec.from_dict({"defaults": {"gamma_range": GAMMA_RANGE}, "kinds": kinds})
        export_bundle(sae_dir / "sae", tables_path, stores["importance"], out, spec,
                      command=command)
        return SteeredPipeline(pipe, SteeringBundle.load(out))

    tuning_path = work_dir / "tuning.json"
    tables_sha = sha256_file(tables_path)
    saved = json.loads(tuning_path.read_text()) if tuning_path.exists() else {}
    points: dict[str, dict] = (saved.get("points", {})
                               if saved.get("tables_sha256") == tables_sha else {})

    def save(kind: str, results: dict[str, dict]) -> None:  # after every grid point
        points[kind] = results
        tuning_path.write_text(json.dumps({"tables_sha256": tables_sha, "points": points},
                                          indent=2))

    steered = export({})
    tuning = timer.run("tune", lambda: {
        kind: tune_kind_defaults(steered, classifier, members, TUNE_GAMMAS, TUNE_PERCENTILES,
                                 done=points.get(kind),
                                 save=lambda r, kind=kind: save(kind, r))
        for kind, members in KINDS.items()})
    steered = timer.run("export", lambda: export({
        kind: {"default_gamma": t["gamma"], "default_percentile": t["percentile"]}
        for kind, t in tuning.items()}))
    concepts = [c for members in KINDS.values() for c in members]
    check = timer.run("check", lambda: removal_table(steered, classifier, concepts,
                                                     count=check_count))
    results = {
        "command": command,
        "train_config": cfg.to_dict(),
        "heldout": heldout,
        "tuning": tuning,
        "removal_check": check,
        "stores": {n: _store_summary(p) for n, p in stores.items()},
        "seconds": timer.times,
        "bundle_mb": sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 1e6,
        "torch_threads": torch.get_num_threads(),
    }
    (out / "build.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def _store_summary(path: Path) -> dict:
    """Prompts, rows and size of a collected store."""
    from training.activations.store import ActivationStore

    store = ActivationStore.open(path)
    m = store.manifest
    return {"prompts": m.num_prompts, "rows": store.num_rows, "d_in": m.d_in,
            "captured_steps": len(m.captured_steps),
            "mb": store.num_rows * m.d_in * 2 / 1e6}
