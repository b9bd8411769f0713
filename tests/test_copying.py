""""Is it copying?" under each sample (glassgpt/copying.py): the share and the longest copied span
against a brute-force substring search of the training text, its source line, a control that copies
nothing, and the line in `sample` output (on by default where an index exists, off with --copying=False)."""

from __future__ import annotations

import random
import re

import pytest
from conftest import make_char_dataset, make_checkpoint

from glassgpt.copying import CopyingCheck
from glassgpt.sample import SEPARATOR
from glassgpt.sample import main as sample_main
from glassgpt.trace import spans

LINES = [
    "the quick brown fox jumps over the lazy dog near the river bank",
    "a stitch in time saves nine when the weather turns cold again",
    "every cloud has a silver lining but some days bring only rain",
    "fortune favours the bold who walk through the gates at dawn",
    "all that glitters is not gold said the old woman at the market",
] * 3
TRAIN_TEXT = "\n".join(f"{i}: {s}" for i, s in enumerate(LINES)) + "\n"


@pytest.fixture
def indexed(tmp_path):
    data = make_char_dataset(tmp_path / "data" / "c", TRAIN_TEXT + "zz qq xx\n" * 3, val_fraction=0.05)
    spans.main([f"--data_dir={data}", "--build"])
    return data


def brute_longest(train: str, text: str) -> str:
    """The longest piece of `text` that starts and ends at word edges and occurs in `train` (slow scan)."""
    starts = [m.start() for m in re.finditer(r"\w+", text)]
    ends = [m.end() for m in re.finditer(r"\w+", text)]
    best = ""
    for a in starts:
        for b in ends:
            if b - a > len(best) and text[a:b] in train:
                best = text[a:b]
    return best


def test_share_and_longest_span_against_a_brute_force_scan(indexed, capsys):
    check = CopyingCheck(spans.open_index(indexed))
    tok = check.index.tokenizer
    rng = random.Random(0)
    copied = "7: every cloud has a silver lining but some days"  # once in the data, at line 8
    for _ in range(5):
        junk = " ".join("".join(rng.choice("abdefgr") for _ in range(rng.randint(2, 5))) for _ in range(6))
        gen = f"{junk} {copied} {junk}"
        r = check.summary(tok.encode("0"), tok.encode(gen))
        longest = r["longest"]
        assert longest["text"] == brute_longest(TRAIN_TEXT, gen)
        src = longest["source"]
        assert src["line"] == TRAIN_TEXT[: TRAIN_TEXT.index(longest["text"])].count("\n") + 1 or \
            TRAIN_TEXT.splitlines()[src["line"] - 1].find(longest["text"]) >= 0
        assert TRAIN_TEXT[src["char_offset"]:].startswith(longest["text"])
        assert longest["count"] == TRAIN_TEXT.count(longest["text"])
        # the share: tokens inside copied runs of >= 12 characters, over the generated tokens
        assert abs(r["share"] - len(longest["text"]) / len(gen)) <= 12 / len(gen)
    line = check.line(tok.encode("0"), tok.encode(f"xq {copied} qx"))
    assert line.startswith("copying: ") and f'"{copied}", tiny.txt line 8' in line and "places" not in line
    capsys.readouterr()


def test_a_text_not_in_the_data_copies_nothing(indexed):
    check = CopyingCheck(spans.open_index(indexed))
    tok = check.index.tokenizer
    r = check.summary([], tok.encode("qxz bqd fgr zaq bbd rrq gq"))
    assert r["share"] == 0.0 and r["longest"] is None
    assert check.summary([1], []) is None


def test_sample_prints_the_line_where_an_index_exists(indexed, tmp_path, capsys):
    out = tmp_path / "out"
    make_checkpoint(out, indexed)
    argv = [f"--out_dir={out}", "--device=cpu", "--start=0: the", "--num_samples=2", "--max_new_tokens=15"]
    samples = sample_main(argv)
    printed = capsys.readouterr().out
    assert printed.count("copying: ") == 2 and printed.count(SEPARATOR) == 2
    for s in samples:  # each sample is followed by its own line, then the separator
        assert re.search(re.escape(s) + r"\ncopying: [^\n]+\n" + re.escape(SEPARATOR), printed)
    assert sample_main(argv + ["--copying=False"]) == samples
    assert "copying:" not in capsys.readouterr().out
    bare = tmp_path / "bare"
    make_checkpoint(tmp_path / "out2", make_char_dataset(bare, TRAIN_TEXT))  # no index: nothing printed
    sample_main([f"--out_dir={tmp_path / 'out2'}", "--device=cpu", "--start=0", "--max_new_tokens=5"])
    assert "copying:" not in capsys.readouterr().out
