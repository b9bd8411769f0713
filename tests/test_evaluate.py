"""Zero-shot evaluation: sliding-window perplexity against a token-by-token oracle, bits per byte
against a direct count, and multiple-choice scoring on hand-built and test-trained cases."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from glassgpt.cli import main as cli_main
from glassgpt.errors import UserError
from glassgpt.evaluate import (
    MCExample,
    continuation_logprobs,
    multiple_choice,
    parse_mc_example,
    perplexity,
    read_mc_jsonl,
    token_nlls,
)
from glassgpt.model import GPT, GPTConfig
from glassgpt.tokenizer import CharTokenizer, GPT2Tokenizer
from glassgpt.windows import sliding_windows

TEXT = "the cat sat on the mat. the dog sat on the log. a cat and a dog met on a mat by a log.\n" * 6


def tiny_gpt(vocab: int, block: int = 16, seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(block_size=block, vocab_size=vocab, n_layer=2, n_head=2, n_embd=32, bias=True)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


@torch.no_grad()
def slow_token_nlls(model: GPT, seq: list[int], block: int) -> torch.Tensor:
    """The oracle: one forward per token over its full (cropped) left context."""
    out = []
    for j in range(len(seq) - 1):
        ctx = torch.tensor(seq[max(0, j + 1 - block) : j + 1])[None]
        logits, _ = model(ctx)  # last position only
        out.append(F.cross_entropy(logits[0], torch.tensor([seq[j + 1]])).item())
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("n", [1, 5, 16, 17, 40, 101])
@pytest.mark.parametrize("block,stride", [(16, 1), (16, 5), (16, 8), (16, 16), (7, 3)])
def test_windows_score_every_target_once_with_enough_context(n, block, stride):
    seen = np.zeros(n, dtype=int)
    for b, e, s in sliding_windows(n, block, stride):
        assert 0 <= b <= s < e <= n and e - b <= block
        seen[s:e] += 1
        if b > 0:  # later windows are full, and their new targets keep block - stride context
            assert e - b == block and s - b >= block - stride
    assert seen.tolist() == [1] * n


def test_bad_stride():
    with pytest.raises(UserError, match="stride=17"):
        list(sliding_windows(50, 16, 17))


def test_stride_one_matches_token_by_token_oracle():
    model = tiny_gpt(30)
    seq = torch.randint(0, 30, (53,))
    ref = slow_token_nlls(model, seq.tolist(), 16)
    for batch in (1, 4, 64):
        got = token_nlls(model, seq, 16, 1, batch)
        print(f"stride 1, batch {batch}: max |nll diff| = {(got - ref).abs().max():.2e}")
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


@torch.no_grad()
def test_strided_windows_match_direct_forward():
    """stride=block is nanoGPT-style disjoint chunks; other strides score each target from its window."""
    model = tiny_gpt(30)
    seq = torch.randint(0, 30, (70,))
    for stride in (16, 6):
        ref = torch.empty(69, dtype=torch.float64)
        for b, e, s in sliding_windows(69, 16, stride):
            logits = model.lm_head(model.hidden_states(seq[b:e][None]))[0]
            ref[s:e] = F.cross_entropy(logits, seq[b + 1 : e + 1], reduction="none")[s - b :].double()
        got = token_nlls(model, seq, 16, stride, batch_size=3)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    # more context never hurts a trained model much, but on random weights the values simply differ
    assert not torch.equal(token_nlls(model, seq, 16, 16), token_nlls(model, seq, 16, 1))


def test_bits_per_byte_gpt2_against_slow_reference(mirror):
    tok = GPT2Tokenizer()
    text = "Naïve café — «quoted» 😀 text.\nSecond line: 12,345 tokens?\n"
    model = tiny_gpt(50257, block=24, n_layer=1, n_embd=16)
    r = perplexity(model, tok.encode(text), tok, block_size=24, stride=1, batch_size=8)
    seq = [tok.eot_token] + tok.encode(text)  # <|endoftext|> in front: the first token is scored too
    ref = slow_token_nlls(model, seq, 24)
    n_bytes = len(text.encode("utf-8"))
    bpb = ref.sum().item() / math.log(2) / n_bytes
    print(f"bits/byte {r['bits_per_byte']:.6f} vs slow {bpb:.6f}; {r['tokens']} tokens, {r['bytes']} bytes")
    assert r["bytes"] == n_bytes and r["tokens"] == len(seq) - 1
    assert abs(r["bits_per_byte"] - bpb) < 1e-6
    assert abs(r["perplexity"] - math.exp(ref.mean().item())) < 1e-3 * r["perplexity"]


def test_bits_per_byte_char_model():
    """No <|endoftext|>: the first character has no context and is not scored, nor are its bytes."""
    text = "héllo wörld, héllo again"
    tok = CharTokenizer.from_text(text)
    model = tiny_gpt(tok.vocab_size)
    r = perplexity(model, tok.encode(text), tok, block_size=8, stride=1)
    assert r["tokens"] == len(text) - 1 and r["bytes"] == len(text[1:].encode("utf-8"))
    ref = slow_token_nlls(model, tok.encode(text), 8)
    assert abs(r["nll_sum"] - ref.sum().item()) < 1e-4
    assert abs(r["bits_per_byte"] - ref.sum().item() / math.log(2) / r["bytes"]) < 1e-5


def train_tiny(text: str, tok: CharTokenizer, steps: int = 150) -> GPT:
    """A few steps of plain torch on the text: enough to learn its letters and words."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=48, bias=True))
    data = torch.tensor(tok.encode(text))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        ix = torch.randint(0, len(data) - 33, (16,))
        x = torch.stack([data[i : i + 32] for i in ix])
        y = torch.stack([data[i + 1 : i + 33] for i in ix])
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained():
    tok = CharTokenizer.from_text(TEXT)
    return train_tiny(TEXT, tok), tok


