"""The web page at `/`, driven by Debian's Chromium through Playwright, against a real stack:
the gateway under uvicorn on a free port and a `steer worker` process on the toy pipeline,
sharing a Redis database (module-scoped: started once for these tests), under a content
policy (POLICY: green always suppressed, striped backgrounds flagged).

Covered: submit and watch progress and the queue, both images with their scores, policy
flags and download links, history; cancel a long job; API errors shown next to their field
(422) and for a job that does not exist (404); no horizontal scroll at 400 px; keyboard-only
use; the API key box on 401; a refusal under an API key's own policy. Timeouts are generous
(2 shared cores); nothing asserts a speed.

SAVE_SCREENSHOTS=1 writes docs/images/web-desktop.png and web-narrow.png.
"""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright

from service.auth import create_key
from service.catalog import load_catalog
from service.settings import REPO_ASSETS, Settings
from tests.service.conftest import TEST_REDIS_URL, fast_settings, shared_redis
from tests.service.live_support import serving, wait_http_ready
from tests.service.worker_support import ROOT, WorkerProcess, start_worker

CHROMIUM = Path(os.environ.get("STEER_TEST_CHROMIUM", "/usr/bin/chromium"))
SCREENSHOTS = ROOT / "docs" / "images"
SAVE = os.environ.get("SAVE_SCREENSHOTS") == "1"
PROMPT = "a red circle on a striped background"
MAX_STEPS = 500      # a job long enough to cancel mid-run (about 10 s here)
RESULT_MS = 120_000  # a job on a busy 2-core machine
UI_MS = 15_000       # the page reacting to an answer
POLICY = """\
default = "public"

[policies.public]
description = "Toy stand-ins: green is never shown; striped backgrounds are flagged."
suppress = [{ concept = "green" }]
detect = [{ concept = "striped", threshold = 0.5, action = "mark" }]

[policies.strict]
detect = [{ concept = "red", threshold = 0.5, action = "refuse" }]
"""


@dataclass
class Stack:
    base: str
    settings: Settings
    conn: redis.Redis
    worker: WorkerProcess


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    conn = shared_redis()
    conn.flushdb()
    folder = tmp_path_factory.mktemp("web")
    (folder / "policy.toml").write_text(POLICY)
    settings = fast_settings(folder / "data", TEST_REDIS_URL, max_steps=MAX_STEPS,
                             max_job_cost=MAX_STEPS * 32 * 32 * 8,  # long jobs allowed here
                             policy_file=folder / "policy.toml")
    worker = start_worker(settings, "web", folder)
    try:
        with serving(settings) as base:
            wait_http_ready(base, worker)
            yield Stack(base, settings, conn, worker)
    finally:
        worker.proc.terminate()
        try:
            worker.proc.wait(30)                  # warm shutdown
        except subprocess.TimeoutExpired:
            worker.proc.kill()
            worker.proc.wait(10)
        conn.flushdb()
        conn.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.is_file():
        pytest.fail(f"no Chromium at {CHROMIUM}: `apt-get install -y chromium` (make test "
                    "installs it), or point STEER_TEST_CHROMIUM at one")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh tab (its own sessionStorage) at desktop size; console errors fail the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    yield tab
    context.close()
    assert not errors, errors


def open_page(page: Page, base: str) -> None:
    page.goto(base + "/")
    expect(group(page, "Colour")).to_be_visible(timeout=UI_MS)


def panel(page: Page, role: str) -> Locator:
    return page.locator(f".panel[data-role={role}]")


def finished(page: Page, role: str) -> Locator:
    """The panel of job ``role`` once its job has ended (whichever way: fails fast)."""
    job = panel(page, role)
    expect(job).to_have_attribute("data-status", re.compile("succeeded|failed|canceled|error"),
                                  timeout=RESULT_MS)
    return job


def group(page: Page, name: str) -> Locator:
    """A fieldset by its legend: a kind ("Colour") or a concept ("red")."""
    return page.get_by_role("group", name=name, exact=True)


def fill_request(page: Page, steps: int, seed: int = 11, suppress: str | None = "red") -> None:
    page.get_by_label("Prompt", exact=True).fill(PROMPT)
    page.get_by_label("Seed").fill(str(seed))
    page.get_by_label("Steps").fill(str(steps))
    if suppress:
        group(page, suppress).get_by_label("Suppress").check()


