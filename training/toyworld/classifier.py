"""The attribute classifier: a small CNN trained on the renderer's ground truth.

It judges every steering-quality figure, so it is trained on renders and on VAE
reconstructions of renders (the look of generated images) and must reach ≥ 98 % per kind.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from training.toyworld.data import labels, step_rng, to_tensor
from training.toyworld.loop import train
from training.toyworld.render import render_batch
from training.toyworld.world import KINDS


class AttributeClassifier(nn.Module):
    """CNN with one head per kind (shape, colour, background) over 32×32 RGB in [-1, 1]."""

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *block(3, 32), *block(32, 32), nn.MaxPool2d(2),
            *block(32, 64), *block(64, 64), nn.MaxPool2d(2),
            *block(64, 128), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(512, 128), nn.ReLU(),
        )
        self.heads = nn.ModuleDict({k: nn.Linear(128, len(v)) for k, v in KINDS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per kind."""
        h = self.features(x)
        return {k: head(h) for k, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: list[Image.Image] | np.ndarray) -> list[dict[str, str]]:
        """Predicted concept of each kind for PIL images or a uint8 [B, H, W, 3] array."""
        if not isinstance(images, np.ndarray):
            images = np.stack([np.asarray(im.convert("RGB")) for im in images])
        self.eval()
        logits = self(to_tensor(images))
        idx = {k: v.argmax(-1).tolist() for k, v in logits.items()}
        return [{k: KINDS[k][idx[k][i]] for k in KINDS} for i in range(len(images))]

    def save_pretrained(self, directory: Path) -> None:
        """classifier.safetensors (fp16) + config.json naming the classes."""
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.half().contiguous() for k, v in self.state_dict().items()
                   if v.is_floating_point()} | {k: v for k, v in self.state_dict().items()
                   if not v.is_floating_point()}, directory / "classifier.safetensors")
        (directory / "config.json").write_text(json.dumps({"classes": KINDS}, indent=2))

    @classmethod
    def from_pretrained(cls, directory: Path) -> AttributeClassifier:
        """Load a classifier saved by save_pretrained (upcast to fp32)."""
        model = cls()
        state = load_file(Path(directory) / "classifier.safetensors")
        model.load_state_dict({k: v.float() if v.is_floating_point() else v
                               for k, v in state.items()})
        return model.eval()


def _maybe_reconstruct(vae: AutoencoderKL | None, x: torch.Tensor, gen: torch.Generator):
    """Replace the second half of the batch by VAE reconstructions (generated-image look)."""
    if vae is None:
        return x
    half = x.shape[0] // 2
    with torch.no_grad():
        rec = vae.decode(vae.encode(x[half:]).latent_dist.sample(generator=gen)).sample
    return torch.cat([x[:half], rec.clamp(-1, 1)])


def train_classifier(
    work_dir: Path, seed: int, vae: AutoencoderKL | None, steps: int = 800, batch: int = 64
) -> AttributeClassifier:
    """Train (or resume) the attribute classifier."""
    torch.manual_seed(seed)
    model = AttributeClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()

    def step_fn(step: int) -> torch.Tensor:
        rng = step_rng(seed, "classifier", step)
        images, scenes = render_batch(rng, batch)
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        x = _maybe_reconstruct(vae, to_tensor(images), gen)
        x = x + 0.03 * torch.randn(x.shape, generator=gen)
        y = labels(scenes)
        logits = model(x)
        return sum(loss_fn(logits[k], y[:, i]) for i, k in enumerate(KINDS))

    train("classifier", {"classifier": model}, opt, steps, step_fn, work_dir / "classifier.pt")
    return model.eval()


@torch.no_grad()
def held_out_accuracy(
    model: AttributeClassifier, seed: int, vae: AutoencoderKL | None, n: int = 2000
) -> dict[str, dict[str, float]]:
    """Accuracy per kind on fresh renders and, given a VAE, on their reconstructions."""
    rng = step_rng(seed + 1, "classifier-eval", 0)
    images, scenes = render_batch(rng, n)
    y = labels(scenes)
    x = to_tensor(images)
    sets = {"renders": x}
    if vae is not None:
        gen = torch.Generator().manual_seed(seed)
        recs = [vae.decode(vae.encode(c).latent_dist.sample(generator=gen)).sample.clamp(-1, 1)
                for c in x.split(256)]
        sets["vae_reconstructions"] = torch.cat(recs)
    model.eval()
    out = {}
    for name, data in sets.items():
        logits = {k: torch.cat([model(c)[k] for c in data.split(256)]) for k in KINDS}
        out[name] = {k: float((logits[k].argmax(-1) == y[:, i]).float().mean())
                     for i, k in enumerate(KINDS)}
    return out
