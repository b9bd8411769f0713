"""One loaded run and the three explanation engines, for the viewer and the report.

`Session(out_dir)` loads the model, tokenizer, training data and each engine's index once. Every
engine result is the dict its `--json` CLI prints (one source of truth): spans as `trace-spans
--text=T --json`, nearest windows as `trace-knn --text=T --json`, neurons as the engine's text trace.
The viewer adds only what no CLI prints: per-token activations of a neuron, to colour tokens.

Torch work holds `Session.lock`: one model serves every request, and hooks are global state on it.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from glassgpt.errors import UserError
from glassgpt.progress import ProgressFn
from glassgpt.sampling import SamplingSettings

KINDS = ("spans", "knn", "neurons", "examples", "influence")
N_NEURONS = 10  # neurons listed; their per-token activations travel with the explanation


SETTING_KEYS = tuple(f.name for f in dataclasses.fields(SamplingSettings))


def check_settings(raw: dict[str, Any], max_new_tokens_limit: int) -> SamplingSettings:
    """Sampling settings from a request, through glassgpt.config.load_config (the CLI's parser, ranges
    and choices); keys left out keep the CLI's defaults."""
    from glassgpt.config import load_config

    argv = [f"--{k}={'None' if v is None else v}" for k, v in raw.items()]
    s = load_config(SamplingSettings, argv)
    if s.max_new_tokens > max_new_tokens_limit:
        raise UserError(f"max_new_tokens={s.max_new_tokens} is out of range: this viewer allows "
                        f"1..{max_new_tokens_limit} (start it with --max_new_tokens_limit=N for more)")
    return s


@dataclass
class Build:
    """A background index build: its state and progress (reported by the build itself), for the page."""

    kind: str
    state: str = "running"  # running | done | error
    message: str = ""
    started: float = field(default_factory=time.time)
    thread: threading.Thread | None = None
    bar: dict[str, Any] | None = None  # {"n", "total", "desc"} of the step running now

    def progress(self, n: int, total: int, desc: str) -> None:
        """The build functions' progress callback (glassgpt.progress)."""
        self.bar = {"n": int(n), "total": int(total), "desc": desc}


