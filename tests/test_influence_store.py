"""trace-influence: the store's life cycle (one process and torchrun), candidates vs exhaustive scoring,
the breakdowns, the command (--json, --start, --text/--output), char and BPE data, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, make_checkpoint

from glassgpt.checkpoint import save_checkpoint
from glassgpt.errors import run_main
from glassgpt.model import GPT, GPTConfig
from glassgpt.run import open_run
from glassgpt.trace import influence as inf
from glassgpt.trace import influence_cli as cli
from glassgpt.trace.influence_query import all_windows_scores, explain
from glassgpt.trace.influence_store import load_store, open_store, training_windows

TEXT, OUTPUT = "First Citizen:\nBefore we", " proceed any further"


def build(out: Path, *extra: str) -> None:
    assert cli.main([f"--out_dir={out}", "--build", "--progress=False", *extra]) is None


@pytest.fixture
def built(char_checkpoint: Path) -> Path:
    build(char_checkpoint)
    return char_checkpoint


def test_windows_tile_every_prediction_once(char_checkpoint):
    run = open_run(char_checkpoint)
    spans = training_windows(run.corpus, "train", 32)
    preds = np.zeros(len(run.corpus.tokens("train")), int)
    for _, s, e in spans:
        assert 2 <= e - s <= 33
        preds[s + 1:e] += 1  # the tokens this window's targets are
    assert (preds[1:] == 1).all() and preds[0] == 0


def test_store_scores_equal_the_library_api_and_breakdowns_sum_to_them(built):
    run = open_run(built)
    store = open_store(run)
    ids = run.tokenizer.encode(TEXT + OUTPUT)
    p = len(run.tokenizer.encode(TEXT))
    every = all_windows_scores(run, store, ids, p)
    w = store.windows
    full = np.flatnonzero(w[:, 2] - w[:, 1] == 33)
    toks = run.corpus.tokens("train")
    windows = torch.tensor(np.stack([toks[w[i, 1]:w[i, 2]] for i in full]).astype(np.int64))
    api = inf.influence_scores(run.model, store.factors, windows, ids, p)
    np.testing.assert_allclose(every[full], api, rtol=1e-4, atol=1e-6 * np.abs(api).max())
    r = explain(run, store, ids, p, k=3, recall=len(store))
    for win in r["proponents"] + r["opponents"]:
        assert win["score"] == pytest.approx(every[win["window"]], rel=1e-4)  # other batches: float32 sums
        assert sum(s for _, s in win["pieces"]) == pytest.approx(win["score"], rel=1e-4, abs=1e-6)
        assert sum(win["query_scores"]) == pytest.approx(win["score"], rel=1e-3, abs=1e-6)
        assert "".join(t for t, _ in win["pieces"]) == win["text"]
    assert r["proponents"][0]["score"] == pytest.approx(every.max(), rel=1e-4)
    assert r["opponents"][0]["score"] == pytest.approx(every.min(), rel=1e-4)


def test_candidates_find_the_exhaustive_top_windows(built):
    run = open_run(built)
    store = open_store(run)
    ids = run.tokenizer.encode(TEXT + OUTPUT)
    ex = explain(run, store, ids, 5, k=3, exhaustive=True)
    fast = explain(run, store, ids, 5, k=3, recall=8, bm25=8)
    assert fast["n_candidates"] < len(store) and ex["n_candidates"] == len(store)
    top_ex = {w["window"] for w in ex["proponents"]}
    assert top_ex & {w["window"] for w in fast["proponents"]}, "no exhaustive top-3 window among the candidates'"


def test_json_is_what_explain_returns_and_text_output_split(built, capsys):
    r = cli.main([f"--out_dir={built}", f"--text={TEXT}", f"--output={OUTPUT}", "--json", "--k=2"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(r))
    assert "".join(r["tokens"][r["prompt_tokens"]:]) == OUTPUT and r["prompt"] == TEXT
    cli.main([f"--out_dir={built}", f"--text={TEXT}", f"--output={OUTPUT}", "--k=2"])
    out = capsys.readouterr().out
    assert "proponents:" in out and "nats" in out and "[[" in out


def test_start_traces_exactly_what_sample_generates(built):
    from glassgpt.sampling import complete

    run = open_run(built)
    r = cli.main([f"--out_dir={built}", "--start=All:", "--max_new_tokens=12", "--seed=7", "--json"])
    want = complete(run.model, run.tokenizer, "All:", 12, temperature=0.8, top_k=200, seed=7).text
    assert r["generated"] == want and "".join(r["tokens"][r["prompt_tokens"]:]) == want


def test_stale_store_is_refused_then_used_only_when_asked(built, char_dataset, capsys):
    make_checkpoint(built, char_dataset, seed=1)  # new weights: the store is stale
    assert run_main(cli.main, [f"--out_dir={built}", f"--text={TEXT}"]) == 2
    err = capsys.readouterr().err
    assert "stale" in err and "glassgpt trace-influence --out_dir=" in err and "--build" in err
    assert len(err.strip().splitlines()) == 1
    r = cli.main([f"--out_dir={built}", f"--text={TEXT}", "--allow_stale", "--json"])
    assert r["stale"] and "STALE" in capsys.readouterr().err


@pytest.mark.parametrize("args,msg", [
    ([], "no influence store"),
    (["--text="], "empty"),
    (["--text=ab", "--start=x"], "not both"),
    (["--output=x"], "pass --text"),
    (["--build=True", "--text=F"], "at least 2 tokens"),
    (["--build=True", "--text=F", "--output="], "--output is empty"),
    (["--build=True", "--text=F", "--output=\u2603"], "never saw"),
    (["--build=True", "--text=F", "--damping=-1"], "must be > 0"),
])
def test_bad_input_is_one_line(char_checkpoint, capsys, args, msg):
    argv = [f"--out_dir={char_checkpoint}", "--progress=False", *(args or [f"--text={TEXT}"])]
    assert run_main(cli.main, argv) == 2
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if not ln.startswith("built ")]
    assert len(err) == 1 and msg in err[0], err


def test_damping_at_query_time_changes_the_exact_scores(built):
    base = cli.main([f"--out_dir={built}", f"--text={TEXT}", f"--output={OUTPUT}", "--json", "--exhaustive"])
    more = cli.main([f"--out_dir={built}", f"--text={TEXT}", f"--output={OUTPUT}", "--json", "--exhaustive",
                     "--damping=10"])
    assert base["damping"] == 0.1 and more["damping"] == 10
    a, b = base["proponents"][0]["score"], more["proponents"][0]["score"]
    assert abs(b) < abs(a), "more damping, smaller H^-1: the scores shrink"


def test_bad_k_and_damaged_store(built, capsys):
    assert run_main(cli.main, [f"--out_dir={built}", f"--text={TEXT}", "--k=0"]) == 2
    assert "k=0 is out of range" in capsys.readouterr().err
    (built / "influence_train" / "vectors.npy").write_bytes(b"\x93NUMPY garbage")
    assert run_main(cli.main, [f"--out_dir={built}", f"--text={TEXT}"]) == 2
    err = capsys.readouterr().err
    assert "vectors.npy" in err and "--build" in err


def test_torchrun_build_equals_one_process(char_checkpoint, tmp_path):
    # fit on a sample (30 of the 39 full windows): its labels must not depend on the sharding
    build(char_checkpoint, f"--store_dir={tmp_path / 'one'}", "--fit_windows=30")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(REPO / "glassgpt/trace/influence_cli.py"), f"--out_dir={char_checkpoint}", "--build",
                        "--progress=False", "--fit_windows=30", f"--store_dir={tmp_path / 'two'}"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = load_store(tmp_path / "one"), load_store(tmp_path / "two")
    np.testing.assert_array_equal(one.windows, two.windows)
    assert two.meta["world_size"] == 2 and one.meta["built_from"] == two.meta["built_from"]
    # the all-reduced sums differ from one process's in the last bits, so eigenvectors of nearly equal
    # eigenvalues may turn within their subspace: compare what the factors do, H^-1 v, not the bases
    gen = torch.Generator().manual_seed(0)
    v = [torch.randn(lam.shape, generator=gen) for lam in one.factors.lambdas]
    for a, b in zip(inf.ihvp(one.factors, v), inf.ihvp(two.factors, v), strict=True):
        torch.testing.assert_close(a, b, atol=1e-3 * float(a.abs().max()), rtol=1e-2)
    diff = np.abs(np.asarray(one.vectors, np.float32) - np.asarray(two.vectors, np.float32)).max()
    print(f"2 ranks vs 1 process: max |recall vector diff| {diff:.2e}")
    assert diff < 2e-3


def test_bpe_data_leaves_the_large_head_out(tmp_path, mirror):
    from glassgpt.prepare import main as prepare_main

    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(
        ["The cat sat on the mat and looked at the dog.", "A dog ran in the park with a red ball.",
         "The mat was red, and the cat was black."] * 3)))
    data = tmp_path / "bpe"
    prepare_main(["corpus", f"--input={src}", f"--out_dir={data}", f"--vocab_dir={mirror / 'gpt2'}", "--num_proc=1",
                  "--val_fraction=0.2"])
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=16, vocab_size=50304, n_layer=1, n_head=2, n_embd=16, bias=False, rope=True)
    save_checkpoint(tmp_path / "out" / "ckpt.pt", {"model": GPT(cfg).state_dict(), "optimizer": {},
                    "model_args": cfg.to_dict(), "iter_num": 0, "config": {"data_dir": str(data)}})
    build(tmp_path / "out")
    store = load_store(tmp_path / "out" / "influence_train")
    assert "lm_head" not in store.factors.layers and len(store.factors.layers) == 4
    r = cli.main([f"--out_dir={tmp_path / 'out'}", "--text=The cat", "--output= sat on the mat", "--json"])
    assert r["proponents"] or r["opponents"]
    assert "".join(r["tokens"]) == "The cat sat on the mat"
