"""The gateway never loads torch: it reads the bundle's manifest and the policy file only, so
an API replica starts fast and small (the workers are the ones that load the model)."""

from __future__ import annotations

import subprocess
import sys

from service.settings import REPO_ASSETS

CODE = f"""
import sys
from pathlib import Path
from service.app import open_runtime
from service.settings import Settings
rt = open_runtime(Settings(redis_url="redis://127.0.0.1:6379/9",
                           policy_file=Path({str(REPO_ASSETS.parent / "policies" / "toy.toml")!r})))
assert rt.catalog.concepts and rt.policies is not None
print("torch" in sys.modules)
"""


def test_the_gateway_runtime_does_not_import_torch() -> None:
    done = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