class Session:
    """A run opened once: model, tokenizer, corpus, and the engines' indexes (reopened after a build)."""

    def __init__(self, out_dir: str | Path, data_dir: str | Path | None = None, device: str = "cpu",
                 threads: int | None = None):
        from glassgpt.run import open_run

        self.run = open_run(out_dir, device=device, data_dir=data_dir, threads=threads)
        self.out_dir, self.model, self.tok = self.run.out_dir, self.run.model, self.run.tokenizer
        self.iter_num = self.run.iter_num
        self.train_config = {k: v for k, v in self.run.config.items()
                             if isinstance(v, (int, float, str, bool, type(None)))}
        if self.run.data_dir is None:
            raise UserError(f"{out_dir} does not say which data it was trained on; pass --data_dir=DIR")
        self.data_dir = Path(self.run.data_dir)
        self.corpus = self.run.corpus
        self.lock = threading.RLock()
        self.builds: dict[str, Build] = {}
        self.indexes: dict[str, Any] = {}
        self.problems: dict[str, str] = {}
        self.reopen()

    # ------------------------------------------------------------------ indexes

    def reopen(self) -> None:
        """(Re)open every engine's index, keeping for each the one-line reason it cannot be used."""
        for kind, opener in (("spans", self._open_spans), ("knn", self._open_knn),
                             ("neurons", self._open_baseline), ("examples", self._open_examples),
                             ("influence", self._open_influence)):
            try:
                self.indexes[kind] = opener()
                self.problems.pop(kind, None)
            except UserError as e:
                self.indexes.pop(kind, None)
                self.problems[kind] = str(e)

    def _open_spans(self):
        from glassgpt.trace.span_index import SpanIndex

        return SpanIndex(self.data_dir)

    def _open_knn(self):
        from glassgpt.trace.knn_store import open_store

        return open_store(self.run)

    def _open_baseline(self):
        from glassgpt.trace.neurons import open_baseline

        return open_baseline(self.run)

    def _open_examples(self):
        from glassgpt.trace.neuron_card import open_examples

        return open_examples(self.run)

    def _open_influence(self):
        from glassgpt.trace.influence_store import open_store

        return open_store(self.run)

    def require(self, kind: str):
        if kind not in self.indexes:
            raise UserError(self.problems.get(kind, f"no {kind} index"))
        return self.indexes[kind]

    def build_commands(self) -> dict[str, str]:
        """Each index's build command, from the one table (glassgpt.artifacts.ARTIFACTS)."""
        from glassgpt.artifacts import rebuild_command

        return {kind: rebuild_command(kind, out_dir=self.out_dir, data_dir=self.data_dir) for kind in KINDS}

    def build(self, kind: str, progress: ProgressFn | None = None) -> None:
        """Build one index with the library function its command calls, with the command's defaults;
        `progress(done, total, what)` is called as it goes. The server calls this in a background thread."""
        from glassgpt.trace.knn import build_run_store
        from glassgpt.trace.neuron_card import open_examples
        from glassgpt.trace.neurons import TraceNeuronsConfig, get_baseline
        from glassgpt.trace.span_index import build_index

        def quiet(message: str) -> None:
            pass

        builders: dict[str, Callable[[], Any]] = {
            "spans": lambda: build_index(self.data_dir, log=quiet, progress=progress),
            "knn": lambda: build_run_store(self.run, on_progress=progress),
            "neurons": lambda: get_baseline(self.run, TraceNeuronsConfig(), quiet, rebuild=True, progress=progress),
            "examples": lambda: open_examples(self.run, build=True, log=quiet, progress=progress),
            "influence": self._build_influence}
        if kind not in builders:
            raise UserError(f"unknown index {kind!r}: one of {', '.join(KINDS)}")
        with self.lock:
            builders[kind]()
        self.reopen()

    def _build_influence(self) -> None:
        """The influence store with trace-influence's defaults (its build draws its own bar; it takes
        no progress callback yet)."""
        from glassgpt.trace.influence_cli import TraceInfluenceConfig
        from glassgpt.trace.influence_store import build_store

        c = TraceInfluenceConfig(out_dir=str(self.out_dir))
        build_store(self.run.model, self.corpus, c.split, Path(self.out_dir) / f"influence_{c.split}",
                    context=c.context, proj_dim=c.proj_dim, fit_windows=c.fit_windows, damping=c.damping,
                    batch_size=c.batch_size, built_from=self.run.provenance())

    # ------------------------------------------------------------------ the run

    def info(self) -> dict[str, Any]:
        """Model size, checkpoint iteration, dataset, loss curve and each index's freshness."""
        c = self.model.config
        n_params = sum(p.numel() for p in self.model.parameters())
        return {"out_dir": str(self.out_dir), "data_dir": str(self.data_dir), "iter_num": self.iter_num,
                "n_params": int(n_params), "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd,
                "block_size": c.block_size, "vocab_size": c.vocab_size, "tokenizer": getattr(self.tok, "name", "gpt2"),
                "dataset": self.train_config.get("dataset"), "loss_curve": loss_curve(self.out_dir),
                "indexes": self.freshness()}

    def freshness(self) -> dict[str, Any]:
        out = {}
        for kind in KINDS:
            b = self.builds.get(kind)
            out[kind] = {"fresh": kind in self.indexes, "problem": self.problems.get(kind),
                         "command": self.build_commands()[kind],
                         "build": None if b is None else {"state": b.state, "message": b.message,
                                                          "seconds": round(time.time() - b.started, 1)}}
        return out

    # ------------------------------------------------------------------ generation

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)  # a char model's unseen characters: the CLI's UserError

    def generate(self, prompt: str, s: SamplingSettings,
                 on_piece: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Generate from `prompt` as sample.py does (glassgpt.sampling.generate_from), calling `on_piece`
        with each new piece of text as its token is chosen. Returns {prompt, generated, text}."""
        from glassgpt.generate import TextStream
        from glassgpt.sampling import generate_from

        stream = TextStream(self.tok)

        def on_token(row: int, token: int) -> None:
            piece = stream.push(token)
            if piece and on_piece:
                on_piece(piece)

        with self.lock:
            out = generate_from(self.model, self.tok, prompt, s, on_token=on_token).outputs[0]
        tail = stream.flush()
        if tail and on_piece:
            on_piece(tail)
        generated = self.tok.decode(out)
        return {"prompt": prompt, "generated": generated, "text": prompt + generated}

    # ------------------------------------------------------------------ the engines

    def spans(self, text: str, prompt_chars: int = 0) -> dict[str, Any]:
        """`trace-spans --text=T --json`; with prompt_chars > 0 only text[prompt_chars:] is traced, as
        `trace-spans --start=PROMPT --json` traces only the generation."""
        from glassgpt.trace import spans

        index = self.require("spans")
        if not prompt_chars:
            return spans.explain(index, text)
        ids, text, offsets = spans.encode_text(index, text)
        prompt_len = int(np.searchsorted(np.asarray(offsets), prompt_chars))
        return spans.trace_dict(index, ids, prompt_len, text, offsets)

    def knn(self, text: str, k: int = 5) -> dict[str, Any]:
        """`trace-knn --text=T --k=K --json`."""
        from glassgpt.trace.knn_rank import explain

        store = self.require("knn")
        with self.lock:
            return explain(self.run, store, text, k=k)

    def influence(self, text: str, prompt_chars: int = 0, k: int = 5) -> dict[str, Any]:
        """`trace-influence --text=PROMPT --output=REST --k=K --json`, the text split at prompt_chars (0: the
        whole text after its first token is traced, as `--text=T` alone)."""
        from glassgpt.trace.influence_cli import text_ids
        from glassgpt.trace.influence_query import explain

        store = self.require("influence")
        prompt, rest = (text[:prompt_chars], text[prompt_chars:]) if prompt_chars else (text, None)
        ids, prompt_len = text_ids(self.tok, prompt, rest)
        with self.lock:
            return explain(self.run, store, ids, prompt_len, k=k, prompt=prompt if rest is not None else None,
                           generated=rest)

    def neurons(self, text: str, prompt_chars: int = 0, n_neurons: int = N_NEURONS) -> dict[str, Any]:
        """`trace-neurons --start=PROMPT --output=REST --ablate --json`: the text split at prompt_chars
        (a pasted text: after its first character), so only the continuation is traced."""
        from glassgpt.trace import neurons

        baseline = self.require("neurons")
        cut = prompt_chars if prompt_chars > 0 else 1
        with self.lock:
            return neurons.explain(self.run, text[:cut], output=text[cut:], n_neurons=n_neurons, ablate=True,
                                   baseline=baseline)

    def neuron_card(self, layer: int, index: int, top: int = 10) -> dict[str, Any]:
        """`glassgpt neuron --layer=L --index=I --json`."""
        from glassgpt.trace.neuron_card import neuron_card

        self.require("examples")
        with self.lock:
            return neuron_card(self.run, layer, index, top=top, log=lambda m: None)

    def token_offsets(self, text: str) -> list[int]:
        """Char offset of each token of `text` plus the end."""
        from glassgpt.trace.spans import token_offsets

        ids = self.encode(text)
        return token_offsets(self.tok, ids)[1]

    def explain(self, text: str, prompt_chars: int = 0, k: int = 5) -> dict[str, Any]:
        """Every engine on one text; an engine that cannot run says why in one line, the others still do."""
        if not text:
            raise UserError("nothing to trace: the text is empty")
        out: dict[str, Any] = {"text": text, "prompt_chars": prompt_chars, "token_offsets": self.token_offsets(text)}
        timings = {}
        for name, fn in (("spans", lambda: self.spans(text, prompt_chars)), ("knn", lambda: self.knn(text, k)),
                         ("neurons", lambda: self.neurons(text, prompt_chars))):
            t0 = time.perf_counter()
            try:
                out[name] = fn()
            except UserError as e:
                out[name] = {"error": str(e)}
            timings[name] = round((time.perf_counter() - t0) * 1000, 1)
        out["timings_ms"] = timings
        toks = out["neurons"].get("tokens") if isinstance(out["neurons"], dict) else None
        if toks and "".join(toks) == text:  # neuron activations are per token of the neurons trace
            out["token_offsets"] = [0, *np.cumsum([len(t) for t in toks]).tolist()]
        return out


def loss_curve(out_dir: Path, max_points: int = 400) -> dict[str, list]:
    """Train-step and eval losses from out_dir/log.jsonl (thinned to max_points train points)."""
    path = Path(out_dir) / "log.jsonl"
    train, evals = [], []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a killed run
            if "val_loss" in r:
                evals.append([r.get("iter"), r.get("train_loss"), r["val_loss"]])
            elif "loss" in r:
                train.append([r.get("iter"), r["loss"]])
    step = max(1, len(train) // max_points)
    return {"train": train[::step], "eval": evals}


def context_text(session: Session, token_start: int, token_end: int, context: int = 400) -> dict[str, Any]:
    """The training text around [token_start, token_end) of the train split, inside its segment."""
    corpus = session.corpus
    n = len(corpus.tokens("train"))
    if not 0 <= token_start < token_end <= n:
        raise UserError(f"token range {token_start}:{token_end} is outside the training split (0..{n})")
    seg = corpus.segment_of("train", token_start)
    a, b = max(int(seg[1]), token_start - context), min(int(seg[2]), token_end + context)
    loc = corpus.locate("train", a, b).to_dict()
    return {"location": loc, "before": corpus.decode("train", a, token_start),
            "match": corpus.decode("train", token_start, token_end), "after": corpus.decode("train", token_end, b)}


def iter_pieces(fn: Callable[[Callable[[str], None]], dict],
                on_error: Callable[[Exception], Any]) -> Iterator[tuple[str, Any]]:
    """Run fn(on_piece) in a thread and yield ("piece", text) as it streams, then ("done", result) or
    ("error", message). Lets a server stream a generation without holding the event loop."""
    import queue

    q: queue.Queue = queue.Queue()

    def work() -> None:
        try:
            q.put(("done", fn(lambda p: q.put(("piece", p)))))
        except UserError as e:
            q.put(("error", str(e)))
        except Exception as e:  # an internal bug: the stream ends with it, the server keeps serving
            q.put(("error", on_error(e)))

    threading.Thread(target=work, daemon=True).start()
    while True:
        kind, value = q.get()
        yield kind, value
        if kind != "piece":
            return
