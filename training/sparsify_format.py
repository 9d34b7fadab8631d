"""Move SAEs between our bundles and EleutherAI sparsify's checkpoint layout.

sparsify saves one folder per hookpoint, ``<root>/<hookpoint>/cfg.json`` (its
``SparseCoderConfig`` fields plus ``d_in``) and ``sae.safetensors`` (``encoder.weight``,
``encoder.bias``, ``W_dec``, ``b_dec``), and reads it back with
``SparseCoder.load_from_disk(<root>/<hookpoint>)``. Our SAE folder uses the same two files, so
export writes them under the hookpoint and import checks and normalises them.

SAeUron's SAEs (a fork of an early sparsify) use the same tensor names; their cfg adds
``batch_topk`` (a training-only choice: inference is per-token TopK, which we run),
``sample_topk`` (TopK over a whole image, not per token) and ``input_unit_norm`` (each token is
centred and divided by its own standard deviation before encoding, and the reconstruction is
scaled back). The last two cannot be folded into TopK weights — the per-token std is not a
linear map — so they are refused by name.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from steering.bundle import MANIFEST_FILE, SteeringBundle
from steering.fingerprint import HOOK_POINT
from steering.sae import CFG_FILE, WEIGHTS_FILE, SaeConfig, TopKSAE, UnsupportedSaeError

# SAeUron cfg flags whose inference maths our TopKSAE cannot reproduce.
_SAEURON_UNSUPPORTED = {
    "input_unit_norm": "SAeUron input normalisation (input_unit_norm=true: per-token "
                       "centring and std scaling, not expressible as TopK SAE weights)",
    "sample_topk": "SAeUron per-image TopK (sample_topk=true: TopK over all tokens of an image)",
}


def export_sparsify(src: str | Path, out: str | Path, hookpoint: str | None = None) -> Path:
    """Write the SAE of a bundle (or a bare SAE folder) as ``out/<hookpoint>/`` for sparsify.

    ``hookpoint`` defaults to the bundle's hook point (a bare SAE folder: the SD-1.x up1.1
    block). Returns the folder ``SparseCoder.load_from_disk`` reads.
    """
    src = Path(src)
    if (src / MANIFEST_FILE).is_file():
        bundle = SteeringBundle.load(src)  # verifies checksums before anything leaves the bundle
        sae, default_hook = bundle.sae, bundle.manifest.hook_point
    elif (src / CFG_FILE).is_file():
        sae, default_hook = TopKSAE.from_pretrained(src), HOOK_POINT
    else:
        raise FileNotFoundError(
            f"{src} is neither a steering bundle ({MANIFEST_FILE}) nor an SAE folder "
            f"({CFG_FILE} + {WEIGHTS_FILE}); pass the folder `steer export` or `steer train` wrote"
        )
    hook = hookpoint or default_hook
    _check_hookpoint_name(hook)
    dest = Path(out) / hook
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"{dest} already exists and is not empty; choose another --out")
    sae.save_pretrained(dest)
    return dest


def import_sparsify(src: str | Path, out: str | Path, hookpoint: str | None = None) -> TopKSAE:
    """Convert a sparsify / SAeUron checkpoint to our SAE folder ``out`` and return the SAE.

    ``src`` is either the SAE folder itself (holding cfg.json) or a checkpoint root with one
    subfolder per hookpoint; ``hookpoint`` picks one (needed when the root has several).
    """
    folder = resolve_checkpoint_folder(Path(src), hookpoint)
    raw = _read_cfg(folder)
    cfg = _normalised_cfg(raw, folder)
    dest = Path(out)
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"{dest} already exists and is not empty; choose another --out")
    # Load through our reader (names a missing key / wrong shape / W_skip), then re-save so the
    # folder holds exactly our canonical files whatever extras the source carried.
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp)
        (staged / CFG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
        shutil.copyfile(folder / WEIGHTS_FILE, staged / WEIGHTS_FILE)
        sae = TopKSAE.from_pretrained(staged)
    sae.save_pretrained(dest)
    return sae


def resolve_checkpoint_folder(src: Path, hookpoint: str | None) -> Path:
    """The folder holding cfg.json + sae.safetensors inside a sparsify checkpoint ``src``."""
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a folder; pass a sparsify checkpoint folder")
    if hookpoint is not None:
        if (src / CFG_FILE).is_file() and src.name == hookpoint:
            return src
        folder = src / hookpoint
        if not (folder / CFG_FILE).is_file():
            raise FileNotFoundError(
                f"{src} has no hookpoint {hookpoint!r} ({folder / CFG_FILE} missing); "
                f"available: {', '.join(hookpoints_in(src)) or 'none'}"
            )
        return folder
    if (src / CFG_FILE).is_file():
        return src
    hooks = hookpoints_in(src)
    if len(hooks) == 1:
        return src / hooks[0]
    if not hooks:
        raise FileNotFoundError(
            f"{src} holds no sparsify SAE ({CFG_FILE} + {WEIGHTS_FILE}, directly or in a "
            "hookpoint subfolder)"
        )
    raise ValueError(
        f"{src} holds SAEs for several hookpoints ({', '.join(hooks)}); pick one with --hookpoint"
    )


def hookpoints_in(root: Path) -> list[str]:
    """Names of the subfolders of ``root`` that hold a sparsify SAE, sorted."""
    return sorted(
        p.name for p in root.iterdir()
        if p.is_dir() and (p / CFG_FILE).is_file() and (p / WEIGHTS_FILE).is_file()
    )


def _read_cfg(folder: Path) -> dict[str, Any]:
    """cfg.json of a checkpoint folder as a dict, naming the file on bad JSON."""
    if not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{WEIGHTS_FILE} not found in {folder} (a sparsify SAE folder)")
    try:
        raw = json.loads((folder / CFG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{folder / CFG_FILE}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{folder / CFG_FILE}: expected a JSON object")
    return raw


def _normalised_cfg(raw: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Refuse variants by name, fill ``d_in`` from the weights if absent; our cfg.json dict."""
    for flag, label in _SAEURON_UNSUPPORTED.items():
        if raw.get(flag):
            raise UnsupportedSaeError(
                f"{folder / CFG_FILE} describes {label}; only plain per-token TopK SAEs "
                "(sparsify's default, SAeUron's patch TopK) can be imported"
            )
    raw = dict(raw)
    if "d_in" not in raw:
        raw["d_in"] = _d_in_from_weights(folder / WEIGHTS_FILE)
    return SaeConfig.from_sparsify_cfg(raw).to_sparsify_cfg()


def _d_in_from_weights(path: Path) -> int:
    """d_in read from b_dec's shape, for checkpoints whose cfg.json lacks it."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        if "b_dec" not in set(f.keys()):
            raise ValueError(f"{path}: no b_dec tensor and cfg.json has no d_in")
        return int(f.get_slice("b_dec").get_shape()[0])


def _check_hookpoint_name(hook: str) -> None:
    """A hookpoint becomes a folder name: refuse empty names and path separators."""
    if not hook or hook in (".", "..") or "/" in hook or "\\" in hook:
        raise ValueError(f"hookpoint {hook!r} cannot be a folder name; pass --hookpoint NAME")
