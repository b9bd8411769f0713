""""Is it copying?" at a glance: one line under each sample from `sample.py` / `glassgpt sample`.

    copying: 31% of the sample is verbatim training text (runs of >= 4 tokens); longest 14 tokens,
    "I will not be your fool", my.txt line 4120 (2 places)

Where the run's training data has a span index (`glassgpt trace-spans --build --data_dir=...`),
each generated text (the prompt left out) is matched against it with the span engine's own rules
(glassgpt/trace/spans.py: `find_spans`, maximal spans that start and end at word boundaries):
the share is the fraction of generated tokens inside a span of at least `min_len` tokens found in
the training data (trace-spans' coverage, same default min_len: 12 characters for char-level data,
4 tokens otherwise), and the longest such span is shown with one place it occurs. `--copying=False`
turns it off; without an index nothing is printed. `glassgpt trace-spans` gives the full trace.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from glassgpt.errors import UserError


class CopyingCheck:
    """Matches samples against the span index of a run's training data."""

    def __init__(self, index: Any):
        self.index = index
        self.min_len = 12 if index.is_char else 4

    @classmethod
    def open(cls, run: Any) -> CopyingCheck | None:
        """The check for `run`'s training data; None when it has no (fresh) span index or another
        tokenizer (with a note on stderr when an index exists but cannot be used)."""
        from glassgpt.trace.span_index import default_index_dir

        data_dir = getattr(run, "data_dir", None)
        if data_dir is None or not (default_index_dir(data_dir) / "train.index.json").exists():
            return None
        from glassgpt.trace.spans import open_index

        try:
            index = open_index(data_dir)
        except UserError as e:
            print(f"note: no copying check ({e})", file=sys.stderr)
            return None
        ours, theirs = run.tokenizer, index.tokenizer
        if ours.name != theirs.name or ours.vocab_size != theirs.vocab_size or \
                getattr(ours, "stoi", None) != getattr(theirs, "stoi", None):
            print(f"note: no copying check: {data_dir} is tokenized differently from the model", file=sys.stderr)
            return None
        return cls(index)

    def summary(self, prompt_ids: list[int], new_ids: list[int]) -> dict[str, Any] | None:
        """{'share', 'min_len', 'tokens', 'longest': {text, tokens, count, source} or None}; None
        when nothing was generated."""
        from glassgpt.trace.spans import find_spans, token_offsets

        if not new_ids:
            return None
        ids = [int(i) for i in prompt_ids] + [int(i) for i in new_ids]
        first = len(prompt_ids)
        text, offsets = token_offsets(self.index.tokenizer, ids)
        spans, ranges = find_spans(self.index, ids, text, offsets, first, min_len=self.min_len)
        covered = np.zeros(len(ids), dtype=bool)
        for s in spans:
            covered[s.start:s.end] = True
        out: dict[str, Any] = {"share": float(covered[first:].mean()), "min_len": self.min_len,
                               "tokens": len(new_ids), "longest": None}
        if spans:
            i = max(range(len(spans)), key=lambda k: (spans[k].end - spans[k].start, spans[k].char_end
                                                       - spans[k].char_start, -k))
            s = spans[i]
            pos = self.index.sample_positions(ranges[i], 1)
            source = self.index.source(int(pos[0]), s.end - s.start, 0) if len(pos) else None
            out["longest"] = {"text": s.text, "tokens": s.end - s.start, "count": s.count, "source": source}
        return out

    def line(self, prompt_ids: list[int], new_ids: list[int]) -> str:
        """The one line printed under a sample."""
        r = self.summary(prompt_ids, new_ids)
        if r is None:
            return "copying: nothing generated"
        unit = "characters" if self.index.is_char else "tokens"
        head = (f"copying: {r['share']:.0%} of the sample is verbatim training text (runs of >= {r['min_len']} "
                f"{unit})")
        longest = r["longest"]
        if longest is None:
            return head + "; no run that long"
        text = longest["text"].replace("\n", "\u21b5")
        text = text if len(text) <= 80 else text[:77] + "..."
        src = longest["source"] or {}
        where = f", {src.get('source') or src.get('doc_id')} line {src.get('line')}" if src else ""
        places = f" ({longest['count']} places)" if longest["count"] > 1 else ""
        return f"{head}; longest {longest['tokens']} {unit}, \"{text}\"{where}{places}"