def record_progress(page: Page) -> None:
    """Keep every text the panels' step lines show (polls are 0.5 s apart; a job may end
    between two Playwright checks)."""
    page.evaluate("""() => {
        window.seenSteps = [];
        new MutationObserver(() => document.querySelectorAll('.panel .step').forEach(
            (s) => window.seenSteps.push(s.closest('.panel').dataset.role + ': ' + s.textContent)))
          .observe(document.getElementById('panels'), {subtree: true, childList: true,
                                                       characterData: true});
    }""")


def overflowing(page: Page) -> list[str]:
    """Elements that stick out past the viewport's right edge ([] when nothing scrolls)."""
    return page.evaluate("""() => {
        const width = document.documentElement.clientWidth;
        if (document.documentElement.scrollWidth <= width) return [];
        return [...document.querySelectorAll('body *')]
          .filter((e) => e.getBoundingClientRect().right > width + 0.5)
          .map((e) => `${e.tagName}.${e.className} ${e.getBoundingClientRect().right}`);
    }""")


def screenshot(page: Page, name: str) -> None:
    if SAVE:
        page.screenshot(path=str(SCREENSHOTS / name), full_page=True)


def test_submit_watch_progress_and_see_both_images(page: Page, stack: Stack) -> None:
    open_page(page, stack.base)
    expect(group(page, "Shape")).to_be_visible()
    expect(group(page, "Background")).to_be_visible()
    expect(page.locator("#policy-note")).to_contain_text("Content policy: public")
    expect(group(page, "green")).to_contain_text("Always suppressed by the content policy")
    expect(group(page, "green").get_by_role("radio")).to_have_count(0)
    red = group(page, "red")
    fill_request(page, steps=60)
    red_spec = load_catalog(REPO_ASSETS / "toy-bundle").concepts["red"]
    expect(red.get_by_label(re.compile("^γ"))).to_have_value(f"{red_spec.default_gamma:g}")
    record_progress(page)
    page.get_by_role("button", name="Generate", exact=True).click()

    for role in ("unedited", "edited"):
        expect(finished(page, role).get_by_role("status")).to_have_text("Done")
        image = panel(page, role).get_by_role("img", name=re.compile(f"{role} image, seed 11",
                                                                       re.IGNORECASE))
        expect(image).to_be_visible()
        expect(panel(page, role).locator(".scores summary")).to_contain_text("Detected:")
        assert image.evaluate("i => i.naturalWidth") == 32            # the toy model's size
        assert image.bounding_box()["width"] >= 128                  # shown scaled up
        assert image.evaluate("i => getComputedStyle(i).imageRendering") == "pixelated"
        link = panel(page, role).get_by_role("link", name=re.compile("Download"))
        assert link.get_attribute("download") == f"sae-steering-11-{role}.png"
        png = page.request.get(link.get_attribute("href"))
        assert png.ok and png.body()[:8] == b"\x89PNG\r\n\x1a\n"
    expect(panel(page, "edited").locator(".panel-note")).to_contain_text(  # the defaults
        f"−red γ{red_spec.default_gamma:g} p{red_spec.default_percentile:g}")
    checks = panel(page, "unedited").get_by_role("list", name="Content policy checks")
    expect(checks).to_contain_text("striped: mark — score")
    expect(panel(page, "unedited").locator(".policy-badge")).to_have_text("Flagged by the policy")

    seen = page.evaluate("() => window.seenSteps")
    partial = [s for s in seen if (m := re.search(r"step (\d+) of (\d+)", s))
               and 0 < int(m[1]) < int(m[2])]
    assert partial, seen                                       # progress was shown mid-run
    assert any("edited: Queued" in s for s in seen), seen      # the second job waited its turn

    history = page.locator("#history-list li")
    expect(history).to_have_count(1)
    expect(history.first).to_contain_text(PROMPT)
    expect(history.first.locator(".badge")).to_have_text("succeeded")
    expect(history.first.locator("img.thumb")).to_have_count(2)
    screenshot(page, "web-desktop.png")


