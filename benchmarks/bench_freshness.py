"""How long deciding "is this index still fresh?" takes on a GPT-2-small-sized checkpoint (~500 MB).

    python -m benchmarks.bench_freshness [--dir=/tmp/glassgpt-fresh]

Writes a random-weight GPT-2 small checkpoint with save_checkpoint (which fingerprints the weights
once), then times the freshness decision a query makes (fingerprint from the loaded checkpoint +
ckpt.json cross-check + string compare, and ckpt.json alone for commands that load no model) against
the reference the first version used: sha256 of the whole ckpt.pt on every query. Deletes the files.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/x.py` from a clone
from glassgpt.artifacts import fingerprint_file, fingerprint_tensors
from glassgpt.checkpoint import checkpoint_fingerprint, load_checkpoint, read_sidecar, save_checkpoint
from glassgpt.model import GPT, GPTConfig


def best_ms(fn, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/glassgpt-fresh")
    ap.add_argument("--smoke", action="store_true", help="seconds: a 2-layer 64-wide model instead of GPT-2 small")
    args = ap.parse_args(argv)
    d = Path(args.dir)
    # GPT-2 small: 124M parameters
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=512) if args.smoke else GPTConfig()
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in GPT(cfg).state_dict().items() if k != "lm_head.weight"}
    state = {k: torch.randn(s) for k, s in shapes.items()}
    path = d / "ckpt.pt"
    try:
        t0 = time.perf_counter()
        save_checkpoint(path, {"model": state, "model_args": cfg.to_dict(), "iter_num": 1, "config": {}})
        save_s = time.perf_counter() - t0
        mb = path.stat().st_size / 1e6
        fp_ms = best_ms(lambda: fingerprint_tensors(state), repeat=1)
        ckpt = load_checkpoint(path)
        built_from = {"checkpoint": checkpoint_fingerprint(ckpt, path), "data": None}
        decide = best_ms(lambda: checkpoint_fingerprint(ckpt, path) == built_from["checkpoint"])
        sidecar = best_ms(lambda: read_sidecar(path)["fingerprint"] == built_from["checkpoint"])
        rehash = best_ms(lambda: fingerprint_file(path, cache=False), repeat=1)
        print(f"ckpt.pt {mb:.0f} MB, saved in {save_s:.2f} s, of which the one-time weights fingerprint "
              f"{fp_ms / 1e3:.2f} s")
        print(f"freshness decision, model loaded: {decide:.2f} ms; from ckpt.json alone: {sidecar:.2f} ms; "
              f"reference sha256 of ckpt.pt per query: {rehash:.0f} ms ({rehash / decide:,.0f}x slower)")
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
