"""Planted canaries: known sentences put into the training data, so a tracer's recall can be measured.

A canary is a line of random words drawn from the corpus's own vocabulary (so a char-level model can
write it), checked not to occur in the corpus, and planted as a whole line at random line starts of the
training part. A tracer is then asked about text that contains canaries; every canary it sees must be
traced back to the exact place it was planted (recall 1.0).

Stable API (shared by the span and kNN benchmarks and tests):

    plant_canaries(text, n, seed, repeats=1, limit=None) -> (new_text, canaries)
        canaries: [{"text", "char_offset", "char_offsets", "lines"}] -- offsets into new_text
    prepare_canary_dataset(out_dir, n=32, seed=0, repeats=1, chars=None) -> (data_dir, canaries)
        tiny-shakespeare (from $GLASSGPT_MIRROR; its first `chars` characters if given) + canaries in
        the training part, as a char dataset
        in glassgpt/corpus.py's layout under out_dir/data, with out_dir/data/canaries.json
    train_canary_model(data_dir, out_dir, max_iters, **overrides) -> dict   (calls glassgpt.train)
    reproduced_canaries(canaries, text) -> [canary, ...] whose text occurs verbatim in `text`

Run it to make a dataset (and optionally train on it):

    python -m benchmarks.canaries --out_dir=/tmp/canary --n=8 --repeats=40 --chars=20000 --max_iters=1500
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from glassgpt.corpus import write_dataset, write_json  # noqa: E402
from glassgpt.download import TINYSHAKESPEARE, local_or_fetch  # noqa: E402
from glassgpt.tokenizer import CharTokenizer  # noqa: E402

CANARY_WORDS = 6  # words per canary line: long enough to be unique, short enough to memorise
VAL_FRACTION = 0.1  # nanoGPT's shakespeare_char split: canaries go only in the first 90%


def _vocabulary(text: str) -> list[str]:
    """Lower-case words of 4+ letters seen in the text, sorted for determinism."""
    return sorted({w for w in re.findall(r"\b[a-z]{4,}\b", text)})


def make_canary(rng: random.Random, words: list[str], text: str) -> str:
    """A capitalised line of random corpus words ending in '.', not already in `text`."""
    while True:
        line = " ".join(rng.choice(words) for _ in range(CANARY_WORDS))
        line = line[0].upper() + line[1:] + "."
        if line not in text:
            return line


def plant_canaries(text: str, n: int, seed: int, repeats: int = 1,
                   limit: int | None = None) -> tuple[str, list[dict[str, Any]]]:
    """Insert `n` canary lines, each `repeats` times, at random line starts of text[:limit].

    Returns the new text and, per canary, its text, the char offset of its first copy, the offsets and
    (1-based) line numbers of all copies in the new text.
    """
    if n < 0 or repeats < 1:
        raise ValueError("n must be >= 0 and repeats >= 1")
    rng = random.Random(seed)
    words = _vocabulary(text)
    limit = len(text) if limit is None else limit
    starts = [0] + [m.end() for m in re.finditer("\n", text[:limit]) if m.end() < limit]
    lines: list[str] = []
    while len(lines) < n:
        line = make_canary(rng, words, text)
        if line not in lines:
            lines.append(line)
    # (insertion point in the old text, canary index); sorted so offsets can be computed in one pass
    plan = sorted((rng.choice(starts), i) for i in range(n) for _ in range(repeats))
    pieces, prev, shift = [], 0, 0
    offsets: list[list[int]] = [[] for _ in range(n)]
    for at, i in plan:
        pieces.append(text[prev:at])
        offsets[i].append(at + shift)
        pieces.append(lines[i] + "\n")
        shift += len(lines[i]) + 1
        prev = at
    pieces.append(text[prev:])
    new_text = "".join(pieces)
    canaries = []
    for i, line in enumerate(lines):
        offs = sorted(offsets[i])
        assert all(new_text[o:o + len(line)] == line for o in offs)
        canaries.append({"text": line, "char_offset": offs[0], "char_offsets": offs,
                         "lines": [new_text.count("\n", 0, o) + 1 for o in offs]})
    return new_text, canaries


def write_char_dataset(data_dir: Path, text: str, doc_id: str, val_fraction: float = VAL_FRACTION) -> Path:
    """One document split train/val like nanoGPT's shakespeare_char, in glassgpt/corpus.py's layout."""
    tok = CharTokenizer.from_text(text)
    n = int(len(text) * (1 - val_fraction))
    parts = {"train": (text[:n], 0), "val": (text[n:], n)}
    return write_dataset(data_dir, tok.meta(), {s: tok.encode(p) for s, (p, _) in parts.items()},
                         [{"id": doc_id, "source": f"{doc_id}.txt", "char_offset": 0, "line": 1}],
                         segments={s: [[0, 0, len(p), c, 1 + text.count("\n", 0, c)]] for s, (p, c) in parts.items()},
                         train_tokens=n, val_tokens=len(text) - n)


def prepare_canary_dataset(out_dir: str | Path, n: int = 32, seed: int = 0, repeats: int = 1,
                           chars: int | None = None) -> tuple[Path, list[dict[str, Any]]]:
    """tiny-shakespeare (its first `chars` characters, cut at a line end, if given) with `n` canaries
    (x `repeats`) planted in its training 90%, as a char dataset in out_dir/data; the canaries are also
    written to out_dir/data/canaries.json. A small `chars` lets a CPU-trained model memorise them."""
    out_dir = Path(out_dir)
    src = local_or_fetch(TINYSHAKESPEARE, out_dir / "download")
    text = src.read_text()
    if chars is not None:
        text = text[:text.rfind("\n", 0, chars) + 1]
    # plant before the split point, measured on the original text, so every copy lands in train
    limit = int(len(text) * (1 - VAL_FRACTION)) - (n * repeats) * 80
    new_text, canaries = plant_canaries(text, n, seed, repeats=repeats, limit=limit)
    data_dir = write_char_dataset(out_dir / "data", new_text, "tinyshakespeare+canaries")
    n_train = int(len(new_text) * (1 - VAL_FRACTION))
    assert all(o + len(c["text"]) <= n_train for c in canaries for o in c["char_offsets"])
    write_json(data_dir / "canaries.json", {"seed": seed, "repeats": repeats, "canaries": canaries})
    return data_dir, canaries


def train_canary_model(data_dir: str | Path, out_dir: str | Path, max_iters: int, **overrides: Any) -> dict:
    """Train a small char GPT on a canary dataset with glassgpt.train. The defaults (2 layers, 96 wide,
    context 48, lr 3e-3) memorised all 8 canaries of prepare_canary_dataset(n=8, repeats=40,
    chars=20_000) in 1500 iterations, ~8 minutes on 2 CPU cores (benchmarks/RESULTS.md)."""
    from glassgpt.config import TrainConfig
    from glassgpt.train import train

    cfg = TrainConfig(
        out_dir=str(out_dir), data_dir=str(data_dir), dataset=Path(data_dir).name,
        n_layer=2, n_head=2, n_embd=96, block_size=48, batch_size=32, dropout=0.0,
        gradient_accumulation_steps=1, learning_rate=3e-3, max_iters=max_iters, lr_decay_iters=max_iters,
        min_lr=3e-4, warmup_iters=min(100, max_iters // 10), beta2=0.99, eval_interval=max(max_iters, 1),
        eval_iters=20, log_interval=max(max_iters // 20, 1), device="cpu", dtype="float32", compile=False,
        plot=False, always_save_checkpoint=True,
    )
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise TypeError(f"TrainConfig has no field {k!r}")
        setattr(cfg, k, v)
    return train(cfg)


def reproduced_canaries(canaries: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """The canaries whose full text occurs verbatim in `text`."""
    return [c for c in canaries if c["text"] in text]


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out_dir", required=True)
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--chars", type=int, default=None, help="use only the first CHARS characters")
    p.add_argument("--max_iters", type=int, default=0, help="train a model for this many iterations (0: don't)")
    a = p.parse_args(argv)
    data_dir, canaries = prepare_canary_dataset(a.out_dir, a.n, a.seed, a.repeats, a.chars)
    print(f"{len(canaries)} canaries x{a.repeats} planted in {data_dir}; e.g. {canaries[0]['text']!r}")
    if a.max_iters:
        print(json.dumps(train_canary_model(data_dir, Path(a.out_dir) / "model", a.max_iters), default=str)[:500])


if __name__ == "__main__":
    main()
