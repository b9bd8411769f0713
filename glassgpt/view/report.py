"""`glassgpt report`: the viewer's page for one generation, as ONE self-contained HTML file.

    glassgpt report --out_dir=out-shakespeare-char --start="ROMEO:" --out=report.html
    glassgpt report --out_dir=out-shakespeare-char --text=FILE:poem.txt --out=poem.html
    glassgpt report --out_dir=out-shakespeare-char --start="ROMEO:" --build    # build missing indexes first

The page's CSS and JS are inlined, and the results (the same dicts the viewer's API returns, plus
the top neurons' training windows) travel as JSON in a <script type="application/json"> block,
escaped so that no corpus text can close it. No server, no network: it opens from disk.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glassgpt.errors import UserError
from glassgpt.sampling import SamplingSettings, sampling_settings

STATIC = Path(__file__).resolve().parent / "static"
CSP = ("default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:")


@dataclass
class ReportConfig(SamplingSettings):
    """`glassgpt report`: one generation (or a given text) and what explains it, as one HTML file."""

    out_dir: str = "out"
    """Checkpoint directory (ckpt.pt)."""
    data_dir: str | None = None
    """Training data; default: the checkpoint's own."""
    start: str | None = None
    """Prompt to generate from (FILE:path reads a file); default '\\n' unless --text is given."""
    text: str | None = None
    """Explain this text (FILE:path reads a file) instead of generating."""
    out: str = "report.html"
    """Where to write the page."""
    k: int = 5
    """Nearest training windows shown."""
    cards: int = 10
    """Top neurons whose training windows are included (each selectable in the page)."""
    build: bool = False
    """Build every missing or stale index first (spans, kNN store, neuron baseline and examples, influence store)."""
    device: str = "auto"


def json_for_script(obj: Any) -> str:
    """JSON safe inside <script type="application/json">: '<', '>' and '&' as \\u escapes, so
    '</script>' or '<!--' in a corpus cannot end the block (JSON.parse reads them back unchanged)."""
    from glassgpt.view.server import clean_json

    s = json.dumps(clean_json(obj), ensure_ascii=False)
    return (s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def build_html(data: dict[str, Any]) -> str:
    """index.html with style.css and app.js inlined and `data` embedded."""
    html = (STATIC / "index.html").read_text(encoding="utf-8")
    css = (STATIC / "style.css").read_text(encoding="utf-8")
    js = (STATIC / "app.js").read_text(encoding="utf-8")
    if "</style" in css.lower() or "</script" in js.lower():
        raise AssertionError("static files must not contain </style or </script: they are inlined")
    link, script = '<link rel="stylesheet" href="/static/style.css">', '<script src="/static/app.js"></script>'
    assert link in html and script in html, "index.html changed: update build_html"
    head = f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n<style>\n{css}</style>'
    body = (f'<script id="glassgpt-data" type="application/json">{json_for_script(data)}</script>\n'
            f"<script>\n{js}</script>")
    # str.replace with a function-free literal: the replacement text is not a regex template
    return html.replace(link, head, 1).replace(script, body, 1)


def report_data(session, text: str, prompt: str, what: str, k: int = 5, cards: int = 10) -> dict[str, Any]:
    """Everything the page shows: run info, the explanation (with "what taught it" where the influence
    store exists), and the top neurons' cards."""
    prompt_chars = len(prompt) if prompt and text.startswith(prompt) else 0
    result = session.explain(text, prompt_chars, k)
    if "influence" in session.indexes:  # the viewer computes it on demand; a report carries it
        result["influence"] = session.influence(text, prompt_chars, k)
    info = session.info()
    for s in info["indexes"].values():
        s["build"] = None
    top = result["neurons"].get("top", []) if isinstance(result.get("neurons"), dict) else []
    out_cards = {}
    if "examples" in session.indexes:
        for t in top[:cards]:
            out_cards[f"{t['layer']}:{t['index']}"] = session.neuron_card(t["layer"], t["index"], 8)
    return {"run": info, "result": result, "cards": out_cards, "what": what,
            "written_at": time.strftime("%Y-%m-%d %H:%M:%S")}


def main(argv: list[str] | None = None) -> Path | None:
    from glassgpt.config import load_config, read_text_arg, wants_help

    if wants_help(ReportConfig, argv, "glassgpt report"):
        return None
    cfg = load_config(ReportConfig, argv)
    if cfg.start is not None and cfg.text is not None:
        raise UserError("pass either --start (generate, then explain) or --text (explain as is), not both")
    from glassgpt.view.explain import Session

    session = Session(cfg.out_dir, cfg.data_dir, cfg.device)
    if cfg.build:
        for kind in list(session.problems):
            print(f"building the missing {kind} index: {session.build_commands()[kind]}", file=sys.stderr)
            session.build(kind)
    for problem in session.problems.values():
        print(f"warning: {problem}", file=sys.stderr)
    if cfg.text is not None:
        text, prompt = read_text_arg(cfg.text), ""
        what = f"text given with --text ({len(text)} characters)"
    else:
        prompt = read_text_arg(cfg.start if cfg.start is not None else "\n", "start")
        s = sampling_settings(cfg)
        text = session.generate(prompt, s)["text"]
        what = f"generated from {prompt!r}: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(s).items())
    data = report_data(session, text, prompt, what, cfg.k, cfg.cards)
    from glassgpt.artifacts import write_file_atomic

    out = write_file_atomic(cfg.out, build_html(data).encode("utf-8"))
    print(f"wrote {out} ({Path(out).stat().st_size / 1024:.0f} KiB): open it in a browser, no server needed")
    return Path(out)