def test_trained_model_beats_random(trained):
    model, tok = trained
    held_out = "the dog sat on the mat. a cat met a dog on a log.\n"
    r = perplexity(model, tok.encode(held_out), tok, stride=8)
    r0 = perplexity(tiny_gpt(tok.vocab_size, block=32), tok.encode(held_out), tok, stride=8)
    print(f"trained: ppl {r['perplexity']:.2f}, {r['bits_per_byte']:.3f} bits/byte; random: ppl {r0['perplexity']:.2f}")
    assert r0["perplexity"] > 0.8 * tok.vocab_size  # random weights: about uniform
    assert r["perplexity"] < 4.0 and r["bits_per_byte"] < 2.0


def test_trained_model_picks_true_continuations(trained):
    model, tok = trained
    examples = [
        MCExample("the cat sat on the", ["mat.", "dog", "a log sat"], 0, 1),
        MCExample("the dog sat on the", ["cat cat", "log.", "a"], 1, 2),
        MCExample("a cat and a dog met on a", ["the", "mat by a log.", "sat dog"], 1, 3),
        MCExample("the cat", ["on a", "dog log", "sat on the mat."], 2, 4),
    ]
    r = multiple_choice(model, tok, examples, batch_size=3)
    print({k: r[k] for k in ("acc", "acc_norm", "acc_token_norm")})
    assert r["acc_norm"] == 1.0 and r["acc_token_norm"] == 1.0 and r["examples"] == 4


