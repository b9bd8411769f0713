"""Nearest training windows, ranked by BM25 (the default) or by the model's own embeddings: `glassgpt trace-knn`.

    glassgpt trace-knn --out_dir=out-shakespeare-char --build            # build the store (once)
    glassgpt trace-knn --out_dir=out-shakespeare-char --start="ROMEO:" --k=5
    glassgpt trace-knn --out_dir=out-shakespeare-char --text=FILE:poem.txt --per_window --json
    torchrun --nproc_per_node=2 --no-python glassgpt trace-knn --out_dir=... --build   # sharded build

The parts: knn_store.py (windows, embedding, the store on disk), knn_search.py (exact and faiss
search), knn_rank.py (the two signals, their fusion, and `explain`). docs/knn.md has the walkthrough,
the store's layout, the measured quality and when to trust which signal.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from glassgpt.config import json_or_text_main, read_text_arg
from glassgpt.errors import UserError
from glassgpt.progress import ProgressFn
from glassgpt.sampling import SamplingSettings
from glassgpt.trace.knn_rank import explain
from glassgpt.trace.knn_store import KnnStore, build_command, build_store, open_store, resolve_layer


@dataclass
class TraceKnnConfig(SamplingSettings):
    """`glassgpt trace-knn`: build a window store, then trace a generation (or a given text) to it."""

    out_dir: str = "out"
    """Run to trace (out_dir, ckpt.pt or HF dir); the store goes in <run out_dir>/knn_<split>."""
    ckpt_iter: str | None = None
    """Open out_dir/ckpt-<iter>.pt kept by train.py --keep_every (or 'best': ckpt-best.pt) instead of ckpt.pt."""
    start: str | None = None
    """Prompt to generate from (or FILE:path); the traced text is prompt + output."""
    text: str | None = None
    """Trace this text (or FILE:path) instead of generating."""
    k: int = 5
    """Neighbours to return."""
    rank: Literal["bm25", "embedding", "hybrid"] = "bm25"
    """Order by 'bm25' (the words; measured best on planted canaries, docs/knn.md), 'embedding' (the
    model's view), or 'hybrid' (both, fused by z-scores). Every neighbour shows both signals."""
    per_window: bool = False
    """Also search each query window on its own: a long text can point to several sources."""
    json: bool = False
    """Print a machine-readable result (what `explain` returns) instead of the readable one."""
    build: bool = False
    """Build (or rebuild) the store first; alone, only build."""
    allow_stale: bool = False
    """Use a store built from other weights or data anyway, with a warning (never silently)."""
    store_dir: str | None = None
    split: Literal["train", "val"] = "train"
    window: int | None = None
    """Window length in tokens when building; default the model's block_size."""
    stride: int | None = None
    """Step between window starts when building; default window // 2; at most window."""
    query_stride: int | None = None
    """Step between the sliding windows of a long traced text; default the store's stride."""
    layer: int | None = None
    """Blocks run before pooling: n_layer (default; -1 also) = final layer-normed, i = residual after i."""
    pooling: Literal["mean", "last"] = "mean"
    """'mean' over positions or 'last' position. Build only."""
    calibration: Literal["none", "center", "standardize", "whiten"] = "whiten"
    """'none', 'center', 'standardize' or 'whiten', fitted on the store's own windows. Build only."""
    whiten_dim: int | None = None
    """Keep this many principal directions when whitening (default all)."""
    embed_dtype: Literal["float32", "bfloat16"] = "float32"
    """Model precision while embedding: 'float32' or 'bfloat16' (faster where the CPU/GPU has it)."""
    batch_size: int = 32
    search: Literal["auto", "exact", "faiss"] = "auto"
    """'exact' (chunked matmul over the memory-mapped store), 'faiss' (IVF-PQ + exact re-rank), 'auto'."""
    nprobe: int = 64
    """IVF lists searched per query."""
    device: str = "auto"
    threads: int | None = None
    """CPU threads (open_run picks one per core by default); on a CPU shared with other jobs 1 can be faster."""
    data_dir: str | None = None
    """Dataset the store indexes; default the run's own training data."""
    show_chars: int = 240
    """Characters of each neighbour shown in the readable output (0: all)."""
    progress: bool = True


# ----------------------------------------------------------------------------------------------------
# the command


def build_run_store(run: Any, cfg: TraceKnnConfig | None = None, dist_info: Any = None,
                    on_progress: ProgressFn | None = None) -> KnnStore | None:
    """Build the run's store with the command's settings (`cfg`, default: trace-knn's defaults): what
    `trace-knn --build` and the viewer build. None on a torchrun rank other than 0."""
    cfg = cfg or TraceKnnConfig()
    model = run.model
    context = cfg.window or model.config.block_size
    model.to({"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.embed_dtype])
    try:
        return build_store(model, run.corpus, cfg.split, cfg.store_dir or Path(run.out_dir) / f"knn_{cfg.split}",
                           context=context, stride=cfg.stride or max(1, context // 2), layer=cfg.layer,
                           pooling=cfg.pooling, calibration=cfg.calibration, whiten_dim=cfg.whiten_dim,
                           batch_size=cfg.batch_size, built_from=run.provenance(), dist_info=dist_info,
                           progress=cfg.progress and (dist_info is None or dist_info.master),
                           on_progress=on_progress, rebuild=build_command(run, cfg.store_dir))
    finally:
        model.float()


def _build(cfg: TraceKnnConfig, run: Any) -> None:
    from glassgpt import distributed

    info = distributed.setup("gloo", run.device)
    try:
        store = build_run_store(run, cfg, info)
        if store is not None:
            m = store.meta
            print(f"built {store.path}: {len(store):,} windows of {m['context']} tokens (stride {m['stride']}, "
                  f"layer {m['layer']}, {m['calibration']}) in {m['build_seconds']:.1f} s", file=sys.stderr)
    finally:
        distributed.teardown(info, finished=True)
    if info.enabled:
        sys.exit(distributed.finish_process(0))


def trace_knn(cfg: TraceKnnConfig) -> dict[str, Any] | None:
    """Build the store if asked, then trace `start` + its generation (or `text`): explain()'s dict."""
    from glassgpt.run import open_run
    from glassgpt.sampling import generate_from

    if cfg.start is not None and cfg.text is not None:
        raise UserError("pass either --start (generate, then trace) or --text (trace as is), not both")
    run = open_run(cfg.out_dir, ckpt_iter=cfg.ckpt_iter, device=cfg.device, data_dir=cfg.data_dir,
                   threads=cfg.threads)
    if cfg.build:
        _build(cfg, run)
        if cfg.start is None and cfg.text is None:
            return None
    elif cfg.start is None and cfg.text is None:
        raise UserError("nothing to trace: pass --start=PROMPT or --text=TEXT (or --build to build the store)")
    store = open_store(run, split=cfg.split, store_dir=cfg.store_dir, allow_stale=cfg.allow_stale)
    for key, meta_key in (("layer", "layer"), ("window", "context"), ("stride", "stride")):  # never mixed
        want = resolve_layer(run.model, cfg.layer) if key == "layer" and cfg.layer is not None else getattr(cfg, key)
        if want is not None and not cfg.build and want != store.meta[meta_key]:
            raise UserError(f"the store in {store.path} was built with {key}={store.meta[meta_key]}, not {want}; "
                            f"rebuild with `{build_command(run, cfg.store_dir)} --{key}={want}` or drop --{key}")
    if not 1 <= cfg.k <= len(store):  # checked before generating, which can take a while
        raise UserError(f"k={cfg.k} but the store has {len(store)} windows; pass --k between 1 and {len(store)}")
    prompt = generated = None
    if cfg.start is not None:
        prompt = read_text_arg(cfg.start, "start")
        generated = run.tokenizer.decode(generate_from(run.model, run.tokenizer, prompt, cfg).outputs[0])
    text = prompt + generated if prompt is not None and generated is not None else read_text_arg(cfg.text or "")
    return explain(run, store, text, k=cfg.k, rank=cfg.rank, per_window=cfg.per_window, query_stride=cfg.query_stride,
                   search=cfg.search, nprobe=cfg.nprobe, prompt=prompt, generated=generated)


def _signals_line(nb: dict) -> str:
    return ", ".join(f"{n} #{nb[n]['rank']} ({nb[n]['score']:.3f})" if nb[n]["rank"] else f"{n} -"
                     for n in ("embedding", "bm25") if n in nb)


def format_result(r: dict[str, Any], show_chars: int = 240) -> str:
    """The readable report: traced text, then each neighbour with its scores and location."""
    def clip(s):
        return (s if not show_chars or len(s) <= show_chars else s[:show_chars] + " ...")
    lines = [f"prompt: {r['prompt']!r}", f"generated: {r['generated']!r}"] if r["generated"] is not None \
        else [f"text: {clip(r['text'])!r}"]
    ref = r["score_reference"]
    lines.append(f"traced {r['n_tokens']} tokens ({r['n_query_windows']} window(s) pooled) against {r['store']} "
                 f"[{r['rank']}, {r['search']}, {r['query_ms']:.1f} ms; random window pairs score cos "
                 f"{ref['p50']:+.2f} (median), {ref['p99']:+.2f} (p99)]"
                 + ("  ** STALE STORE **" if r["stale"] else ""))
    if r["signals_disagree"]:
        lines.append("** the two signals disagree: no top window by the model's embedding overlaps one by BM25 "
                     "(the words); neither is the answer on its own **")
    for nb in r["neighbours"]:
        lines.append(f"#{nb['rank']}  {nb['doc_id']} line {nb['line']} char {nb['char_offset']}  [{_signals_line(nb)}]")
        lines += ["    " + ln for ln in clip(nb["text"]).splitlines() or [""]]
    for w in r["per_window"]:
        lines.append(f"query chars {w['char_start']}:{w['char_end']} -> " + "; ".join(
            f"{nb['doc_id']} line {nb['line']} [{_signals_line(nb)}]" for nb in w["neighbours"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    return json_or_text_main(TraceKnnConfig, argv, "glassgpt trace-knn", trace_knn, format_result)


if __name__ == "__main__":
    from glassgpt.errors import run_main

    sys.exit(run_main(main))
