"""Shakespeare with its own BPE vs characters vs GPT-2's BPE: val bits per byte at equal CPU seconds.

    python -m benchmarks.bench_tokenizer_train [--iters=400] [--vocabs=1024,4096] [--smoke]

tiny-shakespeare is prepared once per tokenizer with `glassgpt prepare input.txt`, so every variant
has the same val text (the last ~10% from a line start). Each trains the same model body (4 layers,
128 wide, context 64 tokens, batch 12, AdamW at 1e-3 with cosine decay, no dropout) for the same
CPU time: the char model's `iters` iterations set the budget (measured in this run), and every other
variant gets as many iterations as fit in it, from its CPU seconds per iteration measured by two short
runs first (a 50257-token output layer makes GPT-2's steps far costlier). CPU seconds, not wall-clock:
this machine is shared, and CPU time moves less with load. The score is bits per byte of the whole
val text (glassgpt.evaluate.perplexity, windows side by side), comparable across tokenizers; the
ratio is to the char model. One thread; `--smoke`: 20 iterations, 2 variants.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("GLASSGPT_MIRROR", str(REPO.parent / "shared" / "data"))

from glassgpt.config import TrainConfig, load_config  # noqa: E402
from glassgpt.errors import run_main  # noqa: E402


@dataclass
class BenchTokenizerTrainConfig:
    input: str = str(Path(os.environ["GLASSGPT_MIRROR"]) / "tinyshakespeare" / "input.txt")
    iters: int = 400
    vocabs: str = "1024,4096"
    """Trained BPE vocabulary sizes to compare with char and GPT-2."""
    work_dir: str = ""
    """Where datasets and runs go (default: a temporary directory, deleted)."""
    smoke: bool = False


def train_cfg(data_dir: Path, out_dir: Path, iters: int, eval_iters: int = 2) -> TrainConfig:
    return TrainConfig(data_dir=str(data_dir), out_dir=str(out_dir), device="cpu", compile=False, dtype="float32",
                       n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, gradient_accumulation_steps=1,
                       dropout=0.0, learning_rate=1e-3, min_lr=1e-4, beta2=0.99, warmup_iters=min(50, iters // 10),
                       max_iters=iters, lr_decay_iters=iters, eval_interval=iters, eval_iters=eval_iters,
                       log_interval=100, plot=False,
                       always_save_checkpoint=True, threads=1, seed=1337)


def cpu_train(cfg: TrainConfig) -> float:
    from glassgpt.train import train

    t = time.process_time()
    with contextlib.redirect_stdout(io.StringIO()):
        train(cfg)
    return time.process_time() - t


def one(name: str, tokenizer: str, vocab: int, cfg: BenchTokenizerTrainConfig, work: Path,
        budget: float | None) -> dict:
    """Prepare, train for `budget` CPU seconds (None: `iters` iterations), score val bits per byte."""
    from glassgpt.evaluate import perplexity
    from glassgpt.prepare import CorpusConfig, prepare_corpus
    from glassgpt.run import open_run

    data, out = work / f"data-{name}", work / f"out-{name}"
    with contextlib.redirect_stdout(io.StringIO()):
        prepare_corpus(CorpusConfig(input=cfg.input, out_dir=str(data), tokenizer=tokenizer, vocab_size=vocab,
                                    num_proc=1))
    iters = 20 if cfg.smoke else cfg.iters
    if budget is not None:  # as many iterations as fit in the budget: the cost of one, from two short runs
        long, short = (6, 2) if cfg.smoke else (14, 2)  # their difference leaves out the set-up and evals
        runs = [cpu_train(train_cfg(data, work / f"probe-{name}-{n}", n, eval_iters=1)) for n in (long, short)]
        iters = max(1, round(budget / max((runs[0] - runs[1]) / (long - short), 1e-6)))
    cpu = cpu_train(train_cfg(data, out, iters))
    run = open_run(out, threads=1)
    val = run.corpus.tokens("val")
    r = perplexity(run.model, val, run.tokenizer, stride=64, batch_size=16)
    text_bytes = r["bytes"]
    return {"name": name, "vocab": run.tokenizer.vocab_size, "params": run.model.get_num_params(),
            "cpu_s": cpu, "iters": iters, "bpb": r["bits_per_byte"], "bytes_per_token": text_bytes / r["tokens"],
            "val_loss": r["loss"]}


def run(cfg: BenchTokenizerTrainConfig) -> list[dict]:
    variants = [("char", "char", 0), ("gpt2", "gpt2", 0)]
    variants += [(f"bpe-{v}", "bpe", int(v)) for v in cfg.vocabs.split(",") if v]
    if cfg.smoke:
        variants = [variants[0], variants[-1]]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(cfg.work_dir or tmp)
        rows: list[dict] = []
        for name, tokenizer, vocab in variants:
            rows.append(one(name, tokenizer, vocab, cfg, work, rows[0]["cpu_s"] if rows else None))
            r = rows[-1]
            print(f"{r['name']:>9}: vocab {r['vocab']:>5}, {r['params'] / 1e6:.2f}M params, {r['iters']} iterations "
                  f"in {r['cpu_s']:.0f} CPU s, val {r['bytes_per_token']:.2f} bytes/token, "
                  f"val loss {r['val_loss']:.3f}, "
                  f"val {r['bpb']:.3f} bits/byte", flush=True)
    char = rows[0]
    print(f"same model body, batch 12 x 64 tokens, the CPU seconds of {char['iters']} char iterations for each; "
          f"loadavg {os.getloadavg()[0]:.1f}")
    for r in rows:
        print(f"{r['name']:>9}: bits/byte {r['bpb']:.3f} ({r['bpb'] / char['bpb']:.3f}x char), "
              f"{r['iters']} iterations, CPU {r['cpu_s'] / char['cpu_s']:.2f}x char")
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    return run(load_config(BenchTokenizerTrainConfig, sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(run_main(main))
