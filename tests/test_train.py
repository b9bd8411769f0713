"""Training loop: a few steps on a 2-layer model, exact resume, checkpoints, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from glassgpt.checkpoint import load_checkpoint, save_checkpoint
from glassgpt.config import TrainConfig, load_config
from glassgpt.errors import UserError
from glassgpt.train import get_lr, train

REPO = Path(__file__).resolve().parents[1]


def tiny_cfg(data_dir: Path, out_dir: Path, **kw) -> TrainConfig:
    base = dict(out_dir=str(out_dir), data_dir=str(data_dir), dataset=data_dir.name, device="cpu", compile=False,
                n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=4, gradient_accumulation_steps=2,
                max_iters=3, lr_decay_iters=20, warmup_iters=2, eval_interval=2, eval_iters=2, log_interval=1,
                learning_rate=1e-3, plot=False, dropout=0.0)
    base.update(kw)
    return TrainConfig(**base)


def losses(result: dict) -> list[tuple[int, float]]:
    return [(r["iter"], r["loss"]) for r in result["log"] if "loss" in r]


def test_three_steps_learn_and_checkpoint(char_dataset, tmp_path):
    out = tmp_path / "out"
    res = train(tiny_cfg(char_dataset, out, max_iters=3, plot=True))
    assert res["iter_num"] == 3
    assert len(losses(res)) == 3
    ck = load_checkpoint(out)
    assert set(ck) >= {"model", "model_args", "iter_num", "best_val_loss", "config"}
    assert "optimizer" not in ck, "sampling/eval/traces read the weights only"
    assert ck["iter_num"] == 3 and ck["model_args"]["n_layer"] == 2
    assert set(load_checkpoint(out, with_optimizer=True)["optimizer"]) >= {"state", "param_groups"}
    side = json.loads((out / "ckpt.json").read_text())
    assert side["config"]["n_embd"] == 32 and side["iter_num"] == 3
    assert (out / "loss.png").stat().st_size > 1000


def test_training_reduces_loss(char_dataset, tmp_path):
    res = train(tiny_cfg(char_dataset, tmp_path / "o", max_iters=60, eval_interval=60, eval_iters=4,
                         learning_rate=3e-3, lr_decay_iters=60))
    first, last = losses(res)[0][1], sum(l for _, l in losses(res)[-5:]) / 5
    assert last < first - 1.0, (first, last)


def test_resume_is_exact(char_dataset, tmp_path):
    """N iterations straight == N/2, stop, resume to N: identical losses (RNG + sampler state saved)."""
    kw = dict(max_iters=8, eval_interval=4, always_save_checkpoint=True, dropout=0.1)
    straight = train(tiny_cfg(char_dataset, tmp_path / "a", **kw))
    half = train(tiny_cfg(char_dataset, tmp_path / "b", **{**kw, "max_iters": 4}))
    resumed = train(tiny_cfg(char_dataset, tmp_path / "b", **{**kw, "init_from": "resume"}))
    got = losses(half) + losses(resumed)
    want = losses(straight)
    assert [i for i, _ in got] == [i for i, _ in want]
    diff = max(abs(a - b) for (_, a), (_, b) in zip(got, want))
    assert diff == 0.0, f"max loss difference after resume: {diff}"


def test_lr_schedule_warmup_cosine_floor():
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=110)
    assert get_lr(0, cfg) == pytest.approx(1 / 11)
    assert get_lr(10, cfg) == pytest.approx(1.0)
    assert get_lr(60, cfg) == pytest.approx(0.55)
    assert get_lr(110, cfg) == pytest.approx(0.1)
    assert get_lr(500, cfg) == 0.1
    cfg.decay_lr = False
    assert get_lr(5, cfg) == 1.0


def test_nan_loss_stops_and_keeps_last_checkpoint(char_dataset, tmp_path, monkeypatch):
    out = tmp_path / "out"
    train(tiny_cfg(char_dataset, out, max_iters=2, always_save_checkpoint=True))
    before = (out / "ckpt.pt").read_bytes()
    import glassgpt.model as model_mod

    real = model_mod.GPT.forward

    def poisoned(self, idx, targets=None):
        logits, loss = real(self, idx, targets)
        return logits, (loss * float("nan") if loss is not None else None)

    monkeypatch.setattr(model_mod.GPT, "forward", poisoned)
    with pytest.raises(UserError, match=r"loss became nan at iteration 2; .*ckpt.pt \(iter 2\) is kept"):
        train(tiny_cfg(char_dataset, out, init_from="resume", max_iters=4, always_save_checkpoint=True))
    assert (out / "ckpt.pt").read_bytes() == before


def test_atomic_checkpoint_survives_crash_mid_write(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    good = {"model": {"w": torch.ones(3)}, "model_args": {}, "iter_num": 1}
    save_checkpoint(path, good)

    def crash(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises((OSError, UserError)):  # raw, or one line (artifacts.py decides by errno)
        save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "model_args": {}, "iter_num": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["iter_num"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt")]


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "config").glob("*.py")))
def test_every_shipped_config_loads(name):
    cfg = load_config(TrainConfig, [str(REPO / "config" / name)])
    assert isinstance(cfg.learning_rate, float) and isinstance(cfg.batch_size, int)


def test_config_overrides_and_types(tmp_path):
    cfg = load_config(TrainConfig, [str(REPO / "config/train_shakespeare_char.py"), "--batch_size=12",
                                    "--learning_rate=1", "--device=cpu", "--compile=False", "--data_dir=None"])
    assert cfg.batch_size == 12 and cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
    assert cfg.compile is False and cfg.data_dir is None and cfg.n_layer == 6
    with pytest.raises(UserError, match="unknown config key 'batchsize'; did you mean batch_size"):
        load_config(TrainConfig, ["--batchsize=3"])
    with pytest.raises(UserError, match="batch_size must be int, got str 'big'"):
        load_config(TrainConfig, ["--batch_size=big"])
    with pytest.raises(UserError, match="max_iters must be int, got float"):
        load_config(TrainConfig, ["--max_iters=1.5"])
    with pytest.raises(UserError, match="cannot be None"):
        load_config(TrainConfig, ["--batch_size=None"])
    bad = tmp_path / "bad.py"
    bad.write_text("n_layers = 3\n")
    with pytest.raises(UserError, match=r"config file .*bad.py: unknown config key 'n_layers'; did you mean n_layer"):
        load_config(TrainConfig, [str(bad)])
    with pytest.raises(UserError, match="does not exist"):
        load_config(TrainConfig, [str(tmp_path / "nope.py")])


def test_dataset_not_prepared(tmp_path):
    with pytest.raises(UserError, match=r"dataset 'nothing' is not prepared .*python data/nothing/prepare.py"):
        train(tiny_cfg(tmp_path / "nothing", tmp_path / "out"))


def test_block_size_larger_than_checkpoint(char_dataset, tmp_path):
    out = tmp_path / "out"
    train(tiny_cfg(char_dataset, out, max_iters=2))
    with pytest.raises(UserError, match="block_size=32 is larger than the checkpoint's 16; .*extend-context"):
        train(tiny_cfg(char_dataset, out, init_from="resume", block_size=32, max_iters=4))


def test_corrupt_and_foreign_checkpoints(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "ckpt.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_checkpoint(tmp_path / "a")
    save_checkpoint(tmp_path / "b" / "ckpt.pt", {"model": {"w": torch.ones(2)}, "model_args": {}})
    data = (tmp_path / "b" / "ckpt.pt").read_bytes()
    (tmp_path / "b" / "ckpt.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt"):
        load_checkpoint(tmp_path / "b")
    torch.save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "c.pt")
    with pytest.raises(UserError, match="not a glassgpt/nanoGPT checkpoint"):
        load_checkpoint(tmp_path / "c.pt")


def test_out_dir_not_writable_as_file(char_dataset, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="is not writable"):
        train(tiny_cfg(char_dataset, blocker / "out"))


def test_cli_bad_key_is_one_line_and_exit_2(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "train.py"), "--lerning_rate=1"], capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: argument --lerning_rate=1: unknown config key 'lerning_rate'; did you mean learning_rate?"


def test_resume_from_nanogpt_written_checkpoint(char_dataset, tmp_path):
    """A ckpt.pt as nanoGPT's train.py writes it (compiled-model prefixes, no glassgpt keys) resumes."""
    from glassgpt.model import GPT, GPTConfig

    out = tmp_path / "nano"
    out.mkdir()
    model_args = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, bias=False, vocab_size=65, dropout=0.0)
    model = GPT(GPTConfig(**model_args))
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    sd = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    torch.save({"model": sd, "optimizer": opt.state_dict(), "model_args": model_args, "iter_num": 2,
                "best_val_loss": torch.tensor(4.0).item(), "config": {"dataset": "tiny_char", "batch_size": 4}},
               out / "ckpt.pt")
    res = train(tiny_cfg(char_dataset, out, init_from="resume", max_iters=4))
    assert res["iter_num"] == 4 and [i for i, _ in losses(res)] == [2, 3]
