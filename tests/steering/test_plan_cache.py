"""The per-worker plan cache: a second request with the same edits builds nothing and gives the
same images; γ-independent rows are shared across γ; the cache is bounded; cancel by flag."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from steering.edits import ConceptEdit
from steering.hooks import GenerationCanceled, active_hook_names
from steering.pipeline import GenerationRequest, SteeredPipeline
from steering.plan import PLAN_CACHE_ENV, RowCache, RowTranslate, SteeringPlan
from steering.recipes.plain import PlainRecipe
from steering.recipes.replace import ReplaceRecipe
from steering.recipes.translate import TranslateRecipe
from tests.conftest import ASSETS

EDITS = [ConceptEdit("red"), ConceptEdit("circle"), ConceptEdit.parse("+striped:2")]
# each recipe's row builder (steering/recipes/), under the names the counts are kept by
BUILDERS = {"_translate": TranslateRecipe, "_replace": ReplaceRecipe, "_row_edit": PlainRecipe}


@pytest.fixture(scope="module")
def toy() -> SteeredPipeline:
    return SteeredPipeline.from_pretrained(ASSETS / "toy-pipeline", ASSETS / "toy-bundle")


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Calls of each SteeringPlan row builder."""
    counts = dict.fromkeys(BUILDERS, 0)
    for name, recipe in BUILDERS.items():
        original = recipe.build

        def counted(self, *args, _name=name, _original=original):
            counts[_name] += 1
            return _original(self, *args)

        monkeypatch.setattr(recipe, "build", counted)
    return counts


def request(**kw) -> GenerationRequest:
    return GenerationRequest(**({"prompt": "a red circle on a striped background", "seed": 3,
                                 "steps": 5, "guidance": 4.0, "n_images": 2, "edits": EDITS}
                                | kw))


def arrays(result) -> list[np.ndarray]:
    return [np.asarray(im) for im in result.images]


def test_second_request_builds_no_row_and_is_bit_identical(toy, builds):
    steered = SteeredPipeline(toy.pipe, toy.bundle, row_cache=RowCache())
    first = steered.generate(request())
    assert builds["_translate"] == 2 * 5 and builds["_row_edit"] == 5  # red, circle; +striped
    built = dict(builds)
    second = steered.generate(request())
    assert builds == built  # nothing built
    assert steered.row_cache.hits >= 3 * 5
    assert all(np.array_equal(a, b) for a, b in zip(arrays(first), arrays(second),
                                                    strict=True))
    assert first.detection == second.detection


def test_swap_rows_are_shared_across_gamma(toy, builds):
    steered = SteeredPipeline(toy.pipe, toy.bundle, row_cache=RowCache())
    base = steered.generate(request())
    stronger = steered.generate(request(edits=[ConceptEdit("red", 3.0), *EDITS[1:]]))
    assert builds["_translate"] == 2 * 5  # the γ = 3 request reused γ-free swap rows
    assert not np.array_equal(arrays(base)[0], arrays(stronger)[0])  # γ still applies


def test_swap_rows_kept_once_in_the_serving_dtype(toy):
    bundle = toy.bundle
    edits = steered_edits(toy, [ConceptEdit("red")])
    plan = SteeringPlan(bundle.tables, toy.sae.W_dec, edits, toy._kinds,
                        bundle.manifest.recipe, bundle.translations, swap_dtype=torch.float16)
    ((_, part),) = plan.row(3).parts
    assert isinstance(part, RowTranslate) and part._rows.dtype == torch.float16
    assert part.deltas.untyped_storage().data_ptr() == part._rows.untyped_storage().data_ptr()
    values, indices = toy.sae.encode(torch.randn(6, bundle.manifest.d_in))
    full = SteeringPlan(bundle.tables, toy.sae.W_dec, edits, toy._kinds,
                        bundle.manifest.recipe, bundle.translations).row(3).parts[0][1]
    torch.testing.assert_close(part.delta(values, indices).float(),
                               full.delta(values, indices), rtol=1e-2, atol=1e-2)


def steered_edits(toy: SteeredPipeline, edits: list[ConceptEdit]):
    from steering.edits import resolve_edits

    return resolve_edits(edits, toy.concepts)


