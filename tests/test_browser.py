"""The playground page in headless Chromium (Playwright): type, Generate, watch the story stream in, Stop,
"why this word?", and a screenshot on a desktop and a phone viewport."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from conftest import STORIES260K, TOK512

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} not installed"),
]
sync_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("fastapi")

from test_serve import Server  # noqa: E402


@pytest.fixture(scope="module")
def story_checkpoint(tmp_path_factory, random_checkpoint) -> Path:
    """The llama2.c stories260K model when it can be imported (coherent stories), else the random model."""
    try:
        from tinystories.export.llama2c import import_llama2c
    except ImportError:
        return random_checkpoint
    if not STORIES260K.is_file():
        return random_checkpoint
    out = tmp_path_factory.mktemp("s260k") / "stories260K"
    import_llama2c(STORIES260K, TOK512, out)
    return out


@pytest.fixture(scope="module")
def server(story_checkpoint):
    s = Server(story_checkpoint, "--max-concurrent", "2", "--no-compile")
    try:
        yield s.wait()
    finally:
        s.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def set_range(page, sel: str, value) -> None:
    page.eval_on_selector(sel, "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }", str(value))


def test_generate_stream_stop_and_why(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 800}, device_scale_factor=1)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model-info').textContent.includes('parameters')")
    assert page.locator(".chip").count() >= 4

    page.fill("#prompt", "Once upon a time, there was a little cat named Tom.")
    set_range(page, "#temperature", 0.7)
    set_range(page, "#max_new_tokens", 480)
    assert page.inner_text("#temperature-out") == "0.70"
    page.click("#generate")
    assert page.is_disabled("#generate") and page.is_enabled("#stop")
    page.wait_for_function("document.querySelectorAll('#output .tok').length >= 100", timeout=20_000)
    n_before = page.locator("#output .tok").count()
    page.wait_for_function(f"document.querySelectorAll('#output .tok').length > {n_before}", timeout=10_000)
    # the story may have ended on its own by now (a fast machine): a click on a disabled Stop does nothing
    page.eval_on_selector("#stop", "b => b.click()")
    page.wait_for_function("!document.getElementById('generate').disabled", timeout=5_000)
    finish = page.inner_text("#stat-finish")
    assert finish in ("stopped", "the end", "length limit"), finish
    n_tokens = page.locator("#output .tok").count()
    page.wait_for_timeout(300)
    assert page.locator("#output .tok").count() == n_tokens  # nothing arrives after Stop
    assert int(page.inner_text("#stat-tokens")) >= 100
    assert page.inner_text("#stat-speed") not in ("", "–")
    story = page.inner_text("#output")
    assert story.startswith("Once upon a time, there was a little cat named Tom.") and len(story) > 150

    # "why this word?": the top-5 alternatives of a generated token
    # a whole word the model hesitated over (its choice under 70%), else the 9th token
    pick = page.evaluate("""() => {
        const toks = [...document.querySelectorAll('#output .tok')];
        const i = toks.findIndex((t, k) => k > 4 && /^ [A-Za-z]{3,}$/.test(t.textContent)
                                   && JSON.parse(t.dataset.top)[0].prob < 0.7);
        return i >= 0 ? i : 8; }""")
    page.locator("#output .tok").nth(pick).click()
    assert page.is_visible("#why")
    assert page.locator("#why-list li").count() >= 5
    assert "%" in page.inner_text("#why-list")
    shot = tmp_path / "playground.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("TINYSTORIES_SAVE_SCREENSHOTS"):
        dest = Path(os.environ["TINYSTORIES_SAVE_SCREENSHOTS"])
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, dest / "playground.png")
    page.keyboard.press("Escape")
    assert page.is_hidden("#why")
    assert not errors, errors
    page.close()


def test_phone_layout(server, browser, tmp_path):
    ctx = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=1, is_mobile=True,
                              has_touch=True)
    page = ctx.new_page()
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model-info').textContent.includes('parameters')")
    # one column, nothing wider than the screen
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    controls = page.locator(".controls").bounding_box()
    story = page.locator(".story").bounding_box()
    assert story["y"] >= controls["y"] + controls["height"] - 1
    page.locator(".chip").first.click()
    set_range(page, "#max_new_tokens", 40)
    page.click("#generate")
    page.wait_for_function("!document.getElementById('generate').disabled", timeout=20_000)
    assert page.locator("#output .tok").count() > 5
    page.screenshot(path=str(tmp_path / "phone.png"), full_page=True)
    if os.environ.get("TINYSTORIES_SAVE_SCREENSHOTS"):
        shutil.copy(tmp_path / "phone.png", Path(os.environ["TINYSTORIES_SAVE_SCREENSHOTS"]) / "phone.png")
    ctx.close()


def test_key_is_asked_once_and_kept(story_checkpoint, browser):
    # a server with --api-key: the page loads, asks for the key (a wrong one is refused and asked again), keeps
    # it for the next visit, and generates with it
    s = Server(story_checkpoint, "--max-concurrent", "2", "--no-compile", "--api-key", "owl-42").wait()
    ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        page = ctx.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(s.url + "/")
        page.wait_for_selector("#key-form:not([hidden])")
        assert "loading" in page.inner_text("#model-info")
        page.fill("#api-key", "wrong")
        page.click("#key-form button")
        page.wait_for_function("document.getElementById('key-msg').textContent.includes('not accepted')")
        assert page.is_visible("#key-form")
        page.fill("#api-key", "owl-42")
        page.click("#key-form button")
        page.wait_for_function("document.getElementById('model-info').textContent.includes('parameters')")
        assert page.is_hidden("#key-form")

        page = ctx.new_page()  # the next visit: no question
        page.goto(s.url + "/")
        page.wait_for_function("document.getElementById('model-info').textContent.includes('parameters')")
        assert page.is_hidden("#key-form")
        set_range(page, "#max_new_tokens", 16)
        page.click("#generate")
        page.wait_for_function("!document.getElementById('generate').disabled", timeout=20_000)
        assert page.locator("#output .tok").count() > 3 and page.is_hidden("#key-form")
        assert not errors, errors
    finally:
        ctx.close()
        s.stop()
