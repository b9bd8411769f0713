"""The viewer's "What taught it" panel: /api/influence returns exactly what `trace-influence --json`
prints, and the panel (in a real headless Chromium) shows proponents and opponents with their shaded
characters, corpus markup as text."""

from __future__ import annotations

from playwright.sync_api import expect
from test_view import TRAIN_LINE, XSS_DOC, cli_json, client, drop_timing, viewer_run  # noqa: F401 (fixtures)
from test_view_browser import CHROMIUM, browser, page, server, trace  # noqa: F401 (fixtures)


def test_api_influence_is_what_the_cli_prints(client, viewer_run):  # noqa: F811
    from glassgpt.trace import influence_cli

    out, _ = viewer_run
    prompt, rest = "First Citizen:\n", "Before we proceed"
    r = client.post("/api/influence", json={"text": prompt + rest, "prompt": prompt, "k": 3})
    assert r.status_code == 200, r.text
    want = cli_json(influence_cli.main, [f"--out_dir={out}", f"--text={prompt}", f"--output={rest}", "--k=3", "--json"])
    assert drop_timing(r.json()) == drop_timing(want)
    whole = client.post("/api/influence", json={"text": TRAIN_LINE}).json()
    assert whole["prompt_tokens"] == 1 and "".join(whole["tokens"]) == TRAIN_LINE
    assert whole["candidates_from"]["spans"] >= 1  # the dataset has a span index: its hits are candidates
    assert client.post("/api/influence", json={"text": "F"}).status_code == 400


def test_panel_shows_what_taught_it_and_markup_stays_text(page, server):  # noqa: F811
    import pytest

    if CHROMIUM is None:
        pytest.skip("no Chromium binary found")
    page.goto(server)
    page.wait_for_selector("body[data-loaded='1']")
    expect(page.locator("#influence-run")).to_be_disabled()
    trace(page, XSS_DOC.strip() + "\n" + TRAIN_LINE)
    page.click("#influence-run")
    page.wait_for_selector("#influence .influence", timeout=60_000)
    expect(page.locator("#influence-what")).to_contain_text("nats")
    wins = page.locator("#influence .influence")
    assert wins.count() >= 2
    expect(wins.first.locator(".loc")).to_contain_text("line")
    shaded = page.eval_on_selector_all("#influence .influence span",
                                       "els => els.filter(e => e.style.background).length")
    assert shaded >= 10, shaded
    assert page.locator("#influence img, #influence script").count() == 0
    assert page.evaluate("typeof window.__pwned") == "undefined"
    expect(page.locator("#influence")).to_contain_text("explains:")
