"""GPT-2 weights in and out, checked against Hugging Face transformers on tiny random GPT-2s.

The slow oracle is transformers' own GPT2LMHeadModel: every parameter (biases and LayerNorm gains
included) is randomised so a missed transpose or a dropped bias cannot hide behind zero init.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from glassgpt.checkpoint import save_checkpoint
from glassgpt.cli import main as cli_main
from glassgpt.errors import UserError
from glassgpt.generate import generate
from glassgpt.model import GPT, GPTConfig
from glassgpt.export import export_hf
from glassgpt.pretrained import PRETRAINED_NAMES, check_vocab, from_pretrained, pretrained_tokenizer

# (n_layer, n_head, n_embd, n_positions, vocab_size, activation_function): odd shapes on purpose.
SHAPES = [
    (3, 4, 96, 77, 1000, "gelu_new"),
    (1, 1, 8, 9, 17, "gelu_new"),
    (2, 5, 40, 33, 321, "gelu"),
    (4, 3, 48, 130, 777, "gelu_pytorch_tanh"),
]


def make_hf_model(n_layer=3, n_head=4, n_embd=96, n_positions=77, vocab_size=1000, act="gelu_new",
                  seed=0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions, vocab_size=vocab_size,
                     activation_function=act, bos_token_id=0, eos_token_id=0)
    hf = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # wide random weights: peaked logits, non-zero biases, non-unit LN gains
        for name, p in hf.named_parameters():
            p.normal_(1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0.0, 0.15)
    return hf


def save_hf(hf: GPT2LMHeadModel, path: Path) -> Path:
    hf.save_pretrained(path)
    return path


def our_logits(model: GPT, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.lm_head(model.hidden_states(x))  # all positions (forward() scores only the last)


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    diff = (ours - ref).abs().max().item()
    print(f"{what}: max |logit diff| = {diff:.2e}")
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "L{}H{}C{}T{}V{}-{}".format(*s))
def test_logits_match_transformers(tmp_path, shape):
    n_layer, n_head, n_embd, n_pos, vocab, act = shape
    hf = make_hf_model(*shape)
    model = from_pretrained(str(save_hf(hf, tmp_path / "hf"))).eval()
    assert model.config.activation == ("gelu" if act == "gelu" else "gelu_new")
    assert (model.config.n_layer, model.config.block_size, model.config.vocab_size) == (n_layer, n_pos, vocab)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied again after loading
    x = torch.randint(0, vocab, (3, n_pos))
    with torch.no_grad():
        ref = hf(x).logits
    assert_logits_close(our_logits(model, x), ref, f"logits {shape}")


@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "L{}H{}C{}".format(*s[:3]))
def test_greedy_generation_matches_transformers(tmp_path, shape):
    hf = make_hf_model(*shape)
    model = from_pretrained(str(save_hf(hf, tmp_path / "hf"))).eval()
    vocab, n_pos = shape[4], shape[3]
    prompt = torch.randint(0, vocab, (2, min(5, n_pos - 1)))
    new = min(20, n_pos - prompt.size(1))  # HF cannot go past n_positions; the 1-layer model has 9
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                          attention_mask=torch.ones_like(prompt))
    ours = model.generate(prompt, max_new_tokens=new, temperature=0)  # full recompute per token
    print(f"greedy {shape}: {ours[0, prompt.size(1):].tolist()}")
    assert ours.tolist() == ref.tolist()
    engine = generate(model, prompt.tolist(), new, temperature=0)  # glassgpt's KV-cache engine
    assert engine == ref[:, prompt.size(1):].tolist()
    if shape == SHAPES[0]:
        assert new == 20


def test_openai_layout_bin_without_prefix(tmp_path):
    """OpenAI's hub files were saved from GPT2Model (no `transformer.` prefix), some as pytorch_model.bin
    with the causal-mask buffers in them: load those too, with weights_only=True."""
    hf = make_hf_model()
    d = tmp_path / "openai_layout"
    d.mkdir()
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    state["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 77, 77))  # old transformers' mask buffer
    torch.save(state, d / "pytorch_model.bin")
    hf.config.to_json_file(d / "config.json")
    model = from_pretrained(str(d)).eval()
    x = torch.randint(0, 1000, (2, 40))
    with torch.no_grad():
        assert_logits_close(our_logits(model, x), hf(x).logits, "pytorch_model.bin")


def test_pickled_code_is_refused(tmp_path):
    hf = make_hf_model(1, 1, 8, 9, 17)
    d = save_hf(hf, tmp_path / "evil")
    (d / "model.safetensors").unlink()
    torch.save({"x": np.float64}, d / "pytorch_model.bin")  # a global (a class): weights_only says no
    with pytest.raises(UserError, match="could not read the weights"):
        from_pretrained(str(d))


@pytest.mark.parametrize("bias,activation,vocab", [(False, "gelu", 50304), (True, "gelu_new", 300)])
def test_export_round_trip(tmp_path, mirror, bias, activation, vocab):
    """our checkpoint -> `glassgpt export` -> transformers -> identical logits -> from_pretrained again."""
    torch.manual_seed(1)
    cfg = GPTConfig(block_size=24, vocab_size=vocab, n_layer=2, n_head=2, n_embd=32, bias=bias, activation=activation)
    model = GPT(cfg).eval()
    with torch.no_grad():  # nanoGPT init leaves biases at 0 and LN gains at 1: perturb them
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    out = tmp_path / "out"
    save_checkpoint(out / "ckpt.pt", {"model": model.state_dict(), "model_args": cfg.to_dict(), "iter_num": 0,
                                      "best_val_loss": 1e9, "config": {}, "optimizer": {},
                                      "tokenizer": {"tokenizer": "gpt2", "vocab_size": 50257}})
    dest = tmp_path / "exported"
    assert cli_main(["export", f"--out_dir={out}", "--to=hf", str(dest)]) == 0
    hf_cfg = json.loads((dest / "config.json").read_text())
    assert hf_cfg["activation_function"] == activation and hf_cfg["vocab_size"] == vocab
    hf = GPT2LMHeadModel.from_pretrained(dest).eval()
    x = torch.randint(0, vocab, (2, 24))
    with torch.no_grad():
        ref = hf(x).logits
    assert_logits_close(ref, our_logits(model, x), f"export bias={bias} {activation}")
    back = from_pretrained(str(dest)).eval()
    assert back.config.activation == activation
    torch.testing.assert_close(our_logits(back, x), our_logits(model, x), rtol=0, atol=0)
    # the GPT-2 tokenizer files came along, and transformers reads them as GPT-2's BPE
    tok = transformers.GPT2Tokenizer.from_pretrained(dest)
    assert tok.encode("Hello world") == [15496, 995]
    # and glassgpt recognises GPT-2's vocabulary in it, also once transformers has re-serialised it
    tok.save_pretrained(tmp_path / "resaved")
    for d in (dest, tmp_path / "resaved"):
        assert pretrained_tokenizer(str(d)).encode("Hello world") == [15496, 995]


def test_hf_to_glassgpt_to_hf(tmp_path):
    """export_hf of a loaded GPT-2 gives back transformers' own model: same config, same logits."""
    hf = make_hf_model(2, 5, 40, 33, 321, "gelu")
    model = from_pretrained(str(save_hf(hf, tmp_path / "hf")))
    again = GPT2LMHeadModel.from_pretrained(export_hf(model, tmp_path / "again")).eval()
    assert again.config.activation_function == "gelu" and again.config.n_positions == 33
    x = torch.randint(0, 321, (2, 33))
    with torch.no_grad():
        assert_logits_close(again(x).logits, hf(x).logits, "HF -> glassgpt -> HF")


