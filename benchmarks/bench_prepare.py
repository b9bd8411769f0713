"""Throughput of corpus preparation: tokens/s with 2 worker processes, and the ratio to 1 worker.

    python -m benchmarks.bench_prepare [--input=PATH] [--repeat=3] [--tokenizer=gpt2]

Default input: the 12 MB English corpus (371 documents) of the shared data mirror,
$GLASSGPT_MIRROR/english/sotu_mobydick.jsonl (../shared/data when unset). Each setting runs `repeat`
times end to end (read, validate, tokenize, write, rename) into a temporary directory, the settings
interleaved so that load from neighbours on a shared machine falls on all of them alike; medians and
bests are printed, with the CPU seconds used (this process and its workers). The outputs of 1 and 2
workers are checked byte for byte. Prints one line per setting, then the ratio.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import platform
import resource
import statistics
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
    input: str = str(Path(os.environ.get("GLASSGPT_MIRROR", "../shared/data")) / "english" / "sotu_mobydick.jsonl")
    """Corpus to prepare (.jsonl / .txt / directory)."""
    tokenizer: str = "gpt2"
    repeat: int = 5
    """Runs per setting, interleaved; medians and bests are reported."""
    workers: str = "1,2"
    """Worker counts to time, comma-separated; the ratio is last / first."""
    smoke: bool = False
    """Seconds, to check the benchmark runs: the input's first 20 documents (or 200 kB), one run each."""


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the pool's workers, once joined)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _spin(n: int) -> int:
    s = 0
    for i in range(n):
        s += i
    return s


def headroom(workers: int, n: int = 8_000_000) -> float:
    """Speedup of `workers` processes over one on a pure-CPU loop, right now: on a shared machine, the
    ceiling for any parallel ratio measured beside it."""
    times = []
    for w in (1, workers):
        with multiprocessing.Pool(w) as pool:
            t0 = time.perf_counter()
            pool.map(_spin, [n // w] * w)
            times.append(time.perf_counter() - t0)
    return times[0] / times[1]


def run_once(cfg: BenchPrepareConfig, num_proc: int, out_dir: Path) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds and tokens of one end-to-end prepare."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        t0, c0 = time.perf_counter(), cpu_seconds()
        info = prepare_corpus(CorpusConfig(input=cfg.input, out_dir=str(out_dir), tokenizer=cfg.tokenizer,
                                           num_proc=num_proc), "bench")
        return time.perf_counter() - t0, cpu_seconds() - c0, info["train_tokens"] + info["val_tokens"]


def main(argv: list[str] | None = None) -> None:
    cfg = load_config(BenchPrepareConfig, sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory() as tmp:
        if cfg.smoke:
            cfg.input, cfg.repeat = _smoke_input(Path(cfg.input), Path(tmp)), 1
        _bench(cfg)


def _smoke_input(src: Path, tmp: Path) -> str:
    if src.suffix == ".jsonl":
        small = tmp / "smoke.jsonl"
        small.write_text("".join(src.read_text().splitlines(keepends=True)[:20]))
    else:
        small = tmp / "smoke.txt"
        small.write_text((src if src.is_file() else next(p for p in src.rglob("*.txt"))).read_text()[:200_000])
    return str(small)


def _bench(cfg: BenchPrepareConfig) -> None:
    workers = [int(w) for w in cfg.workers.split(",")]
    size_mb = sum(f.stat().st_size for f in Path(cfg.input).rglob("*") if f.is_file()) / 1e6 \
        if Path(cfg.input).is_dir() else Path(cfg.input).stat().st_size / 1e6
    print(f"prepare {cfg.input} ({size_mb:.1f} MB, tokenizer {cfg.tokenizer}) on "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    walls: dict[int, list[float]] = {w: [] for w in workers}
    cpus: dict[int, list[float]] = {w: [] for w in workers}
    tokens, outputs = 0, {}
    with tempfile.TemporaryDirectory() as tmp:
        # interleaved, so that a neighbour's burst of load hits every setting alike
        for _ in range(cfg.repeat):
            for w in workers:
                wall, cpu, tokens = run_once(cfg, w, Path(tmp) / f"w{w}")
                walls[w].append(wall)
                cpus[w].append(cpu)
        for w in workers:
            outputs[w] = {p.name: p.read_bytes() for p in (Path(tmp) / f"w{w}").iterdir()}
    rate = {w: tokens / statistics.median(walls[w]) for w in workers}
    for w in workers:
        print(f"  num_proc={w}: {tokens:,} tokens, median {statistics.median(walls[w]):.2f}s = "
              f"{rate[w]:,.0f} tokens/s ({size_mb / statistics.median(walls[w]):.1f} MB/s); "
              f"best {min(walls[w]):.2f}s = "
              f"{tokens / min(walls[w]):,.0f} tokens/s; CPU {statistics.median(cpus[w]):.2f}s; {cfg.repeat} runs")
    same = all(outputs[w] == outputs[workers[0]] for w in workers)
    first, last = workers[0], workers[-1]
    print(f"  ratio num_proc={last} / num_proc={first}: {rate[last] / rate[first]:.2f}x (medians), "
          f"{min(walls[first]) / min(walls[last]):.2f}x (best); outputs identical: {same}")
    print(f"  control: {last} processes vs 1 on a pure-CPU loop now: "
          f"{headroom(last, 200_000 if cfg.smoke else 8_000_000):.2f}x "
          "(the most any parallel ratio can show on this machine at this load)")
    print(f"  load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if not same:
        raise SystemExit("outputs differ between worker counts")


if __name__ == "__main__":
    sys.exit(run_main(main))
