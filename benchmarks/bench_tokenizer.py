"""Which library trains and runs `prepare --tokenizer=bpe`, and how well the result compresses.

    python -m benchmarks.bench_tokenizer [--vocab_size=4096] [--repeat=3] [--smoke]

On the English corpus ($GLASSGPT_MIRROR/english/sotu_mobydick.jsonl, 12 MB, 371 documents):
1. training a byte-level BPE with GPT-2's split pattern: rustbpe (what glassgpt uses) vs Hugging
   Face `tokenizers`' BpeTrainer, CPU seconds, one thread each (RAYON_NUM_THREADS=1);
2. encoding the corpus with the trained vocabulary: tiktoken (what glassgpt uses) vs `tokenizers`,
   CPU seconds, one thread each, and a check that both give the same ids;
3. compression, bytes per token, of the trained BPE vs GPT-2's BPE on text it was not trained on
   (the last 10% of documents) and on tiny-shakespeare.
Medians over `repeat` interleaved runs; ratios are taken within this run. `--smoke`: 40 documents,
one repeat.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # both libraries use rayon; one thread each, set before import
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("GLASSGPT_MIRROR", str(REPO.parent / "shared" / "data"))

from glassgpt.bpe import BPETokenizer, train_bpe, write_tokenizer_json  # noqa: E402
from glassgpt.config import load_config  # noqa: E402
from glassgpt.errors import run_main  # noqa: E402
from glassgpt.tokenizer import GPT2Tokenizer  # noqa: E402


@dataclass
class BenchTokenizerConfig:
    input: str = str(Path(os.environ["GLASSGPT_MIRROR"]) / "english" / "sotu_mobydick.jsonl")
    """JSON Lines corpus ({"text": ...} a line)."""
    vocab_size: int = 4096
    repeat: int = 3
    smoke: bool = False
    """40 documents, one repeat: checks that the benchmark runs."""


def read_docs(path: str, limit: int | None = None) -> list[str]:
    with open(path, encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f if line.strip()]
    return docs[:limit] if limit else docs


def train_hf(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's pattern
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size - 1, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tk


def cpu_timed(fn, *args):
    t = time.process_time()
    out = fn(*args)
    return out, time.process_time() - t


def compression(tok, texts: list[str]) -> float:
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return n_bytes / sum(len(tok.encode_ordinary(t)) for t in texts)


def run(cfg: BenchTokenizerConfig) -> dict:
    docs = read_docs(cfg.input, 40 if cfg.smoke else None)
    cut = max(1, int(len(docs) * 0.9))
    train, held = docs[:cut], docs[cut:]
    repeat = 1 if cfg.smoke else cfg.repeat
    times: dict[str, list[float]] = {k: [] for k in ("rustbpe", "hf_train", "tiktoken", "hf_encode")}
    for _ in range(repeat):  # interleaved, so load from neighbours falls on all alike
        ours, t = cpu_timed(train_bpe, train, cfg.vocab_size)
        times["rustbpe"].append(t)
        hf, t = cpu_timed(train_hf, train, cfg.vocab_size)
        times["hf_train"].append(t)
        ids, t = cpu_timed(lambda tok=ours: [tok.encode_ordinary(d) for d in docs])
        times["tiktoken"].append(t)
        # the same vocabulary, run by `tokenizers` (as transformers would load the exported tokenizer.json)
        from tokenizers import Tokenizer

        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_tokenizer_{os.getpid()}.json"
        write_tokenizer_json(ours, path)
        runner = Tokenizer.from_file(str(path))
        path.unlink()
        hf_ids, t = cpu_timed(lambda r=runner: [e.ids for e in r.encode_batch(docs, add_special_tokens=False)])
        times["hf_encode"].append(t)
    same = ids == hf_ids
    med = {k: statistics.median(v) for k, v in times.items()}
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    gpt2 = GPT2Tokenizer()
    shakespeare = Path(os.environ["GLASSGPT_MIRROR"]) / "tinyshakespeare" / "input.txt"
    held_texts = {"English, held-out 10% of documents": held}
    if shakespeare.exists():
        held_texts["tiny-shakespeare (not trained on)"] = [shakespeare.read_text(encoding="utf-8")]
    print(f"corpus {cfg.input}: {len(docs)} documents, {mb:.1f} MB; vocab {cfg.vocab_size}; one thread each; "
          f"median CPU seconds of {repeat} run(s); loadavg {os.getloadavg()[0]:.1f}")
    print(f"train  rustbpe {med['rustbpe']:.2f} s   HF tokenizers {med['hf_train']:.2f} s   "
          f"ratio {med['hf_train'] / med['rustbpe']:.1f}x")
    print(f"encode tiktoken {med['tiktoken']:.2f} s ({mb / med['tiktoken']:.1f} MB/s)   HF tokenizers "
          f"{med['hf_encode']:.2f} s   ratio {med['hf_encode'] / med['tiktoken']:.1f}x   identical ids: {same}")
    result = {"times": med, "identical_ids": same, "compression": {}}
    for name, texts in held_texts.items():
        ours_bpt, gpt2_bpt = compression(ours, texts), compression(gpt2, texts)
        result["compression"][name] = {"bpe": ours_bpt, "gpt2": gpt2_bpt}
        print(f"bytes/token on {name}: trained BPE-{cfg.vocab_size} {ours_bpt:.2f}, GPT-2 BPE-50257 {gpt2_bpt:.2f} "
              f"(ratio {ours_bpt / gpt2_bpt:.2f})")
    assert isinstance(ours, BPETokenizer)
    if not same:
        raise SystemExit("tiktoken and tokenizers disagree on the ids; the exported tokenizer.json is wrong")
    return result


def main(argv: list[str] | None = None) -> dict:
    return run(load_config(BenchTokenizerConfig, sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(run_main(main))
