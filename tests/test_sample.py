"""sample.py / `glassgpt sample`: nanoGPT's output format, seeds, streaming, the REPL, nanoGPT and
Hugging Face checkpoints against reference generations, and each bad input as one line + exit 2."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY_TEXT
from glassgpt.errors import run_main
from glassgpt.model import GPT, GPTConfig
from glassgpt.run import open_run
from glassgpt.sample import SEPARATOR, main

CPU = "--device=cpu"


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = run_main(main, argv)
    out, err = capsys.readouterr()
    return rc, out, err


def reference_greedy(out_dir: Path, prompt: str, n: int) -> str:
    """nanoGPT's way: full recomputation with model.generate."""
    opened = open_run(out_dir)
    model, tok = opened.model, opened.tokenizer
    ids = torch.tensor([tok.encode(prompt)])
    return tok.decode(model.generate(ids, n, temperature=0)[0].tolist())


def test_prints_samples_nanogpt_style(char_checkpoint, capsys):
    argv = [f"--out_dir={char_checkpoint}", CPU, "--start=All:", "--num_samples=3", "--max_new_tokens=20"]
    rc, out, _ = run(argv, capsys)
    samples = main(argv)
    capsys.readouterr()
    assert rc == 0 and out.count(SEPARATOR + "\n") == 3 and len(samples) == 3
    assert out == "".join(s + "\n" + SEPARATOR + "\n" for s in samples)
    assert all(s.startswith("All:") and len(s) == len("All:") + 20 for s in samples)
    assert len(set(samples)) == 3
    assert main(argv) == samples  # same seed, same samples
    assert main(argv + ["--seed=1"]) != samples


def test_greedy_sample_equals_full_recompute_reference(char_checkpoint, capsys):
    # 80 new tokens: well past the checkpoint's block_size of 32, so --window_rule=sliding matters
    for extra, n in (([], 20), (["--window_rule=sliding"], 80)):
        out = main([f"--out_dir={char_checkpoint}", CPU, "--start=Speak", "--num_samples=1", "--temperature=0",
                    f"--max_new_tokens={n}"] + extra)
        assert out == [reference_greedy(char_checkpoint, "Speak", n)]
    capsys.readouterr()


def test_streamed_output_equals_batch_output_and_stop_cuts(char_checkpoint, capsys):
    base = [f"--out_dir={char_checkpoint}", CPU, "--start=All:", "--num_samples=1", "--max_new_tokens=30"]
    streamed = main(base)
    out_streamed = capsys.readouterr().out
    main(base + ["--stream=False"])
    assert capsys.readouterr().out == out_streamed == streamed[0] + "\n" + SEPARATOR + "\n"
    stop = streamed[0][len("All:") + 3 : len("All:") + 5]
    cut = streamed[0][: streamed[0].index(stop, len("All:")) + len(stop)]
    assert main(base + [f"--stop={stop}"]) == [cut]
    assert capsys.readouterr().out == cut + "\n" + SEPARATOR + "\n"


def test_start_from_file(char_checkpoint, tmp_path, capsys):
    (tmp_path / "prompt.txt").write_text("First Citizen:\n")
    a = main([f"--out_dir={char_checkpoint}", CPU, f"--start=FILE:{tmp_path / 'prompt.txt'}", "--num_samples=1",
              "--max_new_tokens=10"])
    b = main([f"--out_dir={char_checkpoint}", CPU, "--start=First Citizen:\n", "--num_samples=1", "--max_new_tokens=10"])
    assert a == b and a[0].startswith("First Citizen:\n")
    rc, _, err = run([f"--out_dir={char_checkpoint}", CPU, f"--start=FILE:{tmp_path / 'nope.txt'}"], capsys)
    assert rc == 2 and "nope.txt" in err and len(err.strip().splitlines()) == 1


