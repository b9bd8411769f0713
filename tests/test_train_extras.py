"""Training extras: the batch-size ramp, network health, kept checkpoints and the overfitting warning."""

from __future__ import annotations

import json

import pytest
import torch

import glassgpt.train as train_mod
from glassgpt.checkpoint import load_checkpoint
from glassgpt.errors import UserError
from glassgpt.health import ClipStats, activation_norms, capture_activation_rms, weight_norms
from glassgpt.model import GPT, GPTConfig
from glassgpt.run import open_run
from glassgpt.schedule import build_ramp, iters_for_tokens
from glassgpt.train import train
from tests.test_train import tiny_cfg


def weights_equal(a: dict, b: dict) -> float:
    """Max absolute difference over two state dicts with the same keys (0.0 = bit-exact)."""
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# ------------------------------------------------------------------ batch-size ramp


def test_ramp_schedule_is_linear_in_whole_micro_batches():
    ramp = build_ramp(start_tokens=128, ramp_iters=10, grad_accum=6, batch_size=4, block_size=16, world_size=1)
    assert ramp is not None and ramp.unit_tokens == 64
    units = [ramp.units(i) for i in range(14)]
    assert units[0] == 2 and units[10:] == [6] * 4
    # the slow reference: round(start + (end - start) * i / R), half up
    assert units[:10] == [int(2 + 4 * i / 10 + 0.5) for i in range(10)]
    assert all(b >= a for a, b in zip(units, units[1:], strict=False))
    assert ramp.tokens_seen(13) == sum(ramp.tokens(i) for i in range(13))
    for budget in (1, 64, 999, 5000, 20000):  # the fewest iterations reaching the budget, by brute force
        want = next(n for n in range(1000) if sum(ramp.tokens(i) for i in range(n)) >= budget)
        assert iters_for_tokens(ramp, budget) == want
    # DDP: a unit is one micro-batch on each of the 2 processes
    ddp = build_ramp(start_tokens=256, ramp_iters=4, grad_accum=3, batch_size=4, block_size=16, world_size=2)
    assert ddp is not None and ddp.unit_tokens == 128 and ddp.micro_steps(0) == 2 and ddp.micro_steps(4) == 3
    assert build_ramp(0, 10, 6, 4, 16, 1) is None


def test_ramp_bad_settings_are_one_line():
    with pytest.raises(UserError, match="batch_ramp_start=9999 must be between"):
        build_ramp(9999, 10, 2, 4, 16, 1)
    with pytest.raises(UserError, match="batch_ramp_iters=0 must be positive"):
        build_ramp(64, 0, 2, 4, 16, 1)
    with pytest.raises(UserError, match="rounds to the final batch"):
        build_ramp(64, 10, 1, 4, 16, 1)


def test_ramp_first_step_equals_constant_batch_of_that_size(char_dataset, tmp_path):
    """The ramp only changes how many micro-batches a step accumulates: its first step (2 micro-batches)
    is bit-exactly a constant run with gradient_accumulation_steps=2."""
    ramped = train(tiny_cfg(char_dataset, tmp_path / "r", gradient_accumulation_steps=4, batch_ramp_start=128,
                            batch_ramp_iters=4, max_iters=1, eval_interval=100, always_save_checkpoint=True))
    const = train(tiny_cfg(char_dataset, tmp_path / "c", gradient_accumulation_steps=2, max_iters=1,
                           eval_interval=100, always_save_checkpoint=True))
    assert ramped["log"][1]["batch_tokens"] == 128 and "batch_tokens" not in const["log"][1]
    diff = weights_equal(load_checkpoint(tmp_path / "r")["model"], load_checkpoint(tmp_path / "c")["model"])
    assert diff == 0.0, f"max weight difference {diff}"


