"""A trained BPE goes through every command: train stores it, sample/eval/trace-spans/trace-knn/
trace-neurons/the viewer's explain use it, HF export writes a tokenizer.json that transformers' fast
tokenizer encodes identically, and `--init_from` finetunes a run onto new data prepared with its
tokenizer (another vocabulary is refused in one line)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TEXT

from glassgpt.bpe import BPETokenizer
from glassgpt.checkpoint import load_checkpoint
from glassgpt.corpus import Corpus
from glassgpt.errors import UserError
from glassgpt.prepare import main as prepare_main
from glassgpt.run import open_run
from glassgpt.train import main as train_main

TEXT = TINY_TEXT + "Émile's café — naïve 🎉 and 日本語 too.\n" * 3
TINY = ["--device=cpu", "--compile=False", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
        "--batch_size=4", "--max_iters=3", "--lr_decay_iters=3", "--warmup_iters=1", "--eval_iters=2",
        "--eval_interval=3", "--log_interval=1", "--plot=False", "--dtype=float32", "--threads=1"]


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bpe")
    src = root / "my.txt"
    src.write_text(TEXT, encoding="utf-8")
    data, out = root / "data", root / "out"
    prepare_main([str(src), f"--out_dir={data}", "--tokenizer=bpe", "--vocab_size=320", "--num_proc=1"])
    train_main([f"--data_dir={data}", f"--out_dir={out}", *TINY])
    return data, out


def test_checkpoint_carries_the_tokenizer(bpe_run):
    data, out = bpe_run
    ckpt = load_checkpoint(out)
    assert ckpt["tokenizer"]["tokenizer"] == "bpe" and len(ckpt["tokenizer"]["bpe"]["tokens"]) == 319
    run = open_run(out)
    assert isinstance(run.tokenizer, BPETokenizer) and run.model.config.vocab_size == 320
    (data / "tokenizer.json").rename(data / "moved.json")  # the checkpoint alone is enough
    try:
        assert open_run(out).tokenizer.tokens == run.tokenizer.tokens
    finally:
        (data / "moved.json").rename(data / "tokenizer.json")


def test_sample_and_eval_bits_per_byte_count_the_text_bytes(bpe_run, capsys):
    from glassgpt.evaluate import perplexity
    from glassgpt.sample import main as sample_main

    data, out = bpe_run
    texts = sample_main([f"--out_dir={out}", "--device=cpu", "--start=First", "--num_samples=2",
                         "--max_new_tokens=10", "--copying=False"])
    assert len(texts) == 2 and all(t.startswith("First") for t in texts)
    run = open_run(out)
    val = Corpus(data).tokens("val")
    r = perplexity(run.model, val, run.tokenizer)
    val_text_bytes = run.tokenizer.decode_bytes(val[:-1].tolist())  # the separator stands for no text
    val_text = run.tokenizer.decode(val[:-1].tolist())
    assert TEXT.endswith(val_text) and r["bytes"] == len(val_text_bytes) == len(val_text.encode())
    assert abs(r["bits_per_byte"] - r["nll_sum"] / np.log(2) / r["bytes"]) < 1e-9
    capsys.readouterr()


def test_trace_spans_offsets_are_exact_characters(bpe_run, capsys):
    from glassgpt.trace import spans

    data, out = bpe_run
    spans.main([f"--data_dir={data}", "--build"])
    run = open_run(out)
    tok = run.tokenizer
    text = "First Citizen: naïve 🎉 日本語 Speak, speak."
    ids = tok.encode(text)
    decoded, offs = spans.token_offsets(tok, ids)
    # the slow reference: characters completed by the bytes before each token (a token that starts
    # inside a character points at that character, as tiktoken's decode_with_offsets does)
    slow = [len(tok.decode_bytes(ids[:k]).decode("utf-8", "ignore")) for k in range(len(ids) + 1)]
    assert decoded == text and offs == slow
    assert any(len(tok.token_bytes(i).decode("utf-8", "ignore")) < len(tok.token_bytes(i)) for i in ids) or \
        len(ids) > len(text.encode()) // 4  # the text has split characters, or the check above is trivial
    r = spans.main([f"--data_dir={data}", "--text=Before we proceed any further, hear me speak.", "--json"])
    assert r["spans"] and r["spans"][0]["text"] in TEXT
    src = r["spans"][0]["sources"][0]
    assert TEXT.splitlines()[src["line"] - 1] in TEXT and TEXT[src["char_offset"]:].startswith(src["text"])
    capsys.readouterr()


def test_knn_neurons_and_viewer_explain_use_the_bpe(bpe_run, capsys):
    from glassgpt.trace import knn
    from glassgpt.trace import neurons as nz

    data, out = bpe_run
    knn.main([f"--out_dir={out}", "--build", "--progress=False"])
    text = Corpus(data).decode("train", 10, 40)
    r = knn.main([f"--out_dir={out}", f"--text={text}", "--k=2", "--json"])
    assert r["neighbours"][0]["text"]
    n = nz.main([f"--out_dir={out}", "--start=First", "--max_new_tokens=6", "--n_neurons=3", "--baseline_windows=2",
                 "--device=cpu", "--json"])
    assert len(n["top"]) == 3 and n["tokens"]
    from glassgpt.trace import spans
    from glassgpt.view.explain import Session

    spans.main([f"--data_dir={data}", "--build"])  # kept if built already
    text = "First Citizen: naïve 🎉 speak."
    ex = Session(out).explain(text)  # what the viewer's page shows
    assert all("error" not in ex[k] for k in ("spans", "knn", "neurons")), ex
    assert ex["token_offsets"][0] == 0 and ex["token_offsets"][-1] == len(text)
    capsys.readouterr()


def test_hf_export_tokenizer_encodes_identically(bpe_run, tmp_path, capsys):
    import transformers

    from glassgpt.export import main as export_main

    data, out = bpe_run
    dest = tmp_path / "hf"
    export_main([f"--out_dir={out}", "--to=hf", str(dest)])
    fast = transformers.PreTrainedTokenizerFast.from_pretrained(str(dest))
    auto = transformers.AutoTokenizer.from_pretrained(str(dest))
    run = open_run(out)
    for t in (TEXT, "unseen wörds 🎉🎉 \n\n  spaces", "x" * 50):
        ours = run.tokenizer.encode_ordinary(t)
        assert fast.encode(t) == ours and auto.encode(t) == ours and fast.decode(ours) == t
    assert fast.eos_token_id == run.tokenizer.eot_token
    model = transformers.GPT2LMHeadModel.from_pretrained(str(dest)).eval()
    ids = torch.tensor([run.tokenizer.encode("First Citizen: 🎉")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, run.model(ids, ids)[0], atol=1e-5, rtol=1e-4)
    again = open_run(str(dest))  # glassgpt reads its own export back
    assert isinstance(again.tokenizer, BPETokenizer) and again.tokenizer.tokens == run.tokenizer.tokens
    capsys.readouterr()


def test_finetune_a_run_onto_new_text_and_refuse_another_vocabulary(bpe_run, tmp_path, capsys):
    data, out = bpe_run
    new = tmp_path / "new.txt"
    new.write_text(TINY_TEXT.replace("Citizen", "Senator") * 2, encoding="utf-8")
    same, chars = tmp_path / "same", tmp_path / "chars"
    prepare_main([str(new), f"--out_dir={same}", f"--tokenizer={out}", "--num_proc=1"])  # the run's own tokenizer
    prepare_main([str(new), f"--out_dir={chars}", "--tokenizer=char", "--num_proc=1"])
    ft = tmp_path / "ft"
    result = train_main([f"--init_from={out}", f"--data_dir={same}", f"--out_dir={ft}", *TINY[:2], "--batch_size=4",
                         "--block_size=16", "--max_iters=2", "--eval_iters=1", "--eval_interval=2", "--plot=False"])
    assert result["iter_num"] == 2
    before, after = load_checkpoint(out), load_checkpoint(ft)
    assert after["tokenizer"]["bpe"] == before["tokenizer"]["bpe"] and after["model_args"]["block_size"] == 16
    w = "transformer.h.0.attn.c_attn.weight"
    assert not torch.equal(before["model"][w], after["model"][w])  # trained on
    assert (before["model"][w] - after["model"][w]).abs().max() < 0.05  # from the run's weights, not from scratch
    with pytest.raises(UserError, match="tokenized as char.*different bpe vocabulary.*--tokenizer=RUN_OUT_DIR"):
        train_main([f"--init_from={out}", f"--data_dir={chars}", f"--out_dir={tmp_path / 'x'}", *TINY])
    with pytest.raises(UserError, match="tokenized as bpe.*different"):  # a bpe of another vocabulary
        other = tmp_path / "other"
        prepare_main([str(new), f"--out_dir={other}", "--tokenizer=bpe", "--vocab_size=300", "--num_proc=1"])
        train_main([f"--init_from={out / 'ckpt.pt'}", f"--data_dir={other}", f"--out_dir={tmp_path / 'y'}", *TINY])
    assert json.loads((same / "meta.json").read_text())["tokenizer"] == "bpe"
    capsys.readouterr()
