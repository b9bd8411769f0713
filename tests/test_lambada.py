"""LAMBADA last-word accuracy and perplexity (glassgpt/lambada.py), on passages the tests write."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import glassgpt.lambada as lambada
from glassgpt.cli import main as cli_main
from glassgpt.download import RemoteFile, sha256_file
from glassgpt.errors import UserError
from glassgpt.loglik import encode_pair
from glassgpt.tokenizer import CharTokenizer
from tests.test_evaluate import TEXT, tiny_gpt, train_tiny

PASSAGES = ["the cat sat on the mat.", "the dog sat on the log.", "a cat and a dog met on a mat by a log.",
            "the dog sat on the mat.", "a dog and a cat met on a log by a mat."]


def write_passages(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def slow_scores(model, tok, passages):
    """One unpadded forward per target token, each over the same window as the harness: the last
    block_size + 1 tokens of context + target (a context cut from the left, never the target)."""
    out = []
    for p in passages:
        ctx, tgt = encode_pair(tok, p.context, p.target)
        full = (ctx + tgt)[-(model.config.block_size + 1):]
        ll, hit = 0.0, True
        for j in range(len(full) - len(tgt), len(full)):
            logits = model(torch.tensor([full[:j]]))[0][0, -1].double()
            ll += F.log_softmax(logits, -1)[full[j]].item()
            hit &= int(logits.argmax()) == full[j]
        out.append((ll, hit))
    return out


@pytest.fixture(scope="module")
def trained():
    tok = CharTokenizer.from_text(TEXT)
    return train_tiny(TEXT, tok), tok


def test_batched_scores_match_token_by_token_reference(trained, tmp_path):
    model, tok = trained
    passages = lambada.read_passages(write_passages(tmp_path / "l.jsonl", PASSAGES))
    r = lambada.score(model, tok, passages, batch_size=2)  # ragged batches, right-padded
    ref = slow_scores(model, tok, passages)
    for got, (ll, hit) in zip(r["per_example"], ref, strict=True):
        assert abs(got["loglik"] - ll) < 1e-3 and got["greedy"] == hit, (got, ll, hit)
    assert r["acc"] == sum(h for _, h in ref) / len(ref)
    assert abs(r["perplexity"] - math.exp(-sum(ll for ll, _ in ref) / len(ref))) < 1e-3 * r["perplexity"]


def test_a_trained_model_beats_a_random_one(trained, tmp_path):
    model, tok = trained
    passages = lambada.read_passages(write_passages(tmp_path / "l.jsonl", PASSAGES))
    good = lambada.score(model, tok, passages)
    rand = lambada.score(tiny_gpt(tok.vocab_size, block=32), tok, passages)
    assert good["perplexity"] < rand["perplexity"] / 10 and good["acc"] > rand["acc"], (good, rand)


def test_passages_split_at_the_last_space(tmp_path):
    ps = lambada.read_passages(write_passages(tmp_path / "l.jsonl", ["He said \"go\" to  Anna ", "x y"]), limit=5)
    assert [(p.context, p.target, p.line) for p in ps] == [("He said \"go\" to ", " Anna", 1), ("x", " y", 2)]


@pytest.mark.parametrize("line,why", [("not json", "JSON object"), ('{"txt": "a b"}', "JSON object"),
                                      ('{"text": "oneword"}', "no last word")])
def test_bad_lines_name_file_and_line(tmp_path, line, why):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "a b"}\n' + line + "\n")
    with pytest.raises(UserError, match=f"bad.jsonl:2: .*{why}"):
        lambada.read_passages(f)


def test_download_reads_the_mirror_and_checks_the_sha256(tmp_path, monkeypatch):
    """`--lambada=download` takes GLASSGPT_MIRROR's copy (or the canonical URL) and verifies it."""
    mirror = tmp_path / "mirror"
    src = write_passages((mirror / "lambada").mkdir(parents=True) or mirror / "lambada" / "lambada_test.jsonl",
                         PASSAGES)
    monkeypatch.setenv("GLASSGPT_MIRROR", str(mirror))
    real = lambada.LAMBADA_OPENAI
    assert real.url.endswith("/gpt-2/data/lambada_test.jsonl") and len(real.sha256) == 64
    monkeypatch.setattr(lambada, "LAMBADA_OPENAI", RemoteFile(real.mirror_path, real.url, sha256_file(src)))
    assert lambada.resolve_source("download") == src
    monkeypatch.setattr(lambada, "LAMBADA_OPENAI", real)  # the true checksum: this file is not OpenAI's
    with pytest.raises(UserError, match="sha256 does not match"):
        lambada.resolve_source("download")


def test_cli_eval_lambada(tmp_path, char_checkpoint, capsys):
    f = write_passages(tmp_path / "l.jsonl", ["First Citizen: Speak, speak.", "All: Resolved. resolved."])
    out = tmp_path / "res.json"
    assert cli_main(["eval", f"--out_dir={char_checkpoint}", f"--lambada={f}", "--device=cpu",
                     f"--json_out={out}"]) == 0
    assert "on LAMBADA" in capsys.readouterr().out
    res = json.loads(out.read_text())["lambada"]
    assert res["examples"] == 2 and 0 <= res["acc"] <= 1 and res["perplexity"] > 1
    assert cli_main(["eval", f"--out_dir={char_checkpoint}", f"--lambada={tmp_path / 'missing.jsonl'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
