"""Training's quieter promises: the caller's config is left alone, every rank knows the last checkpoint
without reading rank 0's files, a rank reads only the eval batches it scores, a split stays uint16 on
disk (memmapped), and a disk that fills during a checkpoint write is one line with the old file intact."""

from __future__ import annotations

import copy
import errno
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from glassgpt import distributed
from glassgpt.checkpoint import load_checkpoint, save_checkpoint
from glassgpt.data import BatchSampler
from glassgpt.errors import UserError
from glassgpt.train import estimate_loss, train
from tests.test_train import tiny_cfg


def test_train_leaves_the_callers_config_alone(tmp_path):
    """A pretrained model fixes block_size: the job uses the model's 16, the caller's cfg still says 64."""
    from tests.conftest import TINY_TEXT
    from tests.test_pretrained import make_bpe_dataset, make_hf_model, save_hf

    hf_dir = save_hf(make_hf_model(1, 2, 16, 16, 50257, "gelu_new"), tmp_path / "tiny_gpt2")
    data = make_bpe_dataset(tmp_path / "data" / "bpe", TINY_TEXT)
    cfg = tiny_cfg(data, tmp_path / "out", init_from=str(hf_dir), block_size=64, max_iters=1, batch_size=2)
    before = copy.deepcopy(cfg)
    res = train(cfg)
    assert load_checkpoint(tmp_path / "out")["model_args"]["block_size"] == 16 and res["iter_num"] == 1
    assert cfg == before, {k: (v, getattr(cfg, k)) for k, v in vars(before).items() if getattr(cfg, k) != v}


def test_nonfinite_names_the_checkpoint_without_reading_ckpt_json(char_dataset, tmp_path, monkeypatch):
    """Only rank 0 writes ckpt.json; a rank on another node has no such file, yet says the same line."""
    out = tmp_path / "out"
    train(tiny_cfg(char_dataset, out, max_iters=2, always_save_checkpoint=True))
    (out / "ckpt.json").unlink()  # what a rank whose node does not share out_dir sees
    import glassgpt.model as model_mod

    real = model_mod.GPT.forward

    def poisoned(self, idx, targets=None):
        logits, loss = real(self, idx, targets)
        return logits, (loss * float("nan") if loss is not None else None)

    monkeypatch.setattr(model_mod.GPT, "forward", poisoned)
    with pytest.raises(UserError, match=r"loss became nan at iteration 2; .*ckpt.pt \(iter 2\) is kept"):
        train(tiny_cfg(char_dataset, out, init_from="resume", max_iters=4, always_save_checkpoint=True))


class CountingSampler(BatchSampler):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.built: list[torch.Tensor] = []

    def batch_at(self, split, ix):
        self.built.append(ix.clone())
        return super().batch_at(split, ix)


class SumModel(torch.nn.Module):
    """loss = mean token id of the batch: which batches a rank scored shows in the number."""

    def forward(self, x, y):
        return None, y.double().mean()


