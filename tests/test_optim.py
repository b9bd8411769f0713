"""Optimizers and schedules (glassgpt/optim.py) and the training-loop pieces around them."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from torch import nn

from glassgpt.checkpoint import load_checkpoint
from glassgpt.config import TrainConfig, load_config
from glassgpt.errors import UserError
from glassgpt.model import GPT, GPTConfig
from glassgpt.optim import build_optimizers, check_options, get_lr, split_params
from glassgpt.train import train
from tests.test_train import losses, tiny_cfg

MODERN = dict(optimizer="muon", muon_lr=0.02, rope=True, qk_norm=True, activation="relu2", lr_schedule="wsd",
              decay_frac=0.5)


def test_muon_gets_exactly_the_block_matrices():
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=11, bias=True))
    groups = split_params(model, muon=True)
    names = {id(p): n for n, p in model.named_parameters()}
    hidden = sorted(names[id(p)] for p in groups["hidden"])
    assert hidden == sorted(n for n, p in model.named_parameters() if p.dim() == 2 and ".h." in n)
    assert sorted(names[id(p)] for p in groups["embed"]) == ["transformer.wpe.weight", "transformer.wte.weight"]
    every = [id(p) for g in groups.values() for p in g]
    assert sorted(every) == sorted(id(p) for p in model.parameters())  # each parameter once
    opt = build_optimizers(model, TrainConfig(optimizer="muon"), "cpu")
    assert isinstance(opt.by_name["muon"], torch.optim.Muon)
    assert [g["name"] for g in opt.param_groups] == ["hidden", "embed", "vector"]
    plain = build_optimizers(model, TrainConfig(), "cpu")  # nanoGPT's: one AdamW, its own state dict
    assert list(plain.by_name) == ["adamw"] and set(plain.state_dict()) == {"state", "param_groups"}


def test_wsd_schedule_shape():
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=100, lr_schedule="wsd",
                      decay_frac=0.2)
    assert get_lr(0, cfg) == pytest.approx(1 / 11)
    assert [get_lr(i, cfg) for i in (10, 50, 80)] == [1.0, 1.0, 1.0]  # stable until 80% of the way
    assert get_lr(90, cfg) == pytest.approx(0.55)  # linear from 1.0 at 80 to 0.1 at 100
    assert get_lr(100, cfg) == pytest.approx(0.1) and get_lr(500, cfg) == 0.1
    cos = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=100)
    assert get_lr(55, cos) == pytest.approx(0.55)  # cosine midpoint, unchanged default


def test_bad_choices_are_one_line():
    for argv, msg in [(["--optimizer=sgd"], "optimizer='sgd' is not one of adamw, muon"),
                      (["--lr_schedule=step"], "lr_schedule='step' is not one of cosine, wsd")]:
        with pytest.raises(UserError, match=msg):
            load_config(TrainConfig, argv)
    for kw, msg in [({"decay_frac": 1.5}, "decay_frac"), ({"optimizer": "muon", "parallel": "fsdp"}, "fsdp")]:
        with pytest.raises(UserError, match=msg):
            check_options(TrainConfig(**kw))


def test_muon_resume_is_exact(char_dataset, tmp_path):
    """N steps straight == N/2, stop, resume: identical losses and weights with Muon + the new options."""
    kw = dict(max_iters=8, eval_interval=4, always_save_checkpoint=True, dropout=0.1, **MODERN)
    straight = train(tiny_cfg(char_dataset, tmp_path / "a", **kw))
    train(tiny_cfg(char_dataset, tmp_path / "b", **{**kw, "max_iters": 4}))
    resumed = train(tiny_cfg(char_dataset, tmp_path / "b", **{**kw, "init_from": "resume"}))
    assert [i for i, _ in losses(resumed)] == [4, 5, 6, 7]
    torch.testing.assert_close(torch.tensor([l for _, l in losses(resumed)]),
                               torch.tensor([l for _, l in losses(straight)[4:]]), rtol=0, atol=0)
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0)
    assert set(load_checkpoint(tmp_path / "a", with_optimizer=True)["optimizer"]) == {"muon", "adamw"}


def test_grad_health_in_log(char_dataset, tmp_path):
    res = train(tiny_cfg(char_dataset, tmp_path / "o", max_iters=2, **MODERN))
    rec = [r for r in res["log"] if "loss" in r][0]
    for group in ("hidden", "embed", "vector"):
        assert rec[f"grad_norm/{group}"] > 0 and rec[f"update_norm/{group}"] > 0
    disk = [json.loads(line) for line in (tmp_path / "o" / "log.jsonl").read_text().splitlines()]
    assert "update_norm/hidden" in [r for r in disk if "loss" in r][0]
    # the group norms make up the global one (before clipping)
    total = sum(rec[f"grad_norm/{g}"] ** 2 for g in ("hidden", "embed", "vector")) ** 0.5
    assert abs(total - rec["grad_norm"]) < 1e-4 * total, (total, rec["grad_norm"])


def test_resume_cuts_the_log_back(char_dataset, tmp_path):
    """A run killed after logging past its last checkpoint: the resumed run's log has each iteration once."""
    out, saved = tmp_path / "o", tmp_path / "saved"
    kw = dict(eval_interval=4, always_save_checkpoint=True)
    train(tiny_cfg(char_dataset, out, max_iters=4, **kw))
    shutil.copytree(out, saved)
    train(tiny_cfg(char_dataset, out, max_iters=8, init_from="resume", **kw))  # logs 4..8
    for f in saved.glob("ckpt*"):  # ... then "crashed" before saving: back to the iter-4 checkpoint (all its files)
        shutil.copy(f, out / f.name)
    train(tiny_cfg(char_dataset, out, max_iters=8, init_from="resume", **kw))
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in recs if "loss" in r] == list(range(8))
    assert [r["iter"] for r in recs if "val_loss" in r] == [0, 4, 8]


