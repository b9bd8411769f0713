"""`glassgpt view`: the viewer's local web server (FastAPI on uvicorn) and its JSON API.

    glassgpt view --out_dir=out-shakespeare-char                 # http://127.0.0.1:<free port>/
    glassgpt view --out_dir=out-shakespeare-char --port=8000 --no_browser

One Session (model, data, indexes) per server, loaded at start; torch work runs in the thread pool
under the session's lock, so concurrent requests queue for the model and never share state. Every
UserError becomes a 400 with {"error": "<the CLI's one line>"}; the server keeps serving.
API: docs/viewer.md.
"""

# no `from __future__ import annotations`: FastAPI reads the endpoints' `Request` annotations at
# runtime, and Request is imported inside make_app (fastapi is an optional extra)
import json
import math
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glassgpt.errors import UserError

STATIC = Path(__file__).resolve().parent / "static"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ViewConfig:
    """`glassgpt view`: a local web page showing a generation and what explains it."""

    out_dir: str = "out"
    """Checkpoint directory (ckpt.pt) to generate with and explain."""
    data_dir: str | None = None
    """Training data; default: the checkpoint's own."""
    host: str = "127.0.0.1"
    """Interface to listen on. Anything but loopback makes the viewer reachable from the network."""
    port: int = 0
    """Port; 0 picks a free one."""
    no_browser: bool = False
    """Do not open a browser (none is opened anyway without a display)."""
    device: str = "auto"
    max_new_tokens_limit: int = 1000
    """Largest max_new_tokens a request may ask for."""
    max_prompt_chars: int = 20_000
    """Longest prompt or pasted text accepted, in characters."""
    max_body_bytes: int = 1_000_000
    """Largest request body accepted."""
    threads: int | None = None
    """torch.set_num_threads; default torch's."""


def clean_json(obj: Any) -> Any:
    """NaN/inf -> None: JSON has no NaN, and the browser's JSON.parse refuses it."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    return obj


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413 (checked on Content-Length and
    while reading, so a chunked upload cannot get around it)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._reject(send)
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > self.limit:
                raise UserError(f"request body over {self.limit:,} bytes")
            return msg

        try:
            await self.app(scope, limited, send)
        except UserError:
            await self._reject(send)

    async def _reject(self, send):
        body = json.dumps({"error": f"request body over {self.limit:,} bytes; send less text "
                                    "(or start the viewer with a larger --max_body_bytes)"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def make_app(session, cfg: ViewConfig):
    """The FastAPI app over one loaded Session."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles

    from glassgpt.view.explain import context_text

    app = FastAPI(title="glassgpt viewer", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError):
        return JSONResponse({"error": str(exc)}, status_code=400)

    ok, body, text_of, int_of = _request_helpers(cfg)

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        # scripts only from this server: markup injected into the page could not run a script
        csp = "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; object-src 'none'"
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"),
                            headers={"Cache-Control": "no-cache", "Content-Security-Policy": csp})

    @app.get("/api/run")
    def run_info() -> Response:
        return ok(session.info())

    _generate_route(app, session, cfg, body, text_of)

    @app.post("/api/explain")
    async def explain(request: Request) -> Response:
        data = await body(request)
        text = text_of(data)
        prompt = data.get("prompt") or ""
        # the prompt as a string, not a JS length: JS counts UTF-16 units, Python code points
        prompt_chars = len(prompt) if isinstance(prompt, str) and text.startswith(prompt) else 0
        k = int_of(data, "k", 5)
        from starlette.concurrency import run_in_threadpool

        return ok(await run_in_threadpool(session.explain, text, prompt_chars, k))

    for name in ("spans", "knn", "neurons"):
        _engine_route(app, name, session, body, text_of, int_of, ok)

    _influence_route(app, session, body, text_of, int_of, ok)

    @app.post("/api/neuron")
    async def neuron(request: Request) -> Response:
        data = await body(request)
        from starlette.concurrency import run_in_threadpool

        return ok(await run_in_threadpool(session.neuron_card, int_of(data, "layer"), int_of(data, "index"),
                                          min(int_of(data, "top", 10), 32)))

    @app.post("/api/context")
    async def context(request: Request) -> Response:
        data = await body(request)
        return ok(context_text(session, int_of(data, "token_start"), int_of(data, "token_end"),
                               min(int_of(data, "context", 400), 5000)))

    _build_routes(app, session, body, ok)

    return BodyLimit(app, cfg.max_body_bytes)