def unigram_model(logits: dict[str, float]) -> tuple[GPT, CharTokenizer]:
    """A GPT whose next-token distribution ignores the context: every block writes zero and ln_f's
    gain is zero, so the final hidden state is ln_f's bias; wte = identity makes it the logits."""
    tok = CharTokenizer({c: i for i, c in enumerate(logits)}, list(logits))
    V = len(logits)
    model = GPT(GPTConfig(block_size=16, vocab_size=V, n_layer=1, n_head=1, n_embd=V, bias=True)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.transformer.wte.weight.copy_(torch.eye(V))
        model.transformer.ln_f.bias.copy_(torch.tensor(list(logits.values())))
    return model, tok


def test_hand_built_acc_vs_acc_norm():
    """' z' is likelier in total, ' aaaa' likelier per character: acc and acc_norm must disagree."""
    model, tok = unigram_model({" ": 2.0, "a": 1.5, "b": 0.0, "z": 0.8})
    logp = F.log_softmax(torch.tensor([2.0, 1.5, 0.0, 0.8]), dim=0).double()
    lp = dict(zip(" abz", logp.tolist()))
    pairs = [(tok.encode("ab a"), tok.encode(" z")), (tok.encode("ab a"), tok.encode(" aaaa"))]
    got = continuation_logprobs(model, pairs)
    want = [lp[" "] + lp["z"], lp[" "] + 4 * lp["a"]]
    print(f"log-likelihoods {got} vs {want}")
    assert max(abs(g - w) for g, w in zip(got, want)) < 1e-5
    r = multiple_choice(model, tok, [MCExample("ab a", ["z", "aaaa"], 1, 1)])
    assert (r["acc"], r["acc_norm"], r["acc_token_norm"]) == (0.0, 1.0, 1.0)
    assert r["per_example"][0]["acc"] == 0 and r["per_example"][0]["acc_norm"] == 1


def test_long_contexts_are_cut_from_the_left():
    model, tok = unigram_model({" ": 2.0, "a": 1.5, "b": 0.0, "z": 0.8})
    short = continuation_logprobs(model, [(tok.encode("ab"), tok.encode(" zz"))])
    long = continuation_logprobs(model, [(tok.encode("ab" * 40), tok.encode(" zz"))])  # 80 > block 16
    assert abs(short[0] - long[0]) < 1e-5


def test_parse_hellaswag_formats():
    doc = {"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
           "ctx": "A man is sitting on a roof. he", "endings": ["is using wrap.", "starts pulling up roofing."],
           "label": "1"}
    ctx, endings, label = parse_mc_example(doc, "harness")
    assert ctx == "Roof shingle removal: A man is sitting on a roof. He" and label == 1
    ctx, endings, label = parse_mc_example({k: v for k, v in doc.items() if k not in ("ctx_a", "ctx_b")}, "plain")
    assert ctx == "A man is sitting on a roof. he" and endings[1] == "starts pulling up roofing."
    wikihow = {"activity_label": "Home and Garden", "ctx": "[header] How to fold a shirt [title] Lay it flat.",
               "endings": ["a", "b [step] c"], "label": 0}
    ctx, endings, _ = parse_mc_example(wikihow, "harness")
    assert ctx == "Home and Garden: How to fold a shirt. Lay it flat." and endings == ["a", "b c"]
    for bad, why in [([1], "JSON object"), ({"endings": ["a", "b"], "label": 0}, "no context"),
                     ({"ctx": "x", "endings": ["a"], "label": 0}, "at least two"),
                     ({"ctx": "x", "endings": ["a", "b"], "label": 2}, "not an index"),
                     ({"ctx": "x", "endings": ["a", "b"], "label": "two"}, "numeric string")]:
        with pytest.raises(ValueError, match=why):
            parse_mc_example(bad)


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


def test_bad_jsonl_lines_stop_or_skip(tmp_path, capsys):
    good = {"ctx": "the cat", "endings": ["sat", "dog"], "label": 0}
    f = write_jsonl(tmp_path / "mc.jsonl", [good, "{not json", {"ctx": "x", "endings": ["a", "b"], "label": 5}, good])
    with pytest.raises(UserError, match=r"mc.jsonl:2: .*--on_bad_line=skip"):
        read_mc_jsonl(f)
    got = read_mc_jsonl(f, on_bad_line="skip")
    assert [e.line for e in got] == [1, 4]
    err = capsys.readouterr().err
    assert "mc.jsonl:2" in err and "mc.jsonl:3: label 5" in err
    with pytest.raises(UserError, match="no usable examples"):
        read_mc_jsonl(write_jsonl(tmp_path / "bad.jsonl", ["[]"]), on_bad_line="skip")


def test_cli_eval_checkpoint(tmp_path, char_checkpoint, char_dataset, capsys):
    from tests.conftest import TINY_TEXT

    text = tmp_path / "held.txt"
    text.write_text(TINY_TEXT[:300])
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"ctx": "First Citizen:", "endings": ["Speak", "All"], "label": 0}] * 3)
    out = tmp_path / "res.json"
    rc = cli_main(["eval", f"--out_dir={char_checkpoint}", f"--text={text}", f"--mc={mc}", "--mc_style=plain",
                   "--device=cpu", "--stride=8", f"--json_out={out}"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "bits/byte" in printed and "acc_norm" in printed
    res = json.loads(out.read_text())
    assert res["perplexity"]["tokens"] == 299 and res["multiple_choice"]["examples"] == 3
    # the prepared dataset's val split, scored in full
    assert cli_main(["eval", f"--out_dir={char_checkpoint}", f"--data_dir={char_dataset}", "--device=cpu"]) == 0
    n_val = (char_dataset / "val.bin").stat().st_size // 2
    assert f"{n_val - 1:,} tokens" in capsys.readouterr().out


def test_cli_eval_bad_input(tmp_path, char_checkpoint, capsys):
    assert cli_main(["eval", f"--out_dir={char_checkpoint}"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    f = tmp_path / "greek.txt"
    f.write_text("αβγ")
    assert cli_main(["eval", f"--out_dir={char_checkpoint}", f"--text={f}", "--device=cpu"]) == 2
    assert "never saw" in capsys.readouterr().err
    assert cli_main(["eval", f"--out_dir={char_checkpoint}", f"--text={tmp_path / 'none.txt'}"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_eval_hf_directory(tmp_path, mirror, capsys):
    import transformers  # the test extra installs it
    torch.manual_seed(0)
    text = tmp_path / "t.txt"
    text.write_text("Hello world. " * 20)
    for vocab, rc in ((50257, 0), (1000, 2)):
        cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=32, vocab_size=vocab)
        d = tmp_path / f"hf{vocab}"
        transformers.GPT2LMHeadModel(cfg).save_pretrained(d)
        assert cli_main(["eval", f"--init_from={d}", f"--text={text}", "--device=cpu"]) == rc
    captured = capsys.readouterr()
    assert "61 tokens" in captured.out  # "Hello", " world", "." x 20 and the final " ", each scored once
    assert "outside the model's vocabulary of 1000" in captured.err


def test_eval_exported_char_model_and_foreign_vocab(tmp_path, char_checkpoint, capsys):
    """An exported char checkpoint evaluates from its HF directory with its own vocabulary; an HF
    directory whose vocab.json is not GPT-2's is refused rather than fed GPT-2 ids."""
    from tests.conftest import TINY_TEXT

    hf_dir = tmp_path / "hf_char"
    assert cli_main(["export", f"--out_dir={char_checkpoint}", str(hf_dir)]) == 0
    text = tmp_path / "t.txt"
    text.write_text(TINY_TEXT[:200])
    args = ["eval", f"--text={text}", "--device=cpu", "--stride=8"]
    assert cli_main([*args, f"--out_dir={char_checkpoint}"]) == 0
    assert cli_main([*args, f"--init_from={hf_dir}"]) == 0
    a, b = [line for line in capsys.readouterr().out.splitlines() if "bits/byte" in line]
    assert a.split(":", 1)[1].split("(", 1)[0] == b.split(":", 1)[1].split("(", 1)[0]  # same tokens, bytes
    assert a.split("loss")[1].split(";")[0] == b.split("loss")[1].split(";")[0]  # loss, perplexity, bits/byte
    (hf_dir / "glassgpt_tokenizer.json").unlink()
    (hf_dir / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    assert cli_main([*args, f"--init_from={hf_dir}"]) == 2
    assert "not GPT-2's BPE vocabulary" in capsys.readouterr().err
