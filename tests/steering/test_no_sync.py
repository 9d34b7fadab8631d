"""The steering hooks never synchronise with the host in the steady state.

Every aten op run inside a hooked call (the StepTracker's pre_forward on the UNet, the
SteeringHook's post_forward on up1.1, the gate's and detection's work included) is recorded
by a dispatch mode; the ops that wait for the device on a GPU (reading a value back:
``.item()``, ``int()``, ``bool()``; sizing a tensor by its data: ``nonzero``, ``unique``,
boolean-mask indexing; uploading host data: ``torch.tensor(...)``) must not appear once the
worker has served the same edits before. On CUDA, ``torch.cuda.set_sync_debug_mode("error")``
checks the same on the device itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from steering.edits import ConceptEdit
from steering.gate import ConceptGate
from steering.hooks import SteeringHook, StepTracker
from steering.pipeline import GenerationRequest, SteeredPipeline
from steering.plan import RowCache
from tests.conftest import ASSETS

aten = torch.ops.aten
# ops that read a device value on the host or size their output by the data
SYNCING = {aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default,
           aten.equal.default, aten.nonzero.default, aten.masked_select.default,
           aten.lift_fresh.default}
BOOLEAN_INDEXED = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
                   aten._index_put_impl_.default}
EDITS = [ConceptEdit("red"), ConceptEdit("circle"), ConceptEdit.parse("+striped:2")]


def syncing(func: Any, args: tuple[Any, ...]) -> bool:
    """Whether this aten call synchronises with the host on a GPU."""
    if func in SYNCING or "unique" in func.name():
        return True
    if func in BOOLEAN_INDEXED and len(args) > 1:
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
    return False


IN_GATE = [False]  # set while the gate runs inside the hook, to tell its ops apart


class Recorder(TorchDispatchMode):
    """Records every aten op of one hooked call; ``flagged`` / ``gate_flagged``: the syncing
    ones outside / inside the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.flagged: list[str] = []
        self.gate_flagged: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        if syncing(func, args):
            (self.gate_flagged if IN_GATE[0] else self.flagged).append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def toy() -> SteeredPipeline:
    return SteeredPipeline.from_pretrained(ASSETS / "toy-pipeline", ASSETS / "toy-bundle")


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, Recorder]]]:
    """Each hooked call's (hook, Recorder), in call order."""
    calls: list[tuple[str, Recorder]] = []
    post, pre = SteeringHook.post_forward, StepTracker.pre_forward

    def recorded_post(self, module, output):
        with Recorder() as rec:
            try:
                return post(self, module, output)
            finally:
                calls.append(("steering", rec))

    def recorded_pre(self, module, *args, **kwargs):
        with Recorder() as rec:
            try:
                return pre(self, module, *args, **kwargs)
            finally:
                calls.append(("tracker", rec))

    def in_gate(fn):
        def run(*args, **kwargs):
            IN_GATE[0] = True
            try:
                return fn(*args, **kwargs)
            finally:
                IN_GATE[0] = False
        return run

    monkeypatch.setattr(SteeringHook, "post_forward", recorded_post)
    monkeypatch.setattr(StepTracker, "pre_forward", recorded_pre)
    monkeypatch.setattr(ConceptGate, "update", in_gate(ConceptGate.update))
    monkeypatch.setattr(ConceptGate, "present", in_gate(ConceptGate.present))
    yield calls


def shipped_request(**kw: Any) -> GenerationRequest:
    """Two learned swaps (red, circle) with the gate, and an amplification."""
    return GenerationRequest(**({"prompt": "a red circle on a striped background", "seed": 3,
                                 "steps": 5, "guidance": 4.0, "n_images": 2, "edits": EDITS}
                                | kw))


def test_second_request_makes_no_host_sync_in_any_hooked_call(toy, recorded):
    steered = SteeredPipeline(toy.pipe, toy.bundle, row_cache=RowCache())
    recipe = steered.bundle.manifest.recipe
    assert recipe.name == "translate" and recipe.gate
    steered.generate(shipped_request())
    first = list(recorded)
    recorded.clear()
    steered.generate(shipped_request(seed=4))
    assert len(recorded) == 2 * 5  # the tracker and the steering hook, every step
    assert all(rec.ops for hook, rec in recorded if hook == "steering")
    per_call = [(hook, rec.flagged) for hook, rec in recorded]
    assert all(not flagged for _, flagged in per_call), per_call
    # the rows were built before the first request's UNet ran, so it was sync-free too
    assert all(not rec.flagged for _, rec in first), [(h, r.flagged) for h, r in first]
    # The gate runs inside the steering hook; its ops are counted apart.
    gate_flagged = [(hook, rec.gate_flagged) for hook, rec in recorded if rec.gate_flagged]
    assert not gate_flagged, gate_flagged


def test_tracker_schedule_is_what_the_unet_receives(toy):
    """The timesteps computed before the call are the ones diffusers passes the UNet."""
    seen: list[int] = []

    def spy(module, args, kwargs):
        t = kwargs["timestep"] if "timestep" in kwargs else args[1]
        seen.append(int(t))

    handle = toy.pipe.unet.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        for steps in (5, 7):
            seen.clear()
            toy.generate(shipped_request(steps=steps, n_images=1))
            timesteps, rows = toy.schedule(steps)
            assert seen == timesteps
            assert rows == toy.bundle.tables.rows_for_timesteps(seen)
    finally:
        handle.remove()


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU: torch.cuda.set_sync_debug_mode only exists there "
                    "(the CPU dispatch-mode sync test covers the rest)")
def test_hooked_calls_pass_cuda_sync_debug_mode(monkeypatch):
    """On the device: any synchronising call inside a hook raises."""
    steered = SteeredPipeline.from_pretrained(ASSETS / "toy-pipeline", ASSETS / "toy-bundle",
                                              device="cuda")
    post, pre = SteeringHook.post_forward, StepTracker.pre_forward

    def strict(fn):
        def run(*args, **kwargs):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return run

    steered.generate(shipped_request())  # the rows are built (and cached) here
    monkeypatch.setattr(SteeringHook, "post_forward", strict(post))
    monkeypatch.setattr(StepTracker, "pre_forward", strict(pre))
    result = steered.generate(shipped_request(seed=4))
    assert len(result.images) == 2