def test_cancel_a_long_job(page: Page, stack: Stack) -> None:
    open_page(page, stack.base)
    fill_request(page, steps=MAX_STEPS)
    page.get_by_role("button", name="Generate", exact=True).click()
    unedited = panel(page, "unedited")
    expect(unedited.locator(".step")).to_contain_text(re.compile(r"step [1-9]"),
                                                      timeout=RESULT_MS)
    cancel = page.get_by_role("button", name="Cancel", exact=True)
    expect(cancel).to_be_enabled()
    cancel.click()
    for role in ("unedited", "edited"):
        expect(finished(page, role).get_by_role("status")).to_have_text("Canceled")
        expect(panel(page, role).get_by_role("img")).to_be_hidden()
    expect(cancel).to_be_disabled()
    expect(page.locator("#history-list .badge").first).to_have_text("canceled")


def test_api_errors_are_shown_next_to_their_field(page: Page, stack: Stack) -> None:
    open_page(page, stack.base)
    prompt, steps = page.get_by_label("Prompt", exact=True), page.get_by_label("Steps")
    steps.fill("0")
    page.get_by_role("button", name="Generate", exact=True).click()
    prompt_error, steps_error = page.locator("#prompt-error"), page.locator("#steps-error")
    # The request model's 422 names both fields: each message goes next to its own.
    expect(prompt_error).to_have_text(re.compile("at least 1 character"), timeout=UI_MS)
    expect(steps_error).to_have_text("Input should be greater than or equal to 1")
    expect(prompt).to_be_focused()
    expect(prompt).to_have_attribute("aria-invalid", "true")
    prompt.fill(PROMPT)                                           # editing clears its error
    expect(prompt_error).to_be_hidden()
    expect(steps_error).to_be_visible()

    steps.fill(str(MAX_STEPS + 1))                                # the gateway's own 422
    page.get_by_role("button", name="Generate", exact=True).click()
    expect(steps_error).to_have_text(f"{MAX_STEPS + 1} is outside [1, {MAX_STEPS}]",
                                     timeout=UI_MS)
    expect(steps).to_be_focused()
    steps.fill("10")
    expect(steps_error).to_be_hidden()

    # A concept's error goes into its row (γ beyond the bundle's range: a stale page).
    gamma = group(page, "red").get_by_label(re.compile("^γ"))
    group(page, "red").get_by_label("Suppress").check()
    gamma.evaluate("slider => { slider.max = 500; slider.value = 300; }")
    page.get_by_role("button", name="Generate", exact=True).click()
    expect(group(page, "red").locator(".field-error")).to_contain_text(
        "gamma 300.0 for 'red' is outside its range", timeout=UI_MS)
    expect(gamma).to_be_focused()
    expect(gamma).to_have_attribute("aria-invalid", "true")
    expect(page.locator(".panel")).to_have_count(0)               # nothing was queued

    # A job that no longer exists (expired, deleted): its 404 is shown in its panel.
    missing = str(uuid.uuid4())
    page.evaluate("""(id) => sessionStorage.setItem('steer.history', JSON.stringify([{
        id, prompt: 'an old job', seed: 1, edits: '',
        jobs: [{label: 'unedited', id, note: 'Without your edits'}]}]))""", missing)
    page.reload()
    page.get_by_role("button", name=re.compile("an old job")).click()
    expect(panel(page, "unedited").get_by_role("status")).to_contain_text(
        f"no generation '{missing}'", timeout=UI_MS)


def test_page_at_400_px_has_no_horizontal_scroll(browser: Browser, stack: Stack) -> None:
    context = browser.new_context(viewport={"width": 400, "height": 800})
    page = context.new_page()
    try:
        open_page(page, stack.base)
        assert not overflowing(page), overflowing(page)
        fill_request(page, steps=20, seed=5)
        group(page, "circle").get_by_label("Amplify").check()
        page.get_by_role("button", name="Generate", exact=True).click()
        for role in ("unedited", "edited"):
            expect(finished(page, role).get_by_role("img")).to_be_visible()
        panel(page, "edited").locator(".scores summary").click()     # the widest content
        assert not overflowing(page), overflowing(page)
        boxes = [panel(page, r).bounding_box() for r in ("unedited", "edited")]
        assert boxes[0]["y"] == boxes[1]["y"]                          # still side by side
        screenshot(page, "web-narrow.png")
    finally:
        context.close()