def test_long_prompt_is_cropped_with_a_note(char_checkpoint, capsys):
    prompt = "Speak, speak. " * 5  # 70 characters, block_size is 32
    rc, out, err = run([f"--out_dir={char_checkpoint}", CPU, f"--start={prompt}", "--num_samples=1",
                        "--max_new_tokens=5", "--temperature=0"], capsys)
    assert rc == 0 and "70 tokens" in err and "last 32" in err
    opened = open_run(char_checkpoint)
    model, tok = opened.model, opened.tokenizer
    ref = model.generate(torch.tensor([tok.encode(prompt)[-32:]]), 5, temperature=0)[0, 32:].tolist()
    assert out == prompt + tok.decode(ref) + "\n" + SEPARATOR + "\n"


def one_line_error(rc: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (rc, err)
    return lines[0]


def test_unseen_characters_are_named(char_checkpoint, capsys):
    rc, out, err = run([f"--out_dir={char_checkpoint}", CPU, "--start=Zebra~"], capsys)
    line = one_line_error(rc, err)
    assert "'Z'" in line and "'~'" in line and "'z'" not in line and out == ""


@pytest.mark.parametrize("damage", ["missing", "corrupt", "truncated", "other_format", "not_a_dict"])
def test_bad_checkpoints_are_one_line_errors(char_checkpoint, tmp_path, capsys, damage):
    ckpt = char_checkpoint / "ckpt.pt"
    out_dir = char_checkpoint
    if damage == "missing":
        out_dir = tmp_path / "nowhere"
    elif damage == "corrupt":
        ckpt.write_bytes(os.urandom(4096))
    elif damage == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    elif damage == "other_format":
        torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 3}, ckpt)
    else:
        torch.save([torch.zeros(2)], ckpt)
    rc, out, err = run([f"--out_dir={out_dir}", CPU], capsys)
    line = one_line_error(rc, err)
    assert str(out_dir) in line and out == ""


@pytest.mark.parametrize("arg", ["--top_p=1.5", "--top_k=0", "--num_samples=0", "--temperature=-1",
                                 "--window_rule=rolling", "--tempreature=1", "--init_from=scratch"])
def test_bad_settings_are_one_line_errors(char_checkpoint, capsys, arg):
    one_line_error(*run([f"--out_dir={char_checkpoint}", CPU, arg], capsys)[::2])


