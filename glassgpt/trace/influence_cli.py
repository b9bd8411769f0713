"""What taught the model this text: `glassgpt trace-influence`.

    glassgpt trace-influence --out_dir=out-shakespeare-char --build             # the store (once)
    glassgpt trace-influence --out_dir=out-shakespeare-char --start="ROMEO:" --k=5
    glassgpt trace-influence --out_dir=out-shakespeare-char --text="To be" --output=" or not to be" --json
    torchrun --nproc_per_node=2 --no-python glassgpt trace-influence --out_dir=... --build   # sharded build

Each training window gets a signed score in nats: how much the traced tokens' summed loss would rise
(+, a proponent) or fall (-, an opponent) if the window were left out of training, by EK-FAC influence
functions (glassgpt/trace/influence.py). docs/influence.md has the walkthrough and the measurements.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from glassgpt.config import json_or_text_main, read_text_arg
from glassgpt.errors import UserError
from glassgpt.sampling import SamplingSettings


@dataclass
class TraceInfluenceConfig(SamplingSettings):
    """`glassgpt trace-influence`: build the influence store, then trace a generation (or a text) to the
    training windows that taught it."""

    out_dir: str = "out"
    """Run to trace (out_dir, ckpt.pt or HF dir); the store goes in <run out_dir>/influence_<split>."""
    ckpt_iter: str | None = None
    """Open out_dir/ckpt-<iter>.pt kept by train.py --keep_every (or 'best': ckpt-best.pt) instead of ckpt.pt;
    a store is tied to one checkpoint, so give each its own --store_dir."""
    start: str | None = None
    """Prompt to generate from (or FILE:path), sampled as `glassgpt sample` does; the generated tokens are traced."""
    text: str | None = None
    """Trace this text (or FILE:path) instead of generating: with --output, it is the prompt and --output the
    traced continuation; alone, every token after the first is traced."""
    output: str | None = None
    """The continuation of --text to trace (or FILE:path)."""
    k: int = 5
    """Proponents and opponents to show (each)."""
    recall: int = 256
    """Candidates taken from the store's projected-gradient recall index."""
    bm25: int = 64
    """Candidates taken from BM25 over the traced text (0: none)."""
    exhaustive: bool = False
    """Score every training window exactly instead of the candidates (slow on large data)."""
    json: bool = False
    """Print the machine-readable result (what the viewer's /api/influence returns)."""
    build: bool = False
    """Build (or rebuild) the store first; alone, only build."""
    allow_stale: bool = False
    """Use a store built from other weights or data anyway, with a warning."""
    store_dir: str | None = None
    split: str = "train"
    context: int | None = None
    """Window length in predicted tokens when building; default the model's block_size."""
    proj_dim: int = 32
    """Recall index: projection size per side and layer (store dim = layers x proj_dim^2). Build only."""
    fit_windows: int = 2048
    """Windows the EK-FAC factors are fitted on (a seeded sample). Build only."""
    damping: float | None = None
    """EK-FAC damping as a fraction of each layer's mean eigenvalue (default: the store's, built with 0.1). When
    building it also sets the recall index's whitening; when tracing it overrides the exact scores' damping."""
    batch_size: int = 32
    device: str = "auto"
    """cuda, then mps, then cpu (every command's rule); --device=cpu traces what a CPU sample drew."""
    threads: int | None = None
    """CPU threads (open_run picks one per core by default); on a CPU shared with other jobs 1 can be faster."""
    data_dir: str | None = None
    """Dataset the store indexes; default the run's own training data."""
    show_chars: int = 200
    """Characters of each window shown in the readable output (0: all)."""
    progress: bool = True


def _build(cfg: TraceInfluenceConfig, run: Any) -> None:
    from pathlib import Path

    from glassgpt import distributed
    from glassgpt.trace.influence_store import build_store

    info = distributed.setup("gloo", run.device)
    try:
        path = cfg.store_dir or Path(run.out_dir) / f"influence_{cfg.split}"
        store = build_store(run.model, run.corpus, cfg.split, path,
                            context=cfg.context, proj_dim=cfg.proj_dim, fit_windows=cfg.fit_windows,
                            damping=cfg.damping, batch_size=cfg.batch_size, built_from=run.provenance(),
                            dist_info=info, progress=cfg.progress and info.master)
        if store is not None:
            m = store.meta
            print(f"built {store.path}: {len(store):,} windows of {m['context']} predictions, factors fitted on "
                  f"{min(m['fit_windows'], len(store)):,}, {m['dim']} dims ({m['bytes_per_window']} B/window) "
                  f"in {m['build_seconds']:.1f} s", file=sys.stderr)
    finally:
        distributed.teardown(info, finished=True)
    if info.enabled:
        sys.exit(distributed.finish_process(0))


def query_ids(cfg: TraceInfluenceConfig, run: Any) -> tuple[list[int], int, str | None, str | None]:
    """(token ids, prompt length, prompt, generated): what is traced."""
    from glassgpt.sampling import generate_from

    tok = run.tokenizer
    if cfg.start is not None:  # sampled as `glassgpt sample` samples: one settings block, one function
        prompt = read_text_arg(cfg.start, "start")
        g = generate_from(run.model, tok, prompt, cfg)
        if not g.outputs[0]:
            raise UserError("nothing to trace: the generation is empty; raise --max_new_tokens")
        return list(g.prompt_ids) + list(g.outputs[0]), len(g.prompt_ids), prompt, tok.decode(g.outputs[0])
    text = read_text_arg(cfg.text or "", "text")
    out = None if cfg.output is None else read_text_arg(cfg.output, "output")
    ids, prompt_len = text_ids(tok, text, out)
    return ids, prompt_len, (text if out is not None else None), out