def test_export_char_checkpoint_keeps_its_vocab(tmp_path, char_checkpoint):
    dest = tmp_path / "hf_char"
    assert cli_main(["export", f"--out_dir={char_checkpoint}", str(dest)]) == 0
    meta = json.loads((dest / "glassgpt_tokenizer.json").read_text())
    assert meta["tokenizer"] == "char" and not (dest / "vocab.json").exists()
    assert "eos_token_id" not in json.loads((dest / "config.json").read_text())
    assert "lm_head.weight" not in load_file(str(dest / "model.safetensors"))  # tied, HF re-ties


def test_export_bad_arguments(tmp_path, char_checkpoint, capsys):
    assert cli_main(["export", f"--out_dir={char_checkpoint}", "--to=onnx", str(tmp_path / "x")]) == 2
    assert "to='onnx' is not one of hf" in capsys.readouterr().err
    assert cli_main(["export", f"--out_dir={char_checkpoint}"]) == 2
    assert "say where to write" in capsys.readouterr().err
    assert cli_main(["export", f"--out_dir={tmp_path / 'nothing'}", str(tmp_path / "x")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_export_refuses_a_non_empty_directory_unless_overwrite(tmp_path, char_checkpoint, capsys):
    dest = tmp_path / "other_model"
    dest.mkdir()
    (dest / "config.json").write_text('{"another": "model"}')
    assert cli_main(["export", f"--out_dir={char_checkpoint}", str(dest)]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert (dest / "config.json").read_text() == '{"another": "model"}'
    assert cli_main(["export", f"--out_dir={char_checkpoint}", "--overwrite", str(dest)]) == 0
    assert json.loads((dest / "config.json").read_text())["model_type"] == "gpt2"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert cli_main(["export", f"--out_dir={char_checkpoint}", str(tmp_path / "empty_ok")]) == 0


@pytest.mark.parametrize("option, value", [("qk_norm", True), ("activation", "relu2"), ("tie_embeddings", False)])
def test_export_refuses_a_non_gpt2_architecture(tmp_path, char_dataset, capsys, option, value):
    meta = json.loads((char_dataset / "meta.json").read_text())
    cfg = GPTConfig(block_size=16, vocab_size=meta["vocab_size"], n_layer=1, n_head=2, n_embd=16, **{option: value})
    model = GPT(cfg)
    save_checkpoint(tmp_path / "out" / "ckpt.pt", {"model": model.state_dict(), "model_args": cfg.to_dict(),
                                                   "iter_num": 0, "config": {}, "tokenizer": meta})
    dest = tmp_path / "hf"
    assert cli_main(["export", f"--out_dir={tmp_path / 'out'}", str(dest)]) == 2
    err = capsys.readouterr().err
    assert f"{option}=" in err and len(err.strip().splitlines()) == 1 and not dest.exists()


def test_hf_export_remembers_the_training_data(tmp_path, char_checkpoint, char_dataset):
    from glassgpt.run import open_run

    dest = tmp_path / "hf"
    assert cli_main(["export", f"--out_dir={char_checkpoint}", str(dest)]) == 0
    run = open_run(dest)
    assert run.data_dir == char_dataset and run.data_fingerprint == open_run(char_checkpoint).data_fingerprint


def test_overrides(tmp_path):
    d = str(save_hf(make_hf_model(), tmp_path / "hf"))
    m = from_pretrained(d, {"dropout": 0.2, "block_size": 50, "activation": None})
    assert m.config.dropout == 0.2 and m.config.block_size == 50
    assert m.transformer.wpe.weight.shape == (50, 96)
    with pytest.raises(UserError, match="larger than the 77 positions"):
        from_pretrained(d, {"block_size": 78})
    with pytest.raises(UserError, match="cannot override n_layer"):
        from_pretrained(d, {"n_layer": 2})


def test_unknown_model_name_lists_valid_ones():
    with pytest.raises(UserError) as e:
        from_pretrained("gpt2-xxl")
    msg = str(e.value)
    assert "did you mean gpt2-xl" in msg and all(n in msg for n in PRETRAINED_NAMES)
    assert PRETRAINED_NAMES == ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def test_hub_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set and gpt2 .* not in the Hugging Face cache"):
        from_pretrained("gpt2")


def test_directories_that_are_not_gpt2(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no config.json"):
        from_pretrained(str(empty))
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UserError, match="'llama' model, not GPT-2"):
        from_pretrained(str(llama))
    d = save_hf(make_hf_model(1, 1, 8, 9, 17), tmp_path / "noweights")
    (d / "model.safetensors").unlink()
    with pytest.raises(UserError, match="no weights"):
        from_pretrained(str(d))
    (d / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(UserError, match="could not read the weights"):
        from_pretrained(str(d))
    # config.json says 2 layers, the weights hold 1
    d2 = save_hf(make_hf_model(1, 1, 8, 9, 17), tmp_path / "mismatch")
    cfg = json.loads((d2 / "config.json").read_text())
    (d2 / "config.json").write_text(json.dumps({**cfg, "n_layer": 2}))
    with pytest.raises(UserError, match="missing"):
        from_pretrained(str(d2))
    # an untied lm_head and an unsupported option are refused, not silently mangled
    d3 = save_hf(make_hf_model(1, 1, 8, 9, 17), tmp_path / "untied")
    state = load_file(str(d3 / "model.safetensors"))
    state["lm_head.weight"] = torch.randn_like(state["transformer.wte.weight"])
    save_file(state, str(d3 / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match="untied"):
        from_pretrained(str(d3))
    (d3 / "config.json").write_text(json.dumps({**cfg, "scale_attn_by_inverse_layer_idx": True}))
    with pytest.raises(UserError, match="scale_attn_by_inverse_layer_idx"):
        from_pretrained(str(d3))


def test_check_vocab():
    gpt2_meta = {"tokenizer": "gpt2", "vocab_size": 50257}
    check_vocab(50304, gpt2_meta)  # padded vocab holds GPT-2's ids
    check_vocab(50257, None)  # nanoGPT data without meta: GPT-2 assumed
    with pytest.raises(UserError, match="50257 token ids .* embeds only 1000"):
        check_vocab(1000, gpt2_meta)
    char_meta = {"tokenizer": "char", "vocab_size": 65, "stoi": {"a": 0}}
    with pytest.raises(UserError, match="character-level .* GPT-2 BPE"):
        check_vocab(50257, char_meta)
    check_vocab(65, char_meta, model_tokenizer=char_meta)
    with pytest.raises(UserError, match="different char vocabulary"):
        check_vocab(65, char_meta, model_tokenizer={**char_meta, "stoi": {"b": 0}})


def make_bpe_dataset(data_dir: Path, text: str) -> Path:
    """A GPT-2 BPE dataset (train.bin/val.bin uint16 + meta.json) like data/shakespeare's."""
    from glassgpt.corpus import write_dataset
    from glassgpt.tokenizer import GPT2Tokenizer

    tok = GPT2Tokenizer()
    ids = tok.encode(text)
    n = int(0.9 * len(ids))
    return write_dataset(data_dir, tok.meta(), {"train": ids[:n], "val": ids[n:]},
                         [{"id": "text", "source": "text.txt", "char_offset": 0, "line": 1}], fingerprint=False)


def test_finetune_from_hf_dir_and_sample_bpe(tmp_path, mirror):
    """config/finetune_shakespeare.py from a tiny local HF GPT-2 for 3 steps, then decode a BPE sample."""
    from glassgpt.run import open_run
    from glassgpt.train import main as train_main
    from tests.conftest import TINY_TEXT

    repo = Path(__file__).resolve().parents[1]
    hf_dir = save_hf(make_hf_model(2, 2, 32, 64, 50257, "gelu_new"), tmp_path / "tiny_gpt2")
    data = make_bpe_dataset(tmp_path / "data" / "shakespeare", TINY_TEXT)
    out = tmp_path / "out-shakespeare"
    res = train_main([str(repo / "config/finetune_shakespeare.py"), f"--init_from={hf_dir}", f"--data_dir={data}",
                      f"--out_dir={out}", "--device=cpu", "--compile=False", "--max_iters=3", "--eval_iters=2",
                      "--batch_size=2", "--gradient_accumulation_steps=2", "--block_size=32",
                      "--learning_rate=3e-3", "--always_save_checkpoint=True", "--plot=False"])
    evals = [r for r in res["log"] if "val_loss" in r]
    print(f"finetune val loss {evals[0]['val_loss']:.3f} -> {evals[-1]['val_loss']:.3f}")
    assert res["iter_num"] == 3 and evals[-1]["val_loss"] < evals[0]["val_loss"]
    run = open_run(out)
    model, tok, ckpt = run.model, run.tokenizer, run.checkpoint_meta
    assert ckpt["model_args"]["activation"] == "gelu_new" and ckpt["model_args"]["block_size"] == 32
    assert tok.name == "gpt2" and model.config.vocab_size == 50257
    prompt = tok.encode("First Citizen:")
    new = generate(model, [prompt], 12, temperature=1.0, top_k=50, seed=0)[0]
    text = tok.decode(prompt + new)
    print(repr(text))
    assert text.startswith("First Citizen:") and len(new) == 12 and isinstance(text, str)


def test_eval_only_prints_pretrained_losses(tmp_path, mirror, capsys):
    """config/eval_gpt2.py's path (eval_only) with a local HF directory in place of OpenAI's gpt2."""
    from glassgpt.train import main as train_main
    from tests.conftest import TINY_TEXT

    repo = Path(__file__).resolve().parents[1]
    hf_dir = save_hf(make_hf_model(2, 2, 32, 64, 50257, "gelu_new"), tmp_path / "tiny_gpt2")
    data = make_bpe_dataset(tmp_path / "data" / "owt", TINY_TEXT)
    res = train_main([str(repo / "config/eval_gpt2.py"), f"--init_from={hf_dir}", f"--data_dir={data}",
                      f"--out_dir={tmp_path / 'o'}", "--device=cpu", "--compile=False", "--eval_iters=2",
                      "--batch_size=2", "--block_size=32", "--plot=False"])
    assert res["iter_num"] == 0 and set(res["last_eval"]) == {"train", "val"}
    assert "step 0: train loss" in capsys.readouterr().out