@pytest.mark.parametrize("eval_iters", [5, 6, 1])
def test_each_rank_reads_only_the_eval_batches_it_scores(char_dataset, eval_iters):
    """Two ranks simulated one after the other: each builds only its own batches, and together they
    score exactly the batches one process scores (the same mean)."""
    one = CountingSampler(char_dataset, 8, 3, "cpu", seed=1)
    ref = estimate_loss(SumModel(), one, eval_iters, torch.autocast("cpu", enabled=False))
    assert len(one.built) == 2 * eval_iters
    per_rank = []
    for rank in (0, 1):
        s = CountingSampler(char_dataset, 8, 3, "cpu", seed=1, rank=rank)
        info = distributed.DistInfo(enabled=False, rank=rank, world_size=2)
        losses = estimate_loss(SumModel(), s, eval_iters, torch.autocast("cpu", enabled=False), info)
        per_rank.append((s.built, losses))
        assert len(s.built) == 2 * -(-eval_iters // 2), (rank, len(s.built))  # its own share, not every batch
    # the val batches rank 0 and rank 1 built, interleaved, are the single process's (pad batches aside)
    half = -(-eval_iters // 2)
    val0, val1 = per_rank[0][0][half:], per_rank[1][0][half:]
    merged = [b for pair in zip(val0, val1, strict=True) for b in pair][:eval_iters]
    for got, want in zip(merged, one.built[eval_iters:], strict=True):
        torch.testing.assert_close(got, want)
    assert ref["val"] > 0


def test_split_stays_uint16_memmapped_and_batches_match_the_file(char_dataset):
    s = BatchSampler(char_dataset, 8, 4, "cpu", seed=0)
    tokens = np.fromfile(char_dataset / "train.bin", dtype=np.uint16)
    for split in ("train", "val"):
        assert isinstance(s.data[split], np.memmap) and s.data[split].dtype == np.uint16, type(s.data[split])
    gen = torch.Generator().manual_seed(3)
    ix = s.draw("train", gen)
    x, y = s.batch_at("train", ix)
    assert x.dtype == torch.int64 and x.shape == (4, 8)
    for row, i in enumerate(ix.tolist()):
        assert x[row].tolist() == tokens[i:i + 8].tolist() and y[row].tolist() == tokens[i + 1:i + 9].tolist()
    gen2 = torch.Generator().manual_seed(3)
    torch.testing.assert_close(s.get_batch("train", gen2)[0], x)  # get_batch = draw + batch_at


def _ckpt(value: float) -> dict:
    return {"model": {"w": torch.full((4096,), value)}, "model_args": {}, "iter_num": int(value)}


def test_disk_full_inside_torch_zip_writer_is_one_line(tmp_path, monkeypatch):
    """torch.save's zip writer turns the disk's ENOSPC into "RuntimeError: ... unexpected pos"; the user
    sees the disk-full line and the old checkpoint still loads."""
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, _ckpt(1.0))
    real_save = torch.save

    def zip_writer_on_full_disk(obj, f, *a, **k):
        f.write(b"PK partial")
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:  # what the C++ writer does with Python's write error: a RuntimeError in its place
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None

    monkeypatch.setattr(torch, "save", zip_writer_on_full_disk)
    with pytest.raises(UserError, match=r"could not write .*ckpt.pt \(the disk is full\); the previous version"):
        save_checkpoint(path, _ckpt(2.0))
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(path)["iter_num"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.json", "ckpt.pt"]

    def other_bug(obj, f, *a, **k):
        raise RuntimeError("a bug, not a disk")

    monkeypatch.setattr(torch, "save", other_bug)
    with pytest.raises(RuntimeError, match="a bug"):  # internal errors still raise
        save_checkpoint(path, _ckpt(3.0))


def _mount_tiny_tmpfs(where: Path) -> bool:
    where.mkdir()
    if os.geteuid() != 0:
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(where)], capture_output=True)
    return r.returncode == 0


def test_disk_full_on_a_real_tiny_filesystem(tmp_path):
    """The same on a 96 KiB tmpfs (needs root to mount; the monkeypatched test above runs everywhere)."""
    fs = tmp_path / "tiny"
    if not _mount_tiny_tmpfs(fs):
        pytest.skip("cannot mount a tmpfs here (needs root); test_disk_full_inside_torch_zip_writer covers the path")
    try:
        path = fs / "ckpt.pt"
        save_checkpoint(path, {"model": {"w": torch.ones(1000)}, "model_args": {}, "iter_num": 1})
        with pytest.raises(UserError, match=r"\(the disk is full\); the previous version is unchanged"):
            save_checkpoint(path, {"model": {"w": torch.zeros(100_000)}, "model_args": {}, "iter_num": 2})
        assert load_checkpoint(path)["iter_num"] == 1
        assert json.loads((fs / "ckpt.json").read_text())["iter_num"] == 1
        assert sorted(p.name for p in fs.iterdir()) == ["ckpt.json", "ckpt.pt"]
    finally:
        subprocess.run(["umount", str(fs)], check=False)


def test_training_after_inference_in_the_same_process():
    """The CPU bf16 attention path caches its causal mask: one first made under inference_mode (a trace,
    a kNN build) must not break a later training step in the same process (the README test found it)."""
    from glassgpt.model import GPT, GPTConfig, _causal

    _causal.cache_clear()
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=11, dropout=0.0))
    x = torch.randint(0, 11, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.inference_mode():
            model(x)
        _, loss = model(x, x)
    loss.backward()  # raised "Inference tensors cannot be saved for backward" with the mask cached above
    assert model.lm_head.weight.grad is not None