def test_ramp_resumes_bit_exact_mid_ramp(char_dataset, tmp_path):
    kw = dict(gradient_accumulation_steps=4, batch_ramp_start=64, batch_ramp_iters=6, max_iters=6, eval_interval=3,
              always_save_checkpoint=True, dropout=0.1)
    straight = train(tiny_cfg(char_dataset, tmp_path / "a", **kw))
    train(tiny_cfg(char_dataset, tmp_path / "b", **{**kw, "max_iters": 3}))
    resumed = train(tiny_cfg(char_dataset, tmp_path / "b", **{**kw, "init_from": "resume"}))
    tokens = [r["batch_tokens"] for r in straight["log"] if "loss" in r]
    assert tokens == [64, 128, 128, 192, 192, 256]  # 1 -> 4 micro-batches of 4 x 16, rounded half up
    assert [r["batch_tokens"] for r in resumed["log"] if "loss" in r] == tokens[3:]
    diff = weights_equal(load_checkpoint(tmp_path / "a")["model"], load_checkpoint(tmp_path / "b")["model"])
    assert diff == 0.0, f"max weight difference after resuming mid-ramp: {diff}"


# ------------------------------------------------------------------ health


def test_clip_stats_against_a_plain_count():
    norms = [0.5, 2.0, 4.0, 1.0, 8.0]
    stats = ClipStats(grad_clip=1.0)
    for n in norms[:3]:
        stats.update(torch.tensor(n))
    first = stats.read()
    assert first["clip_frac"] == pytest.approx(2 / 3)
    assert first["clip_scale"] == pytest.approx((1 / 2 + 1 / 4) / 2)
    for n in norms[3:]:
        stats.update(torch.tensor(n))
    assert stats.read() == {"clip_frac": pytest.approx(1 / 2), "clip_scale": pytest.approx(1 / 8)}
    assert stats.summary() == "gradient clipped (|g| > 1.0) on 3 of 5 steps (60%)"
    off = ClipStats(grad_clip=0.0)
    off.update(torch.tensor(9.0))
    assert off.read() == {} and off.summary() is None


def test_activation_norms_match_the_residual_stream_and_hooks_are_removed():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=3, n_head=2, n_embd=16, block_size=8, vocab_size=11)).train()
    x = torch.randint(0, 11, (2, 8))
    got = activation_norms(model, x, torch.autocast("cpu", enabled=False))
    assert model.training  # put back in training mode
    model.eval()
    with torch.no_grad():
        for layer in range(4):  # slow reference: the residual stream after `layer` blocks, from forward()
            want = model(x, stop_at_layer=layer).pow(2).mean().sqrt().item() if layer < 3 else None
            key = "act_rms/emb" if layer == 0 else f"act_rms/h.{layer - 1}"
            if want is not None:
                assert abs(got[key] - want) < 1e-6, (key, got[key], want)
    with pytest.raises(RuntimeError), capture_activation_rms(model):
        raise RuntimeError("boom")
    assert not any(m._forward_hooks for m in model.modules())
    w = weight_norms(model)
    ref = torch.cat([p.detach().flatten() for p in model.transformer.h[1].parameters()]).norm().item()
    assert abs(w["w_norm/h.1"] - ref) < 1e-4 and set(w) == {"w_norm/emb", "w_norm/h.0", "w_norm/h.1", "w_norm/h.2"}


def test_training_logs_health_and_plots_it(char_dataset, tmp_path, capsys):
    out = tmp_path / "out"
    res = train(tiny_cfg(char_dataset, out, max_iters=4, grad_clip=1e-3, plot=True))
    steps = [r for r in res["log"] if "loss" in r]
    for r in steps:  # every step clipped (grad_clip tiny), by exactly grad_clip / |g| (log_interval=1)
        assert r["clip_frac"] == 1.0
        assert abs(r["clip_scale"] - 1e-3 / r["grad_norm"]) < 1e-6 * r["clip_scale"]
        assert {"act_rms/emb", "act_rms/h.0", "act_rms/h.1", "w_norm/h.1"} <= set(r)
    assert "gradient clipped (|g| > 0.001) on 4 of 4 steps (100%)" in capsys.readouterr().out
    assert (out / "health.png").stat().st_size > 5000
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any("act_rms/h.1" in r for r in logged)
    off = train(tiny_cfg(char_dataset, tmp_path / "off", max_iters=2, health=False, grad_clip=0.0))
    assert not any(k.startswith(("act_rms", "clip_")) for r in off["log"] for k in r)