def test_cache_is_bounded_and_evicts_least_recently_used(toy):
    bundle = toy.bundle
    edits = steered_edits(toy, [ConceptEdit("red")])

    def plan(cache: RowCache) -> SteeringPlan:
        return SteeringPlan(bundle.tables, toy.sae.W_dec, edits, toy._kinds,
                            bundle.manifest.recipe, bundle.translations, cache=cache,
                            scope=bundle.sha256)

    sizes = []
    for r in range(5):
        alone = RowCache()
        plan(alone).prepare([r])
        sizes.append(alone.bytes)
    cache = RowCache(max_bytes=sum(sizes[2:]))  # room for the last three rows built
    plan(cache).prepare(range(5))
    assert len(cache) == 3 and cache.bytes == sum(sizes[2:]) and cache.builds == 5
    plan(cache).prepare([4, 3, 0])  # 4 and 3 are kept; 0 was evicted and is built again
    assert cache.builds == 6 and cache.hits == 2
    assert cache.bytes <= cache.max_bytes

    off = RowCache(max_bytes=0)
    plan(off).prepare([0])
    plan(off).prepare([0])
    assert off.builds == 2 and len(off) == 0


def test_shared_cache_needs_the_bundle_as_scope(toy):
    with pytest.raises(ValueError, match="scope"):
        SteeringPlan(toy.bundle.tables, toy.sae.W_dec, [], toy._kinds, cache=RowCache())


@pytest.mark.parametrize("value, max_bytes", [("", 4096 * 2**20), ("64", 64 * 2**20),
                                              ("0", 0)])
def test_cache_size_from_the_environment(monkeypatch, value, max_bytes):
    monkeypatch.setenv(PLAN_CACHE_ENV, value)
    assert RowCache.from_env().max_bytes == max_bytes


@pytest.mark.parametrize("value", ["lots", "-1"])
def test_bad_cache_size_says_what_to_set(monkeypatch, value):
    monkeypatch.setenv(PLAN_CACHE_ENV, value)
    with pytest.raises(ValueError, match=f"{PLAN_CACHE_ENV}=.*MiB"):
        RowCache.from_env()


# -- cancel by an in-process flag --------------------------------------------------------------

class CountCalls:
    """A forward pre-hook counting the calls of its module (started ones, whatever the
    module's own hooks then do); ``at_call(n)`` runs on call n (1-based)."""

    def __init__(self, module: torch.nn.Module, at_call=None) -> None:
        self.calls, self.at_call = 0, at_call
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module, args) -> None:
        self.calls += 1
        if self.at_call is not None:
            self.at_call(self.calls)


def cancel_from_thread(flag: threading.Event) -> tuple[threading.Event, threading.Thread]:
    """A thread that sets ``flag`` once told to (go.set())."""
    go = threading.Event()
    thread = threading.Thread(target=lambda: (go.wait(30), flag.set()), daemon=True)
    thread.start()
    return go, thread


@pytest.mark.parametrize("bundle", [True, False], ids=["steered", "unsteered"])
def test_flag_set_mid_call_stops_within_that_unet_call(toy, bundle):
    """Another thread sets the flag while UNet call 3 runs (in its first down block): the
    steering hook stops that very call; unsteered, the call ends and no other starts."""
    steered = SteeredPipeline(toy.pipe, toy.bundle if bundle else None, row_cache=RowCache())
    flag = threading.Event()
    go, thread = cancel_from_thread(flag)
    unet_calls = CountCalls(toy.pipe.unet)
    block_calls = CountCalls(steered.block)

    def set_during(call: int) -> None:
        if call == 3:
            go.set()
            thread.join(30)

    down = CountCalls(toy.pipe.unet.down_blocks[0], set_during)
    try:
        with pytest.raises(GenerationCanceled) as err:
            steered.generate(request(steps=8, cancel=flag, edits=EDITS if bundle else ()))
    finally:
        for counter in (unet_calls, block_calls, down):
            counter.handle.remove()
    assert flag.is_set() and unet_calls.calls == 3  # no UNet call started after the set
    assert block_calls.calls == 3  # the steering hook's is the call it stopped
    assert err.value.total == 8 and err.value.step == 2  # steps 1 and 2 done
    assert active_hook_names(toy.pipe.unet) == [] and active_hook_names(steered.block) == []


def test_flag_set_between_steps_stops_before_the_next_unet_call(toy):
    steered = SteeredPipeline(toy.pipe, toy.bundle, row_cache=RowCache())
    flag = threading.Event()
    go, thread = cancel_from_thread(flag)
    block_calls = CountCalls(steered.block)

    def progress(step: int, total: int) -> None:
        if step == 2:
            go.set()
            thread.join(30)

    try:
        with pytest.raises(GenerationCanceled) as err:
            steered.generate(request(steps=8, cancel=flag), progress=progress)
    finally:
        block_calls.handle.remove()
    assert err.value.step == 2 and block_calls.calls == 2  # call 3 stopped in its tracker
    # the same pipeline serves the next request normally
    assert len(steered.generate(request(steps=2, n_images=1)).images) == 1
