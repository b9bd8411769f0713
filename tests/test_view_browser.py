"""The viewer in a real headless Chromium (Playwright's Python API), against a live server on
127.0.0.1 over a tiny random model: load, generate, trace a pasted training sentence, click a span
and its source, select a neuron, and check that corpus markup is shown as text and never runs, in
the live page and in the static report. Skipped only when no Chromium binary exists.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from playwright.sync_api import expect, sync_playwright

from test_view import TRAIN_LINE, XSS_DOC, viewer_run  # noqa: F401 (a shared module fixture)


def find_chromium() -> str | None:
    """The system's Chromium (OS package) or Playwright's own download."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    try:
        with sync_playwright() as p:
            path = p.chromium.executable_path
        return path if os.path.exists(path) else None
    except Exception:
        return None


CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary found (apt-get install chromium, "
                                "or `playwright install chromium`): browser tests skipped")


@pytest.fixture(scope="module")
def server(viewer_run):  # noqa: F811
    import uvicorn

    from glassgpt.view.explain import Session
    from glassgpt.view.server import ViewConfig, bind, make_app

    out, _ = viewer_run
    sock = bind("127.0.0.1", 0)
    app = make_app(Session(out), ViewConfig(out_dir=str(out)))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    t = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    srv.should_exit = True
    t.join(10)
    sock.close()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    pg = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    pg.close()
    assert not errors, f"JavaScript errors in the page: {errors}"


def trace(page, text: str) -> None:
    page.fill("#prompt", text)
    page.evaluate("delete document.body.dataset.ready")
    page.click("#trace")
    page.wait_for_selector("body[data-ready='1']", timeout=60_000)


def test_generate_trace_click_span_and_neuron(page, server, tmp_path):
    t0 = time.perf_counter()
    page.goto(server)
    page.wait_for_selector("body[data-loaded='1']")
    print(f"page loaded and run info shown in {time.perf_counter() - t0:.2f} s")
    expect(page.locator("#run")).to_contain_text("iteration")
    expect(page.locator("#indexes .fresh")).to_have_count(5)
    # generate: the text streams in, then is explained
    page.fill("#prompt", "First Citizen:\n")
    page.fill("#max_new_tokens", "40")
    page.click("#generate")
    page.wait_for_selector("body[data-ready='1']", timeout=60_000)
    assert len(page.inner_text("#output")) > len("First Citizen:")
    expect(page.locator("#knn .neighbour")).to_have_count(5)
    # paste a training sentence: at least one highlighted span; click it, see its source line
    trace(page, TRAIN_LINE + "\n\nAll:\nSpeak, speak.")
    spans = page.locator("#output .hl")
    assert spans.count() >= 1
    assert "occurrence" in (spans.first.get_attribute("title") or "")
    spans.first.click()
    expect(page.locator("#sources .source").first).to_contain_text("line")
    page.locator("#sources .source").first.click()
    expect(page.locator("#context mark")).not_to_be_empty()
    # nearest windows for a selected part of the text
    page.evaluate("""() => { const r = document.createRange(); const o = document.getElementById('output');
        r.setStart(o.firstChild, 0); r.setEnd(o.children[20], 1);
        const s = window.getSelection(); s.removeAllRanges(); s.addRange(r); }""")
    expect(page.locator("#knn-selection")).to_be_enabled()
    page.click("#knn-selection")
    expect(page.locator("#knn-what")).to_contain_text("selected part")
    expect(page.locator("#knn .neighbour")).to_have_count(5)
    # select a neuron: every token coloured by its activation, its training windows shown
    page.locator("tr.neuron").first.click()
    page.wait_for_selector("#neuron-card .example", timeout=60_000)
    coloured = page.eval_on_selector_all("#output .seg.act", "els => els.filter(e => e.style.backgroundColor).length")
    assert coloured >= 10, coloured
    assert page.locator("#neuron-card .example span.act").count() >= 5
    expect(page.locator("#ablation")).to_contain_text("nats")
    shot = tmp_path / "viewer.png"
    page.screenshot(path=str(shot), full_page=True)
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.std() > 10, f"the screenshot looks blank (pixel std {pixels.std():.1f})"


def test_errors_are_shown_in_the_page(page, server):
    page.goto(server)
    page.wait_for_selector("body[data-loaded='1']")
    page.fill("#prompt", "caf\u00e9 \u2603")
    page.click("#trace")
    expect(page.locator("#error")).to_contain_text("never saw")
    page.fill("#prompt", "All:")
    page.fill("#max_new_tokens", "100000")
    page.click("#generate")
    expect(page.locator("#error")).to_contain_text("max_new_tokens=100000 is out of range")


def test_corpus_markup_is_text_in_the_live_page(page, server):
    page.goto(server)
    page.wait_for_selector("body[data-loaded='1']")
    trace(page, XSS_DOC.strip())
    out = page.inner_text("#output")
    assert "<script>window.__pwned=1</script>" in out and '<img src=x onerror="window.__pwned=2">' in out
    assert "</textarea>" in out
    page.locator("#output .hl").first.click()
    expect(page.locator("#sources")).to_contain_text("<script>")
    assert page.locator("#output img, #sources img, #knn img").count() == 0
    assert page.evaluate("typeof window.__pwned") == "undefined"


def test_corpus_markup_is_text_in_the_static_report(browser, viewer_run, tmp_path):  # noqa: F811
    from glassgpt.view import report

    out, _ = viewer_run
    path = report.main([f"--out_dir={out}", "--text=" + XSS_DOC, f"--out={tmp_path / 'report.html'}"])
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(Path(path).as_uri())
    page.wait_for_selector("body[data-ready='1']")
    assert "<script>window.__pwned=1</script>" in page.inner_text("#output")
    assert page.locator("#output .hl").count() >= 1
    page.locator("tr.neuron").first.click()
    page.wait_for_selector("#neuron-card .example")
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert page.locator("img").count() == 0
    assert [u for u in requests if not u.startswith("file:")] == [], "the report must not touch the network"
    assert not errors, errors
    page.close()