def test_health_probe_does_not_change_training(char_dataset, tmp_path):
    """The probe draws from its own generator and runs without grad: same weights with health off."""
    on = train(tiny_cfg(char_dataset, tmp_path / "on", max_iters=3, dropout=0.1, always_save_checkpoint=True))
    off = train(tiny_cfg(char_dataset, tmp_path / "off", max_iters=3, dropout=0.1, always_save_checkpoint=True,
                         health=False))
    assert [r["loss"] for r in on["log"] if "loss" in r] == [r["loss"] for r in off["log"] if "loss" in r]


# ------------------------------------------------------------------ kept checkpoints, overfitting


def test_keep_every_writes_periodic_checkpoints_that_commands_open(char_dataset, tmp_path):
    out = tmp_path / "out"
    train(tiny_cfg(char_dataset, out, max_iters=4, keep_every=2, eval_interval=100))
    assert (out / "ckpt-2.pt").exists() and (out / "ckpt-4.pt").exists() and (out / "ckpt-2.json").exists()
    two = load_checkpoint(out / "ckpt-2.pt")
    assert two["iter_num"] == 2 and not load_checkpoint(out / "ckpt-2.pt", with_optimizer=True).get("optimizer")
    assert not list(out.glob("ckpt-2.optim.*"))  # weights only: no optimizer file beside it
    # the reference: a run stopped after 2 iterations holds the same weights
    train(tiny_cfg(char_dataset, tmp_path / "ref", max_iters=2, eval_interval=100))
    diff = weights_equal(two["model"], load_checkpoint(tmp_path / "ref")["model"])
    assert diff == 0.0, f"max weight difference {diff}"
    run = open_run(out, ckpt_iter="2")
    assert run.iter_num == 2 and run.fingerprint == two["glassgpt_fingerprint"]
    assert open_run(out, ckpt_iter=4).iter_num == 4
    with pytest.raises(UserError, match=r"no checkpoint for --ckpt_iter=3 .*kept iterations: 2, 4"):
        open_run(out, ckpt_iter=3)
    with pytest.raises(UserError, match="must be an iteration number or 'best'"):
        open_run(out, ckpt_iter="last")


def test_keep_every_through_a_trace_command(char_dataset, tmp_path, capsys):
    from glassgpt.trace.spans import main as spans_main

    out = tmp_path / "out"
    train(tiny_cfg(char_dataset, out, max_iters=2, keep_every=1, eval_interval=100))
    spans_main([f"--out_dir={out}", "--ckpt_iter=1", "--build", "--start=First", "--max_new_tokens=20", "--min_len=4",
                f"--index_dir={tmp_path / 'idx'}"])
    assert "First" in capsys.readouterr().out
    with pytest.raises(UserError, match="kept iterations: 1, 2"):
        spans_main([f"--out_dir={out}", "--ckpt_iter=7", "--start=x", f"--index_dir={tmp_path / 'idx'}"])