def _request_helpers(cfg: ViewConfig):
    """(ok, body, text_of, int_of): the JSON response and the checked readers of a request body that
    every route shares; a bad value is a UserError, which the app answers with a 400 and one line."""
    from fastapi import Request
    from fastapi.responses import Response

    def ok(obj: Any, status: int = 200) -> Response:
        return Response(json.dumps(clean_json(obj), ensure_ascii=False), status_code=status,
                        media_type="application/json")

    async def body(request: Request) -> dict[str, Any]:
        try:
            data = json.loads(await request.body() or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError("the request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise UserError("the request body must be a JSON object")
        return data

    def text_of(data: dict, key: str = "text") -> str:
        text = data.get(key)
        if not isinstance(text, str):
            raise UserError(f"give the {key} to trace as a string: {{\"{key}\": \"...\"}}")
        if len(text) > cfg.max_prompt_chars:
            raise UserError(f"the {key} is {len(text):,} characters; this viewer takes at most "
                            f"{cfg.max_prompt_chars:,} (--max_prompt_chars)")
        return text

    def int_of(data: dict, key: str, default: int | None = None) -> int:
        v = data.get(key, default)
        if not isinstance(v, int) or isinstance(v, bool):
            raise UserError(f"{key} must be an integer, got {v!r}")
        return v

    return ok, body, text_of, int_of

def _generate_route(app, session, cfg: ViewConfig, body, text_of) -> None:
    """POST /api/generate: the settings checked (a 400 before any streaming), then Server-Sent Events."""
    from fastapi import Request
    from fastapi.responses import StreamingResponse

    from glassgpt.view.explain import SETTING_KEYS, check_settings, iter_pieces

    @app.post("/api/generate")
    async def generate(request: Request):
        data = await body(request)
        prompt = text_of(data, "prompt")
        settings = check_settings({k: data[k] for k in SETTING_KEYS if k in data}, cfg.max_new_tokens_limit)
        session.encode(prompt)  # unseen characters: a 400 now, before the stream starts

        def events():
            for kind, value in iter_pieces(lambda cb: session.generate(prompt, settings, cb), repr):
                payload = {"text": value} if kind == "piece" else (value if kind == "done" else {"error": value})
                yield f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _build_routes(app, session, body, ok) -> None:
    """POST /api/build {kind}: build a missing index in a background thread; GET /api/progress."""
    from fastapi import Request
    from fastapi.responses import Response

    from glassgpt.view.explain import Build

    @app.post("/api/build")
    async def build(request: Request) -> Response:
        kind = (await body(request)).get("kind")
        if kind not in session.build_commands():
            raise UserError(f"unknown index {kind!r}: one of {', '.join(session.build_commands())}")
        running = [b for b in session.builds.values() if b.state == "running"]
        if running:
            return ok({"error": f"already building the {running[0].kind} index; wait for it"}, 409)
        b = Build(kind)

        def work():
            try:
                session.build(kind, b.progress)
                b.state, b.message = "done", f"built in {time.time() - b.started:.1f} s"
            except UserError as e:
                b.state, b.message = "error", str(e)
            except Exception as e:  # an internal bug: shown in the page; the server keeps serving
                b.state, b.message = "error", f"internal error: {e!r}"

        b.thread = threading.Thread(target=work, daemon=True)
        session.builds[kind] = b
        b.thread.start()
        return ok({"started": kind})

    @app.get("/api/progress")
    def progress() -> Response:
        running = [b for b in session.builds.values() if b.state == "running"]
        return ok({"bar": running[0].bar if running else None, "indexes": session.freshness()})


def _influence_route(app, session, body, text_of, int_of, ok) -> None:
    """POST /api/influence {"text", "prompt"?, "k"?}: exactly what `glassgpt trace-influence --text=PROMPT
    --output=REST --k=K --json` prints (no prompt: `--text=TEXT`, every token after the first traced)."""
    from fastapi import Request
    from starlette.concurrency import run_in_threadpool

    async def route(request: Request):
        data = await body(request)
        text = text_of(data)
        prompt = data.get("prompt") or ""
        prompt_chars = len(prompt) if isinstance(prompt, str) and text.startswith(prompt) else 0
        return ok(await run_in_threadpool(session.influence, text, prompt_chars, int_of(data, "k", 5)))

    app.add_api_route("/api/influence", route, methods=["POST"], name="influence")


def _engine_route(app, name: str, session, body, text_of, int_of, ok) -> None:
    """POST /api/<engine> {"text": T}: exactly what `glassgpt trace-<engine> --text=T --json` prints."""
    from fastapi import Request
    from starlette.concurrency import run_in_threadpool

    async def route(request: Request):
        data = await body(request)
        text = text_of(data)
        if name == "knn":
            return ok(await run_in_threadpool(session.knn, text, int_of(data, "k", 5)))
        return ok(await run_in_threadpool(getattr(session, name), text))

    app.add_api_route(f"/api/{name}", route, methods=["POST"], name=name)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one, with no race against another program)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port (0 = any free one)") \
            from None
    sock.listen(128)
    return sock


def can_open_browser() -> bool:
    import os

    return sys.platform in ("darwin", "win32") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def main(argv: list[str] | None = None) -> None:
    from glassgpt.config import load_config, wants_help

    if wants_help(ViewConfig, argv, "glassgpt view"):
        return
    cfg = load_config(ViewConfig, argv)
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise UserError('the viewer needs FastAPI and uvicorn: pip install -e ".[view]"') from None
    import torch

    from glassgpt.view.explain import Session

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.host not in LOOPBACK:
        print(f"WARNING: listening on {cfg.host}: the viewer, its model and its training data are reachable "
              "from the network, without any login. Use the default --host=127.0.0.1 unless you mean it.",
              file=sys.stderr)
    sock = bind(cfg.host, cfg.port)
    print(f"loading {cfg.out_dir} ...", file=sys.stderr)
    session = Session(cfg.out_dir, cfg.data_dir, cfg.device)
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
    print(f"glassgpt viewer for {cfg.out_dir}: {url}   (Ctrl-C stops it)", flush=True)
    if not cfg.no_browser and can_open_browser():
        import webbrowser

        threading.Timer(0.5, webbrowser.open, [url]).start()
    server = uvicorn.Server(uvicorn.Config(make_app(session, cfg), log_level="warning"))
    server.run(sockets=[sock])
