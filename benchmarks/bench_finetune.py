"""Tune the finetune recipe by measurement: pretrain on English, finetune onto Shakespeare, compare.

    python -m benchmarks.bench_finetune [--pretrain_iters=300] [--work_dir=DIR] [--smoke]

1. The English corpus ($GLASSGPT_MIRROR/english/sotu_mobydick.jsonl) is prepared with its own
   2048-token BPE (`--tokenizer=bpe`), and a small model (4 layers, 128 wide, context 64) is
   pretrained on it.
2. tiny-shakespeare is prepared with that run's tokenizer (`--tokenizer=<the English data>`), and the
   pretrained run is finetuned onto it (`--init_from=<its out_dir>`) with one setting at a time:
   learning rate first (as a fraction of the pretraining peak), then, at the best one, iterations,
   warmup, dropout and batch (coordinate search; each change is kept only if it wins).
3. Each finetuned model is scored on Shakespeare val (loss in nats/token, same tokenizer, so
   comparable) and on English val (how much of the pretraining it forgot), on the first
   `eval_tokens` tokens of each, windows side by side. "Wins" means the lower mean of the two val
   losses (`--objective=both`: learn the new text without forgetting the old), or the lower
   Shakespeare val alone (`--objective=new`).
With `--work_dir`, prepared data, the pretrained run and each setting's scores (trials.json) are kept
and reused by the next run.
Prints one line per setting and the chosen recipe. One thread; `--smoke`: 20/10 iterations, 2 settings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
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

MIRROR = Path(os.environ["GLASSGPT_MIRROR"])
PRETRAIN_LR = 1e-3


@dataclass
class BenchFinetuneConfig:
    english: str = str(MIRROR / "english" / "sotu_mobydick.jsonl")
    shakespeare: str = str(MIRROR / "tinyshakespeare" / "input.txt")
    pretrain_iters: int = 300
    eval_tokens: int = 8192
    """Val tokens scored per dataset (the first ones)."""
    work_dir: str = ""
    """Where datasets and runs go (default: a temporary directory, deleted); kept results are reused."""
    objective: str = "both"
    """What a setting must lower to win: 'both' (mean of Shakespeare and English val) or 'new' (Shakespeare)."""
    smoke: bool = False


@dataclass(frozen=True)
class Setting:
    lr_fraction: float = 0.3  # of the pretraining peak learning rate
    iters: int = 100
    warmup: int = 0
    dropout: float = 0.0
    batch: int = 12

    def label(self) -> str:
        return (f"lr {self.lr_fraction:g}x, {self.iters} it, warmup {self.warmup}, dropout {self.dropout:g}, "
                f"batch {self.batch}")


def base_cfg(data: Path, out: Path, **kw) -> TrainConfig:
    cfg = TrainConfig(data_dir=str(data), out_dir=str(out), device="cpu", compile=False, dtype="float32", n_layer=4,
                      n_head=4, n_embd=128, block_size=64, batch_size=12, gradient_accumulation_steps=1, dropout=0.0,
                      learning_rate=PRETRAIN_LR, min_lr=PRETRAIN_LR / 10, beta2=0.99, warmup_iters=50, max_iters=500,
                      lr_decay_iters=500, eval_iters=10, log_interval=1000, always_save_checkpoint=True, threads=1,
                      seed=1337)
    return dataclasses.replace(cfg, **kw)


def scores(out: Path, datasets: dict[str, Path], n: int) -> dict[str, float]:
    """Val loss (nats/token) of the run in `out` on the first n val tokens of each dataset."""
    from glassgpt.corpus import Corpus
    from glassgpt.evaluate import perplexity
    from glassgpt.run import open_run

    run = open_run(out, threads=1)
    return {name: perplexity(run.model, Corpus(d).tokens("val")[:n], run.tokenizer, stride=64, batch_size=16)["loss"]
            for name, d in datasets.items()}


def finetune(s: Setting, pre: Path, data: Path, out: Path) -> float:
    from glassgpt.train import train

    t = time.process_time()
    lr = PRETRAIN_LR * s.lr_fraction  # constant after the warmup (decay_lr=False would skip the warmup too)
    train(base_cfg(data, out, init_from=str(pre), learning_rate=lr, min_lr=lr, decay_lr=True,
                   max_iters=s.iters, lr_decay_iters=s.iters, warmup_iters=s.warmup, dropout=s.dropout,
                   batch_size=s.batch, eval_interval=s.iters, always_save_checkpoint=False))
    return time.process_time() - t


def run(cfg: BenchFinetuneConfig) -> list[dict]:
    from glassgpt.prepare import CorpusConfig, prepare_corpus
    from glassgpt.train import train

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(cfg.work_dir or tmp)
        en, sh, pre = work / "data-english-bpe", work / "data-shakespeare-bpe", work / "out-english"
        iters = 20 if cfg.smoke else cfg.pretrain_iters
        if not (pre / "ckpt.pt").exists():
            with contextlib.redirect_stdout(io.StringIO()):
                prepare_corpus(CorpusConfig(input=cfg.english, out_dir=str(en), tokenizer="bpe", vocab_size=2048,
                                            val_fraction=0.02, num_proc=1))
                prepare_corpus(CorpusConfig(input=cfg.shakespeare, out_dir=str(sh), tokenizer=str(en), num_proc=1))
                train(base_cfg(en, pre, max_iters=iters, lr_decay_iters=iters, eval_interval=iters))
        kept_path = work / "trials.json"
        kept = json.loads(kept_path.read_text()) if kept_path.exists() else {}
        datasets = {"shakespeare": sh, "english": en}
        before = scores(pre, datasets, cfg.eval_tokens)
        print(f"pretrained on English ({iters} it): Shakespeare val {before['shakespeare']:.3f}, "
              f"English val {before['english']:.3f}", flush=True)
        rows: list[dict] = []

        def trial(s: Setting) -> dict:
            if s.label() not in kept:
                out = work / f"out-ft-{len(rows)}"
                with contextlib.redirect_stdout(io.StringIO()):
                    cpu = finetune(s, pre, sh, out)
                kept[s.label()] = {**scores(out, datasets, cfg.eval_tokens), "cpu_s": cpu}
                kept_path.write_text(json.dumps(kept, indent=1))
            r = {"setting": s, **kept[s.label()]}
            cpu = r["cpu_s"]
            r["forgot"] = r["english"] - before["english"]
            r["score"] = r["shakespeare"] if cfg.objective == "new" else (r["shakespeare"] + r["english"]) / 2
            rows.append(r)
            print(f"{s.label():<55} Shakespeare val {r['shakespeare']:.3f}  English val {r['english']:.3f} "
                  f"(+{r['forgot']:.3f})  mean {(r['shakespeare'] + r['english']) / 2:.3f}  {cpu:.0f} CPU s",
                  flush=True)
            return r

        if cfg.smoke:
            best = min((trial(Setting(iters=10)), trial(Setting(iters=10, lr_fraction=0.1))),
                       key=lambda r: r["score"])
        else:
            best = min((trial(Setting(lr_fraction=f)) for f in (0.1, 0.3, 1.0)), key=lambda r: r["score"])
            for change in ({"iters": 50}, {"iters": 200}, {"warmup": 10}, {"dropout": 0.1}, {"batch": 2}):
                s = best["setting"]
                if "batch" in change:  # twice the batch, half the iterations: the same tokens
                    change = {"batch": s.batch * 2, "iters": s.iters // 2}
                r = trial(dataclasses.replace(s, **change))
                if r["score"] < best["score"]:
                    best = r
        print(f"chosen ({cfg.objective}): {best['setting'].label()} -> Shakespeare val {best['shakespeare']:.3f} "
              f"(from {before['shakespeare']:.3f}), English val {best['english']:.3f} (from {before['english']:.3f}); "
              f"loadavg {os.getloadavg()[0]:.1f}")
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    return run(load_config(BenchFinetuneConfig, sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(run_main(main))
