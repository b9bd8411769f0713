"""The private torch APIs glassgpt leans on, pinned: a torch that renames or reshapes one fails here,
loudly, instead of in the middle of someone's training run.

- optim.GroupedMuon calls torch.optim.Muon._init_group and torch.optim._muon._adjust_lr;
  optim.muon_class() falls back to torch.optim.Muon (same updates) where they differ.
- distributed's FusedSafeShardedGradScaler reads GradScaler._per_optimizer_states[id(opt)]["stage"]
  and ["found_inf_per_device"]; distributed.check_scaler_internals refuses to start where they differ.
"""

from __future__ import annotations

import pytest
import torch

from glassgpt import optim
from glassgpt.config import TrainConfig
from glassgpt.model import GPT, GPTConfig


def test_torch_floor_has_muon():
    """pyproject's floor is torch>=2.9: the first release with torch.optim.Muon, which optim.py subclasses."""
    major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    assert (major, minor) >= (2, 9) and hasattr(torch.optim, "Muon")


def test_muon_private_api_has_the_expected_signatures():
    missing = optim._private_api_missing(optim.PRIVATE_MUON_API)
    assert missing is None, f"torch {torch.__version__}: {missing}; update GroupedMuon.step and PRIVATE_MUON_API"
    assert optim.muon_class() is optim.GroupedMuon


def test_a_changed_private_api_falls_back_to_torch_muon(monkeypatch, capsys):
    def _adjust_lr(lr, fn, shape, extra):  # a future signature
        return lr

    monkeypatch.setattr(torch.optim._muon, "_adjust_lr", _adjust_lr)
    assert "_adjust_lr takes" in optim._private_api_missing(optim.PRIVATE_MUON_API)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=11))
    opts = optim.build_optimizers(model, TrainConfig(optimizer="muon"), "cpu")
    assert type(opts.by_name["muon"]) is torch.optim.Muon
    assert "using torch.optim.Muon" in capsys.readouterr().err
    monkeypatch.delattr(torch.optim._muon, "_adjust_lr")
    assert optim._private_api_missing(optim.PRIVATE_MUON_API) == "torch.optim._muon._adjust_lr is missing"


def test_grad_scaler_per_optimizer_state_layout():
    """What FusedSafeShardedGradScaler reads after unscale_: the stage and the found-inf flags per device."""
    from torch.amp.grad_scaler import OptState

    from glassgpt.distributed import check_scaler_internals

    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    check_scaler_internals(scaler)
    scaler.scale((w * 2).sum()).backward()
    state = scaler._per_optimizer_states[id(opt)]
    assert state["stage"].name == "READY"
    scaler.unscale_(opt)
    assert state["stage"] is OptState.UNSCALED
    flags = state["found_inf_per_device"]
    assert isinstance(flags, dict) and all(isinstance(t, torch.Tensor) for t in flags.values()), flags


def test_changed_scaler_internals_fail_at_start_up(monkeypatch):
    from glassgpt.distributed import check_scaler_internals

    scaler = torch.amp.GradScaler("cpu", enabled=True)
    monkeypatch.delattr(scaler, "_per_optimizer_states")
    with pytest.raises(RuntimeError, match="changed GradScaler's private _per_optimizer_states"):
        check_scaler_internals(scaler)
