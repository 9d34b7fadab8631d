"""TopK SAE training over cached or generated activations: `steer train`.

Public API: TrainConfig, PRESETS/get_preset, train_sae, evaluate_sae.
"""

from training.trainer.config import TrainConfig
from training.trainer.evaluate import evaluate_sae
from training.trainer.loop import train_sae
from training.trainer.presets import PRESETS, Preset, get_preset

__all__ = ["PRESETS", "Preset", "TrainConfig", "evaluate_sae", "get_preset", "train_sae"]