def text_ids(tok: Any, text: str, output: str | None = None) -> tuple[list[int], int]:
    """(ids, prompt length) of a given text: `output` None traces every token of `text` after the first;
    else `text` is the prompt and `output` the traced continuation (each encoded on its own, as a
    prompt and its generation are)."""
    if output is None:
        ids = tok.encode(text)
        if len(ids) < 2:
            raise UserError("the text to trace needs at least 2 tokens; pass a longer --text (or --output)")
        return ids, 1
    p_ids, o_ids = tok.encode(text), tok.encode(output)
    if not o_ids:
        raise UserError("--output is empty; give the continuation to trace")
    if not p_ids:
        eot = getattr(tok, "eot_token", None)
        if eot is None:
            raise UserError("--text (the prompt) is empty and this tokenizer has no <|endoftext|>; give one character")
        p_ids = [eot]
    return p_ids + o_ids, len(p_ids)


def trace_influence(cfg: TraceInfluenceConfig) -> dict[str, Any] | None:
    """Build the store if asked, then trace: explain()'s dict (None when only building)."""
    from glassgpt.run import open_run
    from glassgpt.trace.influence_query import explain
    from glassgpt.trace.influence_store import open_store

    if cfg.start is not None and cfg.text is not None:
        raise UserError("pass either --start (generate, then trace) or --text (trace as is), not both")
    if cfg.output is not None and cfg.text is None:
        raise UserError("--output is the continuation of --text; pass --text=PROMPT too")
    if cfg.text is not None and not read_text_arg(cfg.text, "text") and cfg.output is None:
        raise UserError("the text to trace is empty; pass --text=TEXT (or --start=PROMPT to generate)")
    run = open_run(cfg.out_dir, ckpt_iter=cfg.ckpt_iter, device=cfg.device, data_dir=cfg.data_dir,
                   threads=cfg.threads)
    if cfg.build:
        _build(cfg, run)
        if cfg.start is None and cfg.text is None:
            return None
    elif cfg.start is None and cfg.text is None:
        raise UserError("nothing to trace: pass --start=PROMPT or --text=TEXT (or --build to build the store)")
    store = open_store(run, split=cfg.split, store_dir=cfg.store_dir, allow_stale=cfg.allow_stale)
    if cfg.damping is not None:
        if cfg.damping <= 0:
            raise UserError(f"damping={cfg.damping} must be > 0 (a fraction of each layer's mean eigenvalue)")
        store.factors.damping = cfg.damping
    ids, prompt_len, prompt, generated = query_ids(cfg, run)
    return explain(run, store, ids, prompt_len, k=cfg.k, recall=cfg.recall, bm25=cfg.bm25, exhaustive=cfg.exhaustive,
                   batch_size=cfg.batch_size, prompt=prompt, generated=generated, window=cfg.window_rule)


def marked(pieces: list[tuple[str, float]], top: int = 3) -> str:
    """The text with its `top` most positive tokens in [[ ]] (the characters that carry the score)."""
    scores = [s for _, s in pieces]
    best = set(sorted(range(len(pieces)), key=lambda i: -scores[i])[:top]) if any(s > 0 for s in scores) else set()
    return "".join(f"[[{t}]]" if i in best and scores[i] > 0 else t for i, (t, _) in enumerate(pieces))


def format_result(r: dict[str, Any], show_chars: int = 200) -> str:
    """The readable report: each proponent / opponent with score, source and highlighted characters."""
    def clip(s: str) -> str:
        return s if not show_chars or len(s) <= show_chars else s[:show_chars] + " ..."

    traced = "".join(r["tokens"][r["prompt_tokens"]:])
    head = [f"prompt: {r['prompt']!r}", f"generated: {r['generated']!r}"] if r["generated"] is not None \
        else [f"traced: {clip(traced)!r}" + (f"  (after {clip(r['prompt'])!r})" if r["prompt"] else "")]
    c = r["candidates_from"]
    head.append(f"{r['n_tokens'] - r['prompt_tokens']} traced tokens, loss {r['query_loss']:.2f} nats; "
                f"{r['n_candidates']:,} of {r['n_windows']:,} windows scored exactly ("
                + ", ".join(f"{k} {'-' if v is None else v}" for k, v in c.items())
                + f") in {r['query_ms'] / 1000:.1f} s" + ("  ** STALE STORE **" if r["stale"] else ""))
    head.append("score: predicted change (nats) of the traced tokens' loss if the window were left out of "
                "training; + proponent (taught it), - opponent. [[ ]] marks the characters carrying the most.")
    for title, wins in (("proponents", r["proponents"]), ("opponents", r["opponents"])):
        head.append(f"{title}:" if wins else f"{title}: none among the candidates")
        for w in wins:
            head.append(f"#{w['rank']} {w['score']:+.3g}  {w['doc_id']} line {w['line']} char {w['char_offset']}")
            head += ["    " + ln for ln in clip(marked(w["pieces"])).splitlines() or [""]]
            q = list(zip(r["tokens"], w["query_scores"], strict=True))[r["prompt_tokens"]:]
            sign = 1 if w["score"] > 0 else -1
            head.append("    explains: " + clip(marked([(t, sign * s) for t, s in q])).replace("\n", "\\n"))
    return "\n".join(head)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    return json_or_text_main(TraceInfluenceConfig, argv, "glassgpt trace-influence", trace_influence, format_result)


if __name__ == "__main__":
    from glassgpt.errors import run_main

    sys.exit(run_main(main))