def write_nanogpt_checkpoint(root: Path, text: str) -> Path:
    """out/ckpt.pt and data/shakespeare_char/meta.pkl exactly as nanoGPT's prepare.py and train.py write
    them: a torch.compile'd model's state dict (`_orig_mod.` keys), model_args without `activation`,
    the optimizer state, a tensor best_val_loss, the config globals, and a pickled meta dict."""
    chars = sorted(set(text))
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}
    (root / "data" / "shakespeare_char").mkdir(parents=True)
    with open(root / "data" / "shakespeare_char" / "meta.pkl", "wb") as f:
        pickle.dump(meta, f)
    model_args = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, bias=False, vocab_size=len(chars), dropout=0.0)
    torch.manual_seed(3)
    model = GPT(GPTConfig(**model_args))
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    x = torch.randint(0, len(chars), (2, 32))
    model(x, x)[1].backward()
    optimizer.step()
    config = {"out_dir": "out", "dataset": "shakespeare_char", "batch_size": 2, "block_size": 32,
              "learning_rate": 1e-3, "compile": True, "device": "cpu", "dtype": "float32", **model_args}
    checkpoint = {
        "model": {"_orig_mod." + k: v for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "model_args": model_args,
        "iter_num": 250,
        "best_val_loss": torch.tensor(1.47),
        "config": config,
    }
    (root / "out").mkdir()
    torch.save(checkpoint, root / "out" / "ckpt.pt")
    return root / "out"


def test_nanogpt_checkpoint_and_meta_pkl_sample_like_the_reference(tmp_path, monkeypatch, capsys):
    text = TINY_TEXT + "ROMEO:\nJULIET:\n"
    out_dir = write_nanogpt_checkpoint(tmp_path, text)
    monkeypatch.chdir(tmp_path)  # nanoGPT finds data/<dataset>/meta.pkl relative to the working dir
    greedy = main(["--out_dir=out", CPU, "--start=ROMEO:", "--num_samples=1", "--max_new_tokens=25", "--temperature=0"])
    assert greedy == [reference_greedy(out_dir, "ROMEO:", 25)]
    # one seeded sample draws what torch.manual_seed(seed) + nanoGPT's model.generate draws
    sampled = main(["--out_dir=out", CPU, "--start=ROMEO:", "--num_samples=1", "--max_new_tokens=25", "--seed=42",
                    "--temperature=0.8", "--top_k=200"])
    opened = open_run(out_dir)
    model, tok = opened.model, opened.tokenizer
    torch.manual_seed(42)
    ref = model.generate(torch.tensor([tok.encode("ROMEO:")]), 25, temperature=0.8, top_k=200)[0].tolist()
    assert sampled == [tok.decode(ref)] and sampled != greedy
    capsys.readouterr()


def test_hugging_face_directory_samples_like_transformers(tmp_path, capsys):
    import transformers  # the test extra installs it
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64,
                                                              vocab_size=50257)).eval()
    hf.save_pretrained(tmp_path / "hf")
    from glassgpt.tokenizer import GPT2Tokenizer

    tok = GPT2Tokenizer()
    ids = tok.encode("Hello, world")
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=50256)[0].tolist()
    out = main([f"--init_from={tmp_path / 'hf'}", CPU, "--start=Hello, world", "--num_samples=1",
                "--max_new_tokens=12", "--temperature=0"])
    assert out == [tok.decode(ref)]
    capsys.readouterr()


def test_interactive_repl_over_stdin(char_checkpoint):
    """`glassgpt sample --interactive` in a subprocess: the model loads once, each stdin line is a
    prompt, a bad prompt prints its error and the loop goes on, EOF ends it with status 0."""
    argv = [f"--out_dir={char_checkpoint}", CPU, "--num_samples=1", "--max_new_tokens=12", "--temperature=0"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "glassgpt.cli", "sample", *argv, "--interactive"],
                          input="All:\nZebra\nSpeak\n", capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    expected = main(argv + ["--start=All:"]) + main(argv + ["--start=Speak"])
    assert proc.stdout == "".join(s + "\n" + SEPARATOR + "\n" for s in expected)
    assert proc.stderr.count("error: ") == 1 and "'Z'" in proc.stderr


def test_sample_py_shim_runs(char_checkpoint):
    proc = subprocess.run([sys.executable, "sample.py", f"--out_dir={char_checkpoint}", CPU, "--num_samples=2",
                           "--max_new_tokens=5"], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0 and proc.stdout.count(SEPARATOR) == 2, proc.stderr
    proc = subprocess.run([sys.executable, "sample.py", "--out_dir=/nonexistent/x", CPU], capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: no checkpoint")


def test_sample_from_an_hf_export_of_a_char_model_uses_its_char_tokenizer(char_checkpoint, tmp_path, capsys):
    """A regression: sample --init_from=<HF dir exported from a char model> took GPT-2 BPE and crashed."""
    from glassgpt.export import main as export_main

    export_main([f"--out_dir={char_checkpoint}", str(tmp_path / "hf")])
    capsys.readouterr()
    argv = [CPU, "--start=All:", "--num_samples=1", "--max_new_tokens=8", "--temperature=0"]
    rc, out, err = run([f"--init_from={tmp_path / 'hf'}", *argv], capsys)
    assert rc == 0, err
    rc2, out2, _ = run([f"--out_dir={char_checkpoint}", *argv], capsys)
    sample = lambda text: text[text.index("All:"):].split("---------------")[0]  # noqa: E731
    assert rc2 == 0 and sample(out) == sample(out2)  # same model, same tokenizer, same greedy text
