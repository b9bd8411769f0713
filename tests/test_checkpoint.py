"""Checkpoints keep the optimizer state in a file of its own, and the pair is one checkpoint."""

from __future__ import annotations

import torch

import glassgpt.checkpoint as checkpoint
from glassgpt.checkpoint import load_checkpoint, save_checkpoint
from glassgpt.errors import UserError
from glassgpt.train import train
from tests.test_train import losses, tiny_cfg


def _files(out):
    return sorted(p.name for p in out.iterdir() if p.name.startswith("ckpt"))


def test_weights_and_optimizer_are_two_files_named_as_one_pair(char_dataset, tmp_path):
    out = tmp_path / "o"
    train(tiny_cfg(char_dataset, out, max_iters=4, eval_interval=2, always_save_checkpoint=True))
    optim_files = [f for f in _files(out) if ".optim." in f]
    assert len(optim_files) == 1, _files(out)  # earlier saves' optimizer files were removed
    raw = torch.load(out / "ckpt.pt", weights_only=True)
    assert "optimizer" not in raw and raw["optimizer_file"] == optim_files[0]
    assert set(load_checkpoint(out, with_optimizer=True)["optimizer"]) >= {"state", "param_groups"}


def test_a_kill_between_the_two_writes_leaves_the_old_pair(char_dataset, tmp_path, monkeypatch):
    """The optimizer file is written first under a new name; a kill before ckpt.pt's rename leaves the
    previous ckpt.pt naming its own (still present) optimizer file, and the run resumes from it exactly."""
    out, ref = tmp_path / "o", tmp_path / "ref"
    kw = dict(eval_interval=2, always_save_checkpoint=True)
    train(tiny_cfg(char_dataset, out, max_iters=2, **kw))
    before = {f: (out / f).read_bytes() for f in _files(out) if f != "ckpt.json"}

    real = checkpoint.write_file_atomic

    def killed_at_ckpt_pt(path, data):
        if path.name == "ckpt.pt":
            raise KeyboardInterrupt("killed")  # after the optimizer file was written
        return real(path, data)

    monkeypatch.setattr(checkpoint, "write_file_atomic", killed_at_ckpt_pt)
    try:
        train(tiny_cfg(char_dataset, out, max_iters=4, init_from="resume", **kw))
    except KeyboardInterrupt:
        pass
    monkeypatch.setattr(checkpoint, "write_file_atomic", real)
    assert {f: (out / f).read_bytes() for f in before} == before  # the old pair is intact
    assert len([f for f in _files(out) if ".optim." in f]) == 2  # plus the orphan of the killed save
    # resuming from the old pair gives exactly the run that was never interrupted
    train(tiny_cfg(char_dataset, ref, max_iters=2, **kw))
    straight = train(tiny_cfg(char_dataset, ref, max_iters=6, init_from="resume", **kw))
    resumed = train(tiny_cfg(char_dataset, out, max_iters=6, init_from="resume", **kw))
    assert losses(resumed) == losses(straight)
    assert len([f for f in _files(out) if ".optim." in f]) == 1  # the next save cleaned the orphan


def test_a_single_file_checkpoint_still_loads_and_resumes(char_dataset, tmp_path):
    """Checkpoints written before the split (and nanoGPT's) keep the optimizer inside ckpt.pt."""
    out = tmp_path / "o"
    train(tiny_cfg(char_dataset, out, max_iters=2, eval_interval=2, always_save_checkpoint=True))
    ck = load_checkpoint(out, with_optimizer=True)
    ck.pop("optimizer_file")
    for f in out.glob("ckpt.optim.*.pt"):
        f.unlink()
    torch.save(ck, out / "ckpt.pt")  # the old layout: one file, optimizer inside
    assert "optimizer" not in load_checkpoint(out)
    assert "state" in load_checkpoint(out, with_optimizer=True)["optimizer"]
    res = train(tiny_cfg(char_dataset, out, max_iters=4, eval_interval=2, always_save_checkpoint=True,
                         init_from="resume"))
    assert [i for i, _ in losses(res)] == [2, 3]
    assert "optimizer" not in torch.load(out / "ckpt.pt", weights_only=True)  # rewritten in the new layout


def test_a_missing_optimizer_file_is_one_line_on_resume_only(char_dataset, tmp_path):
    out = tmp_path / "o"
    train(tiny_cfg(char_dataset, out, max_iters=2, eval_interval=2, always_save_checkpoint=True))
    for f in out.glob("ckpt.optim.*.pt"):
        f.unlink()
    assert "model" in load_checkpoint(out)  # sampling and traces need only the weights
    try:
        load_checkpoint(out, with_optimizer=True)
    except UserError as e:
        assert "is missing" in str(e) and "\n" not in str(e)
    else:
        raise AssertionError("resuming without the optimizer file must be refused")


def test_save_without_optimizer_writes_one_file(tmp_path, char_dataset):
    from tests.conftest import make_checkpoint

    path = make_checkpoint(tmp_path / "m", char_dataset)
    ck = load_checkpoint(path)
    save_checkpoint(path, ck)
    assert not list(path.parent.glob("ckpt.optim.*.pt"))
