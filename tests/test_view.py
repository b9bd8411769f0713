"""The viewer's HTTP API (TestClient) and the static report, on a tiny random model and dataset.

The API must return exactly what each engine's `--json` CLI prints (one source of truth), stream a
generation token by token, and answer bad input with the CLI's one-line message and a 4xx status.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
from conftest import TINY_TEXT, make_char_dataset, make_checkpoint
from fastapi.testclient import TestClient

TRAIN_LINE = "Before we proceed any further, hear me speak."  # occurs in the training text


@pytest.fixture(scope="module")
def viewer_run(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny char dataset (with an XSS probe document) and checkpoint, every index built once."""
    from glassgpt.view.explain import Session

    root = tmp_path_factory.mktemp("view")
    data = make_char_dataset(root / "data" / "tiny", TINY_TEXT + XSS_DOC * 3)
    out = root / "out"
    make_checkpoint(out, data, block_size=32)
    s = Session(out)
    for kind in ("spans", "knn", "neurons", "examples", "influence"):
        s.build(kind)
    assert s.problems == {}, s.problems
    return out, data


XSS_DOC = "Evil:\n<script>window.__pwned=1</script> <img src=x onerror=\"window.__pwned=2\"> </textarea> speak.\n\n"


@pytest.fixture(scope="module")
def client(viewer_run):
    from glassgpt.view.explain import Session
    from glassgpt.view.server import ViewConfig, make_app

    out, _ = viewer_run
    cfg = ViewConfig(out_dir=str(out), max_new_tokens_limit=300, max_prompt_chars=2000, max_body_bytes=20_000)
    return TestClient(make_app(Session(out), cfg))


def cli_json(main, argv: list[str]) -> dict:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main(argv)
    return json.loads(buf.getvalue())


def drop_timing(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in ("query_ms",)}


def test_api_returns_exactly_what_the_cli_prints(client, viewer_run):
    from glassgpt.trace import knn, neurons, spans

    out, data = viewer_run
    text = TRAIN_LINE + "\nAll:\nSpeak, speak."
    r = client.post("/api/spans", json={"text": text})
    assert r.status_code == 200, r.text
    want = cli_json(spans.main, [f"--data_dir={data}", f"--text={text}", "--json"])
    assert r.json() == want
    assert want["spans"], "the traced training text must have at least one span"
    r = client.post("/api/knn", json={"text": text, "k": 3})
    want = cli_json(knn.main, [f"--out_dir={out}", f"--text={text}", "--k=3", "--json"])
    assert drop_timing(r.json()) == drop_timing(want)
    r = client.post("/api/neurons", json={"text": text})
    want = cli_json(neurons.main, [f"--out_dir={out}", f"--start={text[:1]}", f"--output={text[1:]}", "--ablate",
                                   "--json"])
    assert r.json() == json.loads(json.dumps(want)), "neurons API differs from trace-neurons --json"


