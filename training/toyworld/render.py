"""Renders toy-world scenes to RGB arrays with ground-truth labels (supersampled edges)."""

from __future__ import annotations

import numpy as np

from training.toyworld.world import BACKGROUNDS, COLOURS, SHAPES, Scene

IMAGE_SIZE = 32
_SUPERSAMPLE = 4

_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (45, 75, 215),
    "yellow": (230, 205, 35),
}


def random_scene(rng: np.random.Generator, image_size: int = IMAGE_SIZE, **fixed: str) -> Scene:
    """Draw a scene; attributes given in ``fixed`` (shape=, colour=, background=) are kept."""
    size = rng.uniform(0.2, 0.32) * image_size
    margin = size + 1.0
    return Scene(
        shape=fixed.get("shape") or str(rng.choice(SHAPES)),
        colour=fixed.get("colour") or str(rng.choice(COLOURS)),
        background=fixed.get("background") or str(rng.choice(BACKGROUNDS)),
        cx=float(rng.uniform(margin, image_size - margin)),
        cy=float(rng.uniform(margin, image_size - margin)),
        size=float(size),
    )


def _background(kind: str, yy: np.ndarray, xx: np.ndarray, phase: float) -> np.ndarray:
    """Greyscale background value in [0, 1] at (supersampled) pixel coordinates."""
    if kind == "plain":
        return np.full_like(xx, 0.78)
    if kind == "striped":
        stripe = np.floor((yy + phase) / 3.0) % 2
        return 0.82 - 0.42 * stripe
    if kind == "dotted":
        gy = ((yy + phase) % 5.0) - 2.5
        gx = ((xx + phase) % 5.0) - 2.5
        dot = (gx * gx + gy * gy) <= 1.1**2
        return np.where(dot, 0.3, 0.85)
    raise KeyError(f"unknown background {kind!r}; known: {', '.join(BACKGROUNDS)}")


def _shape_mask(scene: Scene, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Boolean mask of the scene's shape at (supersampled) pixel coordinates."""
    dx, dy, r = xx - scene.cx, yy - scene.cy, scene.size
    if scene.shape == "circle":
        return dx * dx + dy * dy <= r * r
    if scene.shape == "square":
        half = 0.82 * r
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if scene.shape == "triangle":
        top, bottom = -r, 0.75 * r
        inside_y = (dy >= top) & (dy <= bottom)
        half_width = (dy - top) / (bottom - top) * r
        return inside_y & (np.abs(dx) <= half_width)
    if scene.shape == "cross":
        arm = 0.33 * r
        return ((np.abs(dx) <= r) & (np.abs(dy) <= arm)) | ((np.abs(dx) <= arm) & (np.abs(dy) <= r))
    raise KeyError(f"unknown shape {scene.shape!r}; known: {', '.join(SHAPES)}")


def render(scene: Scene, rng: np.random.Generator, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Render ``scene`` to a uint8 array [H, W, 3]; colour jitter and stripe phase come from rng."""
    n = image_size * _SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / _SUPERSAMPLE
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    phase = float(rng.uniform(0, 6))
    bg = _background(scene.background, yy, xx, phase)
    img = np.repeat(bg[..., None], 3, axis=2)
    colour = np.clip(np.array(_RGB[scene.colour]) + rng.integers(-15, 16, size=3), 0, 255) / 255.0
    mask = _shape_mask(scene, yy, xx)
    img[mask] = colour
    img = img.reshape(image_size, _SUPERSAMPLE, image_size, _SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


def render_batch(
    rng: np.random.Generator, batch: int, image_size: int = IMAGE_SIZE
) -> tuple[np.ndarray, list[Scene]]:
    """Random scenes and their renders: (uint8 [B, H, W, 3], scenes)."""
    scenes = [random_scene(rng, image_size) for _ in range(batch)]
    return np.stack([render(s, rng, image_size) for s in scenes]), scenes


__all__ = ["COLOURS", "IMAGE_SIZE", "random_scene", "render", "render_batch"]