def test_overfitting_warns_and_the_best_checkpoint_is_kept(char_dataset, tmp_path, monkeypatch, capsys):
    """Scripted evals: val falls to its best at iteration 2, then rises while train keeps falling."""
    script = iter([(3.0, 3.1), (2.0, 2.2), (1.5, 2.4), (1.0, 2.6)])  # (train, val) at iterations 0, 2, 4, 6

    def scripted(*_a, **_k):
        tr, va = next(script)
        return {"train": tr, "val": va}

    monkeypatch.setattr(train_mod, "estimate_loss", scripted)
    out = tmp_path / "out"
    train(tiny_cfg(char_dataset, out, max_iters=6, eval_interval=2, always_save_checkpoint=True))
    printed = capsys.readouterr().out
    assert "warning: val loss rose 2.2000 -> 2.4000 while train loss fell 2.0000 -> 1.5000" in printed
    assert f"best val loss 2.2000 (iteration 2) is kept in {out / 'ckpt-best.pt'}" in printed
    assert load_checkpoint(out / "ckpt-best.pt")["iter_num"] == 2
    assert load_checkpoint(out)["iter_num"] == 6  # ckpt.pt moved on (always_save_checkpoint)
    assert json.loads((out / "ckpt-best.json").read_text())["iter_num"] == 2
    assert open_run(out, ckpt_iter="best").iter_num == 2
    # resumed, the run improves again: ckpt.pt is the best once more and ckpt-best.pt goes away
    script = iter([(0.5, 2.0)])
    monkeypatch.setattr(train_mod, "estimate_loss", scripted)
    train(tiny_cfg(char_dataset, out, max_iters=8, eval_interval=8, init_from="resume", always_save_checkpoint=True))
    assert not (out / "ckpt-best.pt").exists() and load_checkpoint(out)["iter_num"] == 8


def test_overfitting_without_always_save_names_ckpt_pt(char_dataset, tmp_path, monkeypatch, capsys):
    script = iter([(3.0, 3.1), (2.0, 2.2), (1.5, 2.4)])
    monkeypatch.setattr(train_mod, "estimate_loss", lambda *a, **k: dict(zip(("train", "val"), next(script),
                                                                             strict=True)))
    out = tmp_path / "out"
    train(tiny_cfg(char_dataset, out, max_iters=4, eval_interval=2, always_save_checkpoint=False))
    assert f"(iteration 2) is kept in {out / 'ckpt.pt'}" in capsys.readouterr().out
    assert load_checkpoint(out)["iter_num"] == 2 and not (out / "ckpt-best.pt").exists()


def test_ramp_under_ddp_matches_one_process(tmp_path):
    """2 DDP processes ramping 1 -> 3 micro-steps each == 1 process ramping 2 -> 6 over the same
    micro-batches (rank 0's, then rank 1's, within each iteration); the ramp is chosen so both round
    alike (whole micro-steps at every iteration)."""
    from tests.conftest import make_char_dataset
    from tests.test_distributed import BASE, compare_logs, job_args, must_succeed, read_log, torchrun

    data = make_char_dataset(tmp_path / "data" / "tiny_char")
    ramp = dict(gradient_accumulation_steps=6, batch_ramp_start=128, batch_ramp_iters=2, max_iters=4)
    must_succeed(torchrun(job_args(data, tmp_path / "ddp", **ramp)))
    per_rank = [1, 2, 3, 3]  # micro-steps per process at iterations 0..3
    owners = [r for u in per_rank for r in (0, 1) for _ in range(u)]

    class RanksInOrder(train_mod.BatchSampler):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.gens = [torch.Generator().manual_seed(self.seed + r) for r in (0, 1)]
            self.micro = 0

        def get_batch(self, split, gen=None):
            if split == "train" and gen is None:
                gen, self.micro = self.gens[owners[self.micro]], self.micro + 1
            return super().get_batch(split, gen)

    mp = pytest.MonkeyPatch()
    mp.setattr(train_mod, "BatchSampler", RanksInOrder)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = train(train_mod.TrainConfig(**{**BASE, **ramp, "data_dir": str(data), "dataset": "tiny_char",
                                             "out_dir": str(tmp_path / "one")}))["log"]
    finally:
        torch.set_num_threads(threads)
        mp.undo()
    got = read_log(tmp_path / "ddp")
    assert [r["batch_tokens"] for r in got if "loss" in r] == [128, 256, 384, 384]
    assert [r["batch_tokens"] for r in ref if "loss" in r] == [128, 256, 384, 384]
    compare_logs(got, ref, "2-process DDP with a batch ramp")
