"""One sampling contract: the same --start, seed and settings give the same text in every command.

sample, trace-spans, trace-knn, trace-neurons, trace-influence, report and the viewer's /api/generate each generate
from a tiny random char model with the same settings (top-k, top-p, the sliding window past
block_size); every one must print the text `sample` prints. A different seed is the control: it must
change the text, so the comparison can fail. Then the prompt rules themselves (empty, too long).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest

from glassgpt.errors import UserError
from glassgpt.sampling import SamplingSettings, generate_from, prompt_ids
from glassgpt.tokenizer import CharTokenizer

PROMPT = "All:"
# 40 new tokens after a 4-token prompt pass block_size=32: the window rule is exercised too
SETTINGS = {"max_new_tokens": 40, "temperature": 0.9, "top_k": 5, "top_p": 0.95, "seed": 11, "window_rule": "sliding"}


def argv(settings: dict) -> list[str]:
    return [f"--{k}={v}" for k, v in settings.items()]


def _quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn(*args)


def generated_by_every_command(out: Path, data: Path, tmp: Path, settings: dict) -> dict[str, str]:
    """command -> the generated continuation of PROMPT (prompt excluded)."""
    from fastapi.testclient import TestClient

    from glassgpt import sample
    from glassgpt.trace import influence_cli, knn, neurons, spans
    from glassgpt.view import report
    from glassgpt.view.explain import Session
    from glassgpt.view.server import ViewConfig, make_app

    common = [f"--out_dir={out}", "--device=cpu", f"--start={PROMPT}", *argv(settings)]
    got = {}
    text = _quiet(sample.main, [*common, "--num_samples=1", "--stream=False"])[0]
    got["sample"] = text[len(PROMPT):]
    r = _quiet(spans.main, [*common, f"--data_dir={data}", "--json"])
    got["trace-spans"] = r["text"][len(PROMPT):]
    got["trace-knn"] = _quiet(knn.main, [*common, "--json"])["generated"]
    got["trace-neurons"] = _quiet(neurons.main, [*common, "--rank=raw", "--json"])["output"]
    got["trace-influence"] = _quiet(influence_cli.main, [*common, "--json", "--k=1"])["generated"]
    page = tmp / "report.html"
    _quiet(report.main, [*common, f"--out={page}"])
    blob = re.search(r'<script id="glassgpt-data" type="application/json">(.*?)</script>', page.read_text(), re.S)
    got["report"] = json.loads(blob.group(1))["result"]["text"][len(PROMPT):]
    client = TestClient(make_app(Session(out, device="cpu"), ViewConfig(out_dir=str(out))))
    body = {"prompt": PROMPT, **settings}
    with client.stream("POST", "/api/generate", json=body) as resp:
        events = resp.read().decode()
    done = [json.loads(line[len("data: "):]) for line in events.splitlines() if line.startswith("data: ")][-1]
    got["view"] = done["generated"]
    return got


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A tiny char checkpoint with its span index and kNN store built."""
    from conftest import make_char_dataset, make_checkpoint

    from glassgpt.trace import influence_cli, knn, spans

    root = tmp_path_factory.mktemp("sampling")
    data = make_char_dataset(root / "data" / "tiny")
    out = root / "out"
    make_checkpoint(out, data, block_size=32)
    _quiet(spans.main, [f"--data_dir={data}", "--build"])
    _quiet(knn.main, [f"--out_dir={out}", "--device=cpu", "--build", "--progress=False"])
    _quiet(influence_cli.main, [f"--out_dir={out}", "--device=cpu", "--build", "--progress=False"])
    return out, data, root


def test_every_command_generates_the_same_text(built):
    out, data, root = built
    got = generated_by_every_command(out, data, root, SETTINGS)
    print(json.dumps(got, indent=1))
    assert len(got["sample"]) == 40
    assert {k: v for k, v in got.items() if v != got["sample"]} == {}
    # the control: another seed changes the text (so the comparison above can fail)
    from glassgpt import sample

    other = _quiet(sample.main, [f"--out_dir={out}", "--device=cpu", f"--start={PROMPT}",
                                 *argv({**SETTINGS, "seed": 12}), "--num_samples=1", "--stream=False"])[0]
    assert other[len(PROMPT):] != got["sample"]


def test_trace_neurons_samples_with_top_k_like_sample(built):
    """trace-neurons once sampled without top-k; with top_k=1 every command is greedy."""
    from glassgpt import sample
    from glassgpt.trace import neurons

    out, _, _ = built
    common = [f"--out_dir={out}", "--device=cpu", f"--start={PROMPT}", "--max_new_tokens=20", "--top_k=1"]
    s = _quiet(sample.main, [*common, "--num_samples=1", "--stream=False"])[0][len(PROMPT):]
    g = _quiet(sample.main, [*common[:-1], "--temperature=0", "--num_samples=1", "--stream=False"])[0][len(PROMPT):]
    n = _quiet(neurons.main, [*common, "--rank=raw", "--json"])["output"]
    assert s == g == n


class _Eot(CharTokenizer):
    eot_token = 0


def test_prompt_rules_empty_and_too_long():
    tok = CharTokenizer.from_text("abcdef")
    with pytest.raises(UserError, match="prompt is empty"):
        prompt_ids(tok, "", 8)
    assert prompt_ids(_Eot(tok.stoi, tok.itos), "", 8) == [0]
    notes: list[str] = []
    ids = prompt_ids(tok, "abcdefabcdef", 8, notes.append)
    assert ids == tok.encode("abcdefabcdef")[-8:] and len(notes) == 1 and "last 8 tokens" in notes[0]
    assert prompt_ids(tok, "abc", 8, notes.append) == tok.encode("abc") and len(notes) == 1


def test_generate_from_crops_a_long_prompt_as_the_engine_sees_it(char_checkpoint):
    """A prompt past block_size is generated from its last block_size tokens: the same text as that
    cropped prompt gives, and (sliding window) as the uncropped prompt gives in the raw engine."""
    from glassgpt.generate import generate
    from glassgpt.run import open_run

    run = open_run(char_checkpoint)
    long = "First Citizen:\nBefore we proceed any further, hear me speak.\n"  # > 32 tokens
    s = SamplingSettings(max_new_tokens=10, seed=3, window_rule="sliding")
    a = generate_from(run.model, run.tokenizer, long, s, note=lambda m: None)
    assert len(a.prompt_ids) == 32
    b = generate_from(run.model, run.tokenizer, run.tokenizer.decode(a.prompt_ids), s)
    raw = generate(run.model, [run.tokenizer.encode(long)], 10, temperature=0.8, top_k=200, seed=3, window="sliding")
    assert a.outputs == b.outputs == raw
