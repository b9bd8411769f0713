"""What the "is it copying?" line under each sample costs: `sample` with and without `--copying`.

    python -m benchmarks.bench_copying [--repeat=5] [--num_samples=4] [--max_new_tokens=200] [--smoke]

char tiny-shakespeare ($GLASSGPT_MIRROR) is prepared and indexed (`trace-spans --build`), and a model
the size of the CPU recipe (2 layers, 128 wide, context 64; random weights: the check's cost depends
on the index and the text length, not on what the model learned) samples `num_samples` x
`max_new_tokens` characters, `repeat` times with the check and without, interleaved. Prints the
median CPU seconds of each (CPU time of this process: less sensitive to load than wall-clock) and
the ratio. `--smoke`: 1 repeat, 1 sample of 50 characters.
"""

from __future__ import annotations

import contextlib
import io
import os
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


@dataclass
class BenchCopyingConfig:
    repeat: int = 5
    num_samples: int = 4
    max_new_tokens: int = 200
    smoke: bool = False


def make_run(work: Path) -> Path:
    import torch

    from glassgpt.checkpoint import save_checkpoint
    from glassgpt.model import GPT, GPTConfig
    from glassgpt.prepare import ShakespeareConfig, prepare_shakespeare
    from glassgpt.tokenizer import read_meta
    from glassgpt.trace.span_index import build_index

    data = work / "shakespeare_char"
    src = Path(os.environ["GLASSGPT_MIRROR"]) / "tinyshakespeare" / "input.txt"
    with contextlib.redirect_stdout(io.StringIO()):
        prepare_shakespeare(ShakespeareConfig(out_dir=str(data), input=str(src)))
    build_index(data, None, "train", "1G", 1, lambda m: None)
    meta = read_meta(data) or {}
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=64, vocab_size=int(meta["vocab_size"]), n_layer=2, n_head=4, n_embd=128, bias=False)
    ckpt = {"model": GPT(cfg).state_dict(), "optimizer": {}, "model_args": cfg.to_dict(), "iter_num": 0,
            "best_val_loss": 1e9, "config": {"data_dir": str(data)},
            "tokenizer": {k: meta[k] for k in ("tokenizer", "vocab_size", "stoi", "itos")}}
    save_checkpoint(work / "out" / "ckpt.pt", ckpt)
    return work / "out"


def run(cfg: BenchCopyingConfig) -> dict:
    from glassgpt.sample import main as sample_main

    repeat, n, new = (1, 1, 50) if cfg.smoke else (cfg.repeat, cfg.num_samples, cfg.max_new_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        out = make_run(Path(tmp))
        argv = [f"--out_dir={out}", "--device=cpu", "--threads=1", "--start=ROMEO:", f"--num_samples={n}",
                f"--max_new_tokens={new}", "--stream=False"]
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(repeat):
            for on in (False, True):
                t = time.process_time()
                with contextlib.redirect_stdout(io.StringIO()) as buf:
                    sample_main(argv + [f"--copying={on}"])
                times[on].append(time.process_time() - t)
                assert ("copying: " in buf.getvalue()) == on
    off, on = statistics.median(times[False]), statistics.median(times[True])
    print(f"sample {n} x {new} characters from a 2-layer 128-wide model over char tiny-shakespeare (1M-token "
          f"index), one thread, median CPU s of {repeat}; loadavg {os.getloadavg()[0]:.1f}")
    print(f"without the copying line {off:.2f} s, with it {on:.2f} s: {on / off:.2f}x "
          f"(+{(on - off) / n * 1000:.0f} ms per sample, model loading included in both)")
    return {"off": off, "on": on, "ratio": on / off}


def main(argv: list[str] | None = None) -> dict:
    return run(load_config(BenchCopyingConfig, sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(run_main(main))
