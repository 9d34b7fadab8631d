"""Top-level `steer` commands of the training chain: collect, train, importance, export, bundle.

Each part registers its own commands beside the code it drives; this only gathers them.
"""

from __future__ import annotations

import typer


def register(root: typer.Typer) -> None:
    """Add the training chain's commands to the root `steer` app (an entry point)."""
    from training.activations.cli import register as register_collect
    from training.bundle_cli import register as register_bundle
    from training.evaluation.cli import register as register_eval
    from training.trainer.cli import register as register_train

    register_collect(root)
    register_train(root)
    register_bundle(root)
    register_eval(root)