def test_generate_streams_then_explains(client, viewer_run):
    from glassgpt.run import open_run
    from glassgpt.sampling import complete

    body = {"prompt": "First Citizen:\n", "max_new_tokens": 40, "temperature": 0.8, "top_k": 20, "seed": 7}
    with client.stream("POST", "/api/generate", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = "".join(r.iter_text())
    events = [(m.group(1), json.loads(m.group(2))) for m in re.finditer(r"event: (\w+)\ndata: (.*)\n\n", raw)]
    pieces = [p["text"] for kind, p in events if kind == "piece"]
    assert len(pieces) >= 10, "the text must arrive token by token"
    kind, done = events[-1]
    assert kind == "done" and "".join(pieces) == done["generated"]
    run = open_run(viewer_run[0])
    want = complete(run.model, run.tokenizer, body["prompt"], 40, temperature=0.8, top_k=20, seed=7).text
    assert done["generated"] == want, "the viewer must sample exactly as the CLI does"
    r = client.post("/api/explain", json={"text": done["text"], "prompt": done["prompt"]})
    assert r.status_code == 200, r.text
    e = r.json()
    assert e["prompt_chars"] == len(body["prompt"])
    assert set(e) >= {"spans", "knn", "neurons", "token_offsets", "timings_ms"}
    assert "error" not in e["spans"] and "error" not in e["knn"] and "error" not in e["neurons"]
    assert len(e["token_offsets"]) == len(e["neurons"]["top"][0]["token_activations"]) + 1


@pytest.mark.parametrize("path,body,status,needle", [
    ("/api/spans", {"text": "x" * 2001}, 400, "at most 2,000"),
    ("/api/knn", {"text": "speak \u00e9\u00e9"}, 400, "never saw"),
    ("/api/generate", {"prompt": "All:", "max_new_tokens": 301}, 400, "max_new_tokens=301 is out of range"),
    ("/api/generate", {"prompt": "All:", "temperature": -1}, 400, "temperature"),
    ("/api/generate", {"prompt": "All: \u2603"}, 400, "never saw"),
    ("/api/spans", {"text": 5}, 400, "as a string"),
    ("/api/neuron", {"layer": 9, "index": 0}, 400, "out of range"),
    ("/api/context", {"token_start": -1, "token_end": 3}, 400, "outside the training split"),
    ("/api/spans", {"text": "y" * 30_000}, 413, "request body over"),
])
def test_bad_input_gets_one_line_and_4xx(client, path, body, status, needle):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    msg = r.json()["error"]
    assert needle in msg and "\n" not in msg and "Traceback" not in msg
    assert client.get("/api/run").status_code == 200, "the server keeps serving"


def test_invalid_json_and_missing_index(viewer_run, tmp_path):
    from glassgpt.view.explain import Session
    from glassgpt.view.server import ViewConfig, make_app

    out, data = viewer_run
    fresh = tmp_path / "out2"
    make_checkpoint(fresh, data, seed=3)  # other weights: the kNN store and neuron artifacts are missing
    c = TestClient(make_app(Session(fresh), ViewConfig(out_dir=str(fresh))))
    assert c.post("/api/spans", content=b"{not json", headers={"content-type": "application/json"}).status_code == 400
    r = c.post("/api/knn", json={"text": TRAIN_LINE})
    assert r.status_code == 400 and "glassgpt trace-knn" in r.json()["error"] and "--build" in r.json()["error"]
    e = c.post("/api/explain", json={"text": TRAIN_LINE}).json()
    assert "error" in e["knn"] and "spans" in e["spans"], "one missing index does not stop the others"
    ix = c.get("/api/run").json()["indexes"]
    assert ix["spans"]["fresh"] and not ix["knn"]["fresh"] and "trace-knn" in ix["knn"]["command"]


def test_build_from_the_page_reports_progress(viewer_run, tmp_path):
    import time

    from glassgpt.view.explain import Session
    from glassgpt.view.server import ViewConfig, make_app

    _, data = viewer_run
    fresh = tmp_path / "out3"
    make_checkpoint(fresh, data, seed=4)
    c = TestClient(make_app(Session(fresh), ViewConfig(out_dir=str(fresh))))
    assert c.post("/api/build", json={"kind": "knn"}).json() == {"started": "knn"}
    for _ in range(600):
        p = c.get("/api/progress").json()
        if p["indexes"]["knn"]["build"]["state"] != "running":
            break
        time.sleep(0.05)
    assert p["indexes"]["knn"]["build"]["state"] == "done", p
    assert p["indexes"]["knn"]["fresh"]
    assert c.post("/api/build", json={"kind": "nope"}).status_code == 400


def test_builds_go_through_the_library_and_report_progress(viewer_run, tmp_path, capsys):
    """Session.build calls the engines' build functions (not a CLI main under a redirected stdout) and
    hears their progress through the callback they take, up to done == total."""
    from glassgpt.view.explain import Session

    _, data = viewer_run
    fresh = tmp_path / "out4"
    make_checkpoint(fresh, data, seed=5)
    session = Session(fresh)
    for kind in ("knn", "neurons", "examples"):
        seen: list[tuple[int, int, str]] = []
        session.build(kind, lambda n, total, what, seen=seen: seen.append((n, total, what)))
        assert kind in session.indexes, session.problems.get(kind)
        assert seen and seen[-1][0] == seen[-1][1] > 0, (kind, seen[-3:])
        assert [n for n, _, _ in seen] == sorted(n for n, _, _ in seen)
    assert capsys.readouterr().out == ""  # nothing printed for a command line to read


def test_report_is_one_self_contained_file(viewer_run, tmp_path):
    from glassgpt.view import report

    out, _ = viewer_run
    path = report.main([f"--out_dir={out}", "--text=" + XSS_DOC + TRAIN_LINE, f"--out={tmp_path / 'r.html'}"])
    html = path.read_text(encoding="utf-8")
    assert "/static/" not in html and "http://" not in html.replace("http://www.w3.org/2000/svg", "")
    m = re.search(r'<script id="glassgpt-data" type="application/json">(.*?)</script>', html, re.S)
    assert m, "the data block is missing"
    assert "<" not in m.group(1), "raw '<' in the inline data: corpus text could close the script"
    data = json.loads(m.group(1))
    assert data["result"]["text"].startswith("Evil:\n<script>")
    assert data["cards"], "the top neurons' training windows travel with the report"
    influence = data["result"]["influence"]  # "what taught it": the CLI's --json for this text
    assert influence["proponents"] or influence["opponents"], sorted(influence)
    assert html.count("<script") == 2 and html.count("</script>") == 2


def test_json_for_script_round_trips():
    from glassgpt.view.report import json_for_script

    tricky = {"t": "</script><!-- & \u2028 <img src=x onerror=alert(1)>"}
    s = json_for_script(tricky)
    assert "<" not in s and ">" not in s and "&" not in s
    assert json.loads(s) == tricky


def test_bind_picks_a_free_loopback_port():
    from glassgpt.errors import UserError
    from glassgpt.view.server import bind

    a = bind("127.0.0.1", 0)
    try:
        assert a.getsockname()[0] == "127.0.0.1" and a.getsockname()[1] > 0
        with pytest.raises(UserError, match="pick another --port"):
            bind("127.0.0.1", a.getsockname()[1]).close()
    finally:
        a.close()


def test_stale_index_says_how_to_rebuild(viewer_run, tmp_path):
    from glassgpt.view.explain import Session
    from glassgpt.view.server import ViewConfig, make_app

    _, data = viewer_run
    out = tmp_path / "out4"
    make_checkpoint(out, data, seed=5)
    Session(out).build("knn")
    make_checkpoint(out, data, seed=6)  # new weights in the same out_dir: the store is now stale
    c = TestClient(make_app(Session(out), ViewConfig(out_dir=str(out))))
    r = c.post("/api/knn", json={"text": TRAIN_LINE})
    assert r.status_code == 400 and "stale" in r.json()["error"] and "--build" in r.json()["error"], r.text
    assert not c.get("/api/run").json()["indexes"]["knn"]["fresh"]
