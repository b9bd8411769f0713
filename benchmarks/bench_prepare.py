"""Throughput of corpus preparation: tokens/s with 2 worker processes, and the ratio to 1 worker.

    python benchmarks/bench_prepare.py [--input=PATH] [--repeat=3] [--tokenizer=gpt2]

Default input: the 12 MB English corpus (371 documents) of the shared data mirror,
$GLASSGPT_MIRROR/english/sotu_mobydick.jsonl (../shared/data when unset). Each setting runs `repeat`
times end to end (read, validate, tokenize, write, rename) into a temporary directory; the best run
counts (the machine is shared: slower runs measure the neighbours). The outputs of 1 and 2 workers
are checked byte for byte. Prints one line per setting, then the ratio.
"""

from __future__ import annotations

import contextlib
import io
import os
import platform
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("GLASSGPT_MIRROR", str(REPO.parent / "shared" / "data"))

from glassgpt.config import load_config  # noqa: E402
from glassgpt.errors import run_main  # noqa: E402
from glassgpt.prepare import CorpusConfig, prepare_corpus  # noqa: E402


@dataclass
class BenchPrepareConfig:
    input: str = str(Path(os.environ["GLASSGPT_MIRROR"]) / "english" / "sotu_mobydick.jsonl")
    """Corpus to prepare (.jsonl / .txt / directory)."""
    tokenizer: str = "gpt2"
    repeat: int = 3
    """Runs per setting; the fastest counts."""
    workers: str = "1,2"
    """Worker counts to time, comma-separated; the ratio is last / first."""


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the pool's workers, once joined)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def time_prepare(cfg: BenchPrepareConfig, num_proc: int, out_dir: Path) -> tuple[float, float, int]:
    """Best wall time of `repeat` runs, the CPU seconds of that run, and the tokens written."""
    best, best_cpu, tokens = float("inf"), 0.0, 0
    for _ in range(cfg.repeat):
        with contextlib.redirect_stdout(io.StringIO()):
            t0, c0 = time.perf_counter(), cpu_seconds()
            info = prepare_corpus(CorpusConfig(input=cfg.input, out_dir=str(out_dir), tokenizer=cfg.tokenizer,
                                               num_proc=num_proc), "bench")
            seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        if seconds < best:
            best, best_cpu = seconds, cpu
        tokens = info["train_tokens"] + info["val_tokens"]
    return best, best_cpu, tokens


def main(argv: list[str] | None = None) -> None:
    cfg = load_config(BenchPrepareConfig, sys.argv[1:] if argv is None else argv)
    workers = [int(w) for w in cfg.workers.split(",")]
    size_mb = sum(f.stat().st_size for f in Path(cfg.input).rglob("*") if f.is_file()) / 1e6 \
        if Path(cfg.input).is_dir() else Path(cfg.input).stat().st_size / 1e6
    print(f"prepare {cfg.input} ({size_mb:.1f} MB, tokenizer {cfg.tokenizer}) on {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    rates, outputs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for w in workers:
            out = Path(tmp) / f"w{w}"
            seconds, cpu, tokens = time_prepare(cfg, w, out)
            rates[w] = tokens / seconds
            outputs[w] = {p.name: p.read_bytes() for p in out.iterdir()}
            print(f"  num_proc={w}: {tokens:,} tokens in {seconds:.2f}s = {rates[w]:,.0f} tokens/s "
                  f"({size_mb / seconds:.1f} MB/s, best of {cfg.repeat}; {cpu:.2f} CPU-s)")
    same = all(outputs[w] == outputs[workers[0]] for w in workers)
    print(f"  ratio num_proc={workers[-1]} / num_proc={workers[0]}: {rates[workers[-1]] / rates[workers[0]]:.2f}x; "
          f"outputs identical: {same}")
    print(f"  load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if not same:
        raise SystemExit("outputs differ between worker counts")


if __name__ == "__main__":
    sys.exit(run_main(main))
