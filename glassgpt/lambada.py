"""LAMBADA: predict the last word of a passage whose last word needs the whole passage (Paperno et al.
2016, https://arxiv.org/abs/1606.06031), in the form OpenAI evaluated GPT-2 on and lm-evaluation-harness's
`lambada_openai` task scores:

    glassgpt eval --init_from=gpt2 --lambada=download          # OpenAI's lambada_test.jsonl, 5,153 passages
    glassgpt eval --out_dir=out --lambada=my_lambada.jsonl     # any {"text": ...} JSON Lines file

Each passage is split at its last space: context = everything before it, target = " " + the last word.
`acc` counts passages whose every target token is the model's argmax given the context (greedy
decoding reproduces the word); `perplexity` is exp of the mean over passages of -log p(target | context)
(the harness's definition: per passage, not per token). `download` takes the file from
GLASSGPT_MIRROR's lambada/lambada_test.jsonl when the mirror is set, else from its canonical URL, and
checks its sha256 either way.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glassgpt.download import RemoteFile, local_or_fetch
from glassgpt.errors import UserError

LAMBADA_OPENAI = RemoteFile(
    "lambada/lambada_test.jsonl",
    "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl",
    "4aa8d02cd17c719165fc8a7887fddd641f43fcafa4b1c806ca8abc31fabdb226",
)
CACHE_DIR = Path.home() / ".cache" / "glassgpt"


@dataclass
class Passage:
    context: str
    target: str
    """The last word with its leading space, as the model must continue the context."""
    line: int


def resolve_source(source: str) -> Path:
    """'download' -> the verified canonical file (mirror or cached download); else a local file."""
    if source == "download":
        return local_or_fetch(LAMBADA_OPENAI, CACHE_DIR)
    path = Path(source)
    if not path.is_file():
        raise UserError(f"--lambada={source} does not exist; give a JSON Lines file of {{\"text\": ...}} "
                        "or --lambada=download")
    return path


def read_passages(path: str | Path, limit: int | None = None) -> list[Passage]:
    """The passages of a {"text": ...} JSON Lines file, split at the last space; one clear line naming
    file:line for a line that is not such an object or has no space to split at."""
    passages = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{path}:{lineno}: not a JSON object with a \"text\" string") from None
            context, space, word = str(text).rstrip().rpartition(" ")
            if not space or not context.strip() or not word:
                raise UserError(f"{path}:{lineno}: the passage has no last word after a space to predict")
            passages.append(Passage(context, " " + word, lineno))
            if limit is not None and len(passages) >= limit:
                break
    if not passages:
        raise UserError(f"{path} holds no passages")
    return passages


def score(model: Any, tok: Any, passages: list[Passage], batch_size: int = 8) -> dict[str, Any]:
    """acc (with its standard error) and perplexity over `passages`; per-passage log-likelihoods."""
    from glassgpt.loglik import continuation_scores, encode_pair

    t0 = time.perf_counter()
    lls, hits = [], []
    for i in range(0, len(passages), batch_size):
        chunk = passages[i : i + batch_size]
        for ll, hit in continuation_scores(model, [encode_pair(tok, p.context, p.target) for p in chunk]):
            lls.append(ll)
            hits.append(hit)
    n = len(passages)
    acc = sum(hits) / n
    return {"examples": n, "acc": acc, "acc_stderr": math.sqrt(acc * (1 - acc) / max(n - 1, 1)),
            "perplexity": math.exp(-sum(lls) / n), "seconds": time.perf_counter() - t0,
            "per_example": [{"line": p.line, "loglik": round(ll, 4), "greedy": h}
                            for p, ll, h in zip(passages, lls, hits, strict=True)]}


def run_lambada(model: Any, tok: Any, source: str, limit: int | None, batch_size: int, name: str) -> dict[str, Any]:
    """`glassgpt eval --lambada=...`: score, print one line, return the result for --json_out."""
    path = resolve_source(source)
    r = score(model, tok, read_passages(path, limit), batch_size)
    print(f"{name} on LAMBADA ({path}): {r['examples']} passages, acc {r['acc']:.4f} ± {r['acc_stderr']:.4f}, "
          f"perplexity {r['perplexity']:.2f} ({r['examples'] / r['seconds']:.1f} passages/s)")
    return {"source": str(path), **r}
