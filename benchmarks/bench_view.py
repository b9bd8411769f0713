"""Viewer speed and load test, against one real server on 127.0.0.1.

    python -m benchmarks.bench_view --out_dir=out-shakespeare-char [--n=50] [--tokens=200]

1. page load: GET / and its two static files and /api/run, as the page does (and, when Chromium is
   installed, a real headless browser until the run panel is drawn);
2. a 200-token generation streamed from /api/generate, then /api/explain (spans + nearest windows +
   neurons) timed from the end of the stream;
3. load: N concurrent /api/spans requests, each on a distinct text, every answer checked against
   the same request made alone (none mixed); median and p95 latency, with the sequential median
   measured in the same run as the reference.
Missing indexes are built first (timed separately).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def start_server(out_dir: str):
    import uvicorn

    from glassgpt.view.explain import Session
    from glassgpt.view.server import ViewConfig, bind, make_app

    session = Session(out_dir)
    for kind in list(session.problems):
        t0 = time.perf_counter()
        session.build(kind)
        print(f"built missing {kind} index in {time.perf_counter() - t0:.1f} s")
    sock = bind("127.0.0.1", 0)
    srv = uvicorn.Server(uvicorn.Config(make_app(session, ViewConfig(out_dir=out_dir)), log_level="warning"))
    threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not srv.started:
        time.sleep(0.02)
    return srv, f"http://127.0.0.1:{sock.getsockname()[1]}", session


def page_load(client, url: str, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for path in ("/", "/static/app.js", "/static/style.css", "/api/run"):
            client.get(url + path).raise_for_status()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def browser_load(url: str) -> float | None:
    import shutil

    exe = shutil.which("chromium")
    if not exe:
        return None
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        page = b.new_page()
        page.goto(url + "/")  # warm: the first navigation starts the renderer
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            page.goto(url + "/")
            page.wait_for_selector("body[data-loaded='1']")
            times.append(time.perf_counter() - t0)
        b.close()
    return statistics.median(times)


def generate_then_explain(client, url: str, tokens: int) -> tuple[float, float, dict]:
    body = {"prompt": "ROMEO:", "max_new_tokens": tokens, "temperature": 0.8, "top_k": 200, "seed": 1337}
    t0 = time.perf_counter()
    raw = ""
    with client.stream("POST", url + "/api/generate", json=body, timeout=600) as r:
        for chunk in r.iter_text():
            raw += chunk
    gen_s = time.perf_counter() - t0
    done = json.loads(raw.rsplit("event: done\ndata: ", 1)[1])
    t1 = time.perf_counter()
    e = client.post(url + "/api/explain", json={"text": done["text"], "prompt": done["prompt"]}, timeout=600).json()
    return gen_s, time.perf_counter() - t1, e


def load_test(url: str, texts: list[str]) -> tuple[list[float], list[float], int]:
    import httpx

    def one(text: str, client) -> tuple[float, dict]:
        t0 = time.perf_counter()
        r = client.post(url + "/api/spans", json={"text": text}, timeout=600)
        r.raise_for_status()
        return time.perf_counter() - t0, r.json()

    with httpx.Client() as c:
        alone = [one(t, c) for t in texts]  # the reference: each request on its own
    with httpx.Client(limits=httpx.Limits(max_connections=len(texts))) as c, ThreadPoolExecutor(len(texts)) as pool:
        together = list(pool.map(lambda t: one(t, c), texts))
    wrong = sum(1 for (_, a), (_, b), t in zip(alone, together, texts, strict=True) if a != b or a["text"] != t)
    return [s for s, _ in alone], [s for s, _ in together], wrong


def smoke_run(work: Path) -> str:
    """A 1-layer model trained for 1 iteration on 20,000 characters of tiny-shakespeare (for --smoke)."""
    from benchmarks.canaries import train_canary_model, write_char_dataset
    from glassgpt.download import TINYSHAKESPEARE, local_or_fetch

    text = local_or_fetch(TINYSHAKESPEARE, work / "download").read_text()[:20_000]
    data = write_char_dataset(work / "data", text, "tinyshakespeare")
    train_canary_model(data, work / "model", 1, n_layer=1, n_embd=16, block_size=32, batch_size=2, eval_iters=1)
    return str(work / "model")


def main(argv: list[str] | None = None) -> None:
    import tempfile

    argv = sys.argv[1:] if argv is None else argv
    if "--smoke" in argv:  # seconds: a tiny model, 4 requests, 16 tokens, no browser
        with tempfile.TemporaryDirectory(prefix="bench-view-smoke-") as tmp:
            run(smoke_run(Path(tmp)), n=4, tokens=16, browser=False)
        return
    args = dict(a[2:].split("=", 1) for a in argv if a.startswith("--"))
    run(args.get("out_dir", "out-shakespeare-char"), int(args.get("n", 50)), int(args.get("tokens", 200)))


def run(out_dir: str, n: int, tokens: int, browser: bool = True) -> None:
    import httpx

    print(f"load before: {open('/proc/loadavg').read().strip()}")
    srv, url, session = start_server(out_dir)
    with httpx.Client() as client:
        client.get(url + "/api/run")
        load_s = page_load(client, url)
        print(f"page load (HTML + JS + CSS + /api/run, median of 5): {load_s * 1000:.0f} ms")
        b = browser_load(url) if browser else None
        if b is not None:
            print(f"page load in headless Chromium until the run panel is drawn (median of 3): {b * 1000:.0f} ms")
        gen_s, explain_s, e = generate_then_explain(client, url, tokens)
        print(f"{tokens}-token generation streamed in {gen_s:.2f} s; explain after it ended: {explain_s:.2f} s "
              f"(server side ms: {e['timings_ms']})")
    lines = [ln for ln in session.corpus.decode("train", 0, 20000).splitlines() if len(ln) > 20][:n]
    texts = [f"{ln} {i}" for i, ln in enumerate(lines)]  # distinct texts
    alone, together, wrong = load_test(url, texts)
    med_a, med_t = statistics.median(alone), statistics.median(together)
    p95 = sorted(together)[int(0.95 * (len(together) - 1))]
    print(f"{len(texts)} concurrent /api/spans requests: {len(texts) - wrong}/{len(texts)} answered exactly as alone "
          f"(none mixed: {wrong == 0}); latency median {med_t * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms; "
          f"sequential median {med_a * 1000:.0f} ms (ratio {med_t / med_a:.1f}x)")
    print(f"load after: {open('/proc/loadavg').read().strip()}")
    srv.should_exit = True
    if wrong:
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
