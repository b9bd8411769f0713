"""Every command on a checkpoint trained the way the CPU record recipe trains (every trace command must
work on a record checkpoint): Muon, rotary, QK-norm, ReLU², value embeddings, smear, gated
attention, an untied head, bf16 autocast."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from glassgpt import cli
from glassgpt.train import train
from tests.test_train import tiny_cfg

REPO = Path(__file__).resolve().parents[1]


def recipe_options() -> dict:
    """The architecture, optimizer and dtype keys of config/train_shakespeare_char_cpu.py, read from the file."""
    keys = {"rope", "qk_norm", "activation", "value_embed", "smear", "attn_gate", "tie_embeddings", "bias",
            "optimizer", "muon_lr", "lr_schedule", "decay_frac", "dtype"}
    tree = ast.parse((REPO / "config" / "train_shakespeare_char_cpu.py").read_text())
    return {n.targets[0].id: ast.literal_eval(n.value) for n in tree.body
            if isinstance(n, ast.Assign) and n.targets[0].id in keys}


# the recipe as it is, and with ALiBi for rotary plus n-gram tables and nanochat's init
VARIANTS = {"record": {}, "alibi_ngram": dict(rope=False, alibi=True, ngram=3, ngram_rows=97, init="fan_in")}


@pytest.fixture(scope="module", params=VARIANTS)
def record_run(tmp_path_factory, request) -> Path:
    from tests.conftest import make_char_dataset

    root = tmp_path_factory.mktemp(request.param)
    data = make_char_dataset(root / "tiny_char")
    opts = recipe_options()
    assert opts["value_embed"] and opts["qk_norm"] and opts["rope"] and opts["optimizer"] == "muon"
    train(tiny_cfg(data, root / "out", max_iters=4, **{**opts, **VARIANTS[request.param]}))
    return root / "out"


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_every_command_on_a_record_checkpoint(record_run: Path, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    o = f"--out_dir={record_run}"
    from tests.conftest import TINY_TEXT

    text = TINY_TEXT[40:80]
    alibi = record_run.parent.name.startswith("alibi")
    from glassgpt.checkpoint import load_checkpoint, model_args_of

    args = model_args_of(load_checkpoint(record_run))
    assert (args["alibi"], args["rope"], args["ngram"]) == ((True, False, 3) if alibi else (False, True, 0))
    steps = [
        ["sample", o, "--start=the", "--max_new_tokens=12", "--num_samples=1", "--seed=1"],
        ["eval", o, f"--data_dir={record_run.parent / 'tiny_char'}"],
        ["trace-spans", o, "--build"],
        ["trace-spans", o, f"--text={text}", "--json"],
        ["trace-knn", o, "--build"],
        ["trace-knn", o, f"--text={text}", "--json"],
        ["trace-neurons", o, "--start=First", "--max_new_tokens=12", "--ablate=True"],
        ["neuron", o, "--layer=1", "--index=3"],
        ["extend-context", o, "--block_size=32", f"--method={'copy' if alibi else 'base'}",
         f"--new_out_dir={tmp_path / 'ctx32'}"],
        ["sample", f"--out_dir={tmp_path / 'ctx32'}", "--start=the", "--max_new_tokens=20", "--num_samples=1"],
    ]
    for argv in steps:
        code, out, err = run(argv, capsys)
        assert code == 0, f"{argv}: exit {code}\n{err[-1500:]}"
        assert (out + err).strip(), f"{argv} printed nothing"
        if "--json" in argv:
            json.loads(out)
    code, out, err = run(["export", o, f"--dest={tmp_path / 'hf'}"], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert any(opt in err for opt in ("rope", "alibi", "qk_norm", "relu2", "value_embed")), err