def test_activation_with_gpt2_init_is_refused(char_dataset, tmp_path):
    with pytest.raises(UserError, match="--activation=relu2 cannot be used with init_from=gpt2"):
        train(tiny_cfg(char_dataset, tmp_path / "o", init_from="gpt2", activation="relu2"))
    with pytest.raises(UserError, match="--rope cannot be used with init_from=gpt2"):
        train(tiny_cfg(char_dataset, tmp_path / "o", init_from="gpt2", rope=True))


def test_thread_count_in_first_line(char_dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        train(tiny_cfg(char_dataset, tmp_path / "o", max_iters=1, threads=1))
    finally:
        torch.set_num_threads(before)
    first = capsys.readouterr().out.splitlines()[0]
    assert "1 thread," in first and "parameters" in first, first


@pytest.mark.slow
@pytest.mark.timeout(1800)  # inductor builds C++ kernels: minutes on a loaded 2-core CPU
def test_compile_on_cpu_matches_eager(char_dataset, tmp_path):
    t0 = time.time()
    eager = train(tiny_cfg(char_dataset, tmp_path / "e", max_iters=3))
    compiled = train(tiny_cfg(char_dataset, tmp_path / "c", max_iters=3, compile=True))
    print(f"compile=True: 3 steps + compile in {time.time() - t0:.1f} s")
    torch.testing.assert_close(torch.tensor([l for _, l in losses(compiled)]),
                               torch.tensor([l for _, l in losses(eager)]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("nesterov", [True, False])
def test_grouped_muon_matches_torch_muon(nesterov):
    """GroupedMuon (same-shape matrices orthogonalised in one batch) against torch.optim.Muon stepping
    each matrix alone: same updates up to bf16 rounding, interchangeable state dicts."""
    from glassgpt.optim import GroupedMuon

    gen = torch.Generator().manual_seed(0)
    shapes = [(48, 16), (16, 48), (48, 16), (16, 16), (16, 16), (32, 16), (16, 64)]  # tall, wide, repeats
    init = [torch.randn(s, generator=gen) * 0.1 for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(5)]
    runs = {}
    for cls in (torch.optim.Muon, GroupedMuon):
        ps = [nn.Parameter(w.clone()) for w in init]
        opt = cls(ps, lr=0.02, weight_decay=0.1, nesterov=nesterov)
        for step in grads:
            for p, g in zip(ps, step):
                p.grad = g.clone()
            opt.step()
        runs[cls] = ps, opt
    (ref, ref_opt), (got, got_opt) = runs.values()
    for r, g, w in zip(ref, got, init):
        moved = (r - w).abs().max().item()
        assert (g - r).abs().max().item() < 0.02 * moved, "GroupedMuon's update differs from torch.optim.Muon's"
    torch.testing.assert_close(got_opt.state_dict()["state"], ref_opt.state_dict()["state"], atol=1e-6, rtol=0)
    torch.optim.Muon(ref, lr=0.02).load_state_dict(got_opt.state_dict())  # the same format both ways