def focused(page: Page) -> dict:
    return page.evaluate("""() => { const a = document.activeElement;
        return {id: a.id, type: a.type ?? '', text: a.textContent.trim(),
                concept: a.closest('fieldset.concept')?.dataset.concept ?? null,
                outline: getComputedStyle(a).outlineStyle}; }""")


def tab_until(page: Page, matches, limit: int = 80) -> dict:
    for _ in range(limit):
        page.keyboard.press("Tab")
        now = focused(page)
        if matches(now):
            return now
    raise AssertionError(f"never reached by Tab; last focus: {focused(page)}")


def test_keyboard_only_submit(page: Page, stack: Stack) -> None:
    open_page(page, stack.base)
    tab_until(page, lambda f: f["id"] == "prompt")
    page.keyboard.type(PROMPT)
    # Into the "red" concept's radio group (focus lands on "Off"), → selects Suppress. (Not
    # blue: the page's policy removes green, and blue ⇄ green swap into each other: refused.)
    radio = tab_until(page, lambda f: f["concept"] == "red" and f["type"] == "radio")
    assert radio["outline"] != "none"                                 # a visible focus ring
    page.keyboard.press("ArrowRight")
    expect(group(page, "red").get_by_label("Suppress")).to_be_checked()
    tab_until(page, lambda f: f["id"] == "steps")
    page.keyboard.press("Control+A")
    page.keyboard.type("12")
    button = tab_until(page, lambda f: f["id"] == "generate")
    assert button["outline"] != "none"
    page.keyboard.press("Enter")
    for role in ("unedited", "edited"):
        expect(finished(page, role).get_by_role("img")).to_be_visible()
    expect(panel(page, "edited").locator(".panel-note")).to_contain_text("−red")


@contextmanager
def keyed_gateway(stack: Stack) -> Iterator[str]:
    """A second gateway on the same Redis (and worker) with API keys required."""
    with serving(stack.settings.model_copy(update={"auth_enabled": True})) as base:
        yield base


def test_api_key_is_asked_for_on_401(page: Page, stack: Stack) -> None:
    _, token = create_key(stack.conn, "web-test")
    with keyed_gateway(stack) as base:
        page.goto(base + "/")
        key_box = page.get_by_role("region", name="API key needed")
        expect(key_box).to_be_visible(timeout=UI_MS)
        key = page.get_by_label("API key", exact=True)
        expect(key).to_be_focused()
        key.fill("steer_wrong")
        page.keyboard.press("Enter")
        expect(key_box).to_contain_text("invalid or revoked", timeout=UI_MS)
        key.fill(token)
        page.get_by_role("button", name="Use this key", exact=True).click()
        expect(group(page, "Colour")).to_be_visible(timeout=UI_MS)
        expect(key_box).to_be_hidden()
        assert page.evaluate("() => sessionStorage.getItem('steer.apiKey')") == token


def test_a_refusal_under_the_keys_own_policy(page: Page, stack: Stack) -> None:
    _, token = create_key(stack.conn, "strict-key", policy="strict")
    with keyed_gateway(stack) as base:
        page.add_init_script(f"sessionStorage.setItem('steer.apiKey', {token!r})")
        open_page(page, base)
        expect(page.locator("#policy-note")).to_contain_text(
            "Content policy: strict (your API key's own)")
        expect(page.locator("#policy-note")).to_contain_text("red (refuse at score ≥ 0.5)")
        # rules judge the final image, so the edited one keeps red (and is refused too) while
        # its background is steered away
        fill_request(page, steps=10, suppress="striped")
        page.get_by_role("button", name="Generate", exact=True).click()
        for role in ("unedited", "edited"):
            job = finished(page, role)
            expect(job.get_by_role("status")).to_have_text("Refused by the content policy")
            expect(job.get_by_role("list", name="Content policy checks")).to_contain_text(
                "red: refuse — score")
            expect(job.get_by_role("img")).to_have_count(0)
        expect(page.locator("#history-list .badge").first).to_have_text("failed")
