"""Optimizers and learning-rate schedules for train.py.

`optimizer='adamw'` is nanoGPT's (decayed 2-D weights, undecayed gains and biases; the checkpoint's
"optimizer" entry is AdamW's own state dict, as nanoGPT writes it). `optimizer='muon'` puts the 2-D
matrices inside the transformer blocks under PyTorch's `torch.optim.Muon` (momentum orthogonalised by
Newton-Schulz, https://kellerjordan.github.io/posts/muon/) and everything else (embeddings, the head,
norm gains, biases) under AdamW, as modded-nanogpt and nanochat do. `GroupedMuon` is
torch.optim.Muon with one change: the Newton-Schulz iterations of same-shape matrices run batched
(3 bmm per iteration for all of them instead of 3 mm per matrix), which is what a small model's
Muon step spends its time on; its state dict, hyper-parameters and updates are torch.optim.Muon's
(tests/test_optim.py checks it against it).

Schedules: 'cosine' (nanoGPT's: linear warmup, cosine to min_lr at lr_decay_iters) and 'wsd'
(warmup-stable-decay: warmup, flat at the peak, linear decay to min_lr over the last `decay_frac` of
lr_decay_iters; https://arxiv.org/abs/2404.06395). One multiplier drives both optimizers, so Muon's
learning rate follows the same shape scaled to `muon_lr`.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
from collections import defaultdict
from typing import Any

import torch
from torch import nn

from glassgpt.config import TrainConfig
from glassgpt.errors import UserError
from glassgpt.param_groups import adamw, adamw_groups, split_params

__all__ = ["GroupedMuon", "Optimizers", "adamw", "adamw_groups", "build_optimizers", "check_options", "get_lr",
           "group_norms", "muon_class", "snapshot", "split_params"]


class GroupedMuon(torch.optim.Muon):
    """torch.optim.Muon, stepping same-shape matrices together (see the module docstring)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            bufs: list[torch.Tensor] = []
            self._init_group(group, params, grads, bufs)
            if not params:
                continue
            lr, momentum, wd = float(group["lr"]), group["momentum"], group["weight_decay"]
            torch._foreach_lerp_(bufs, grads, 1 - momentum)  # one kernel launch for all the buffers
            updates = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs
            if wd:
                torch._foreach_mul_(params, 1 - lr * wd)
            by_shape: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
            for p, u in zip(params, updates, strict=False):
                # orthogonalise wide: a tall matrix goes in transposed, as torch's Newton-Schulz does
                by_shape[(min(p.shape), max(p.shape))].append((p, u.T if p.size(0) > p.size(1) else u))
            for items in by_shape.values():
                ortho = newton_schulz(torch.stack([u for _, u in items]), group["ns_coefficients"],
                                      group["ns_steps"], group["eps"])
                for (p, _), o in zip(items, ortho, strict=False):
                    p.add_(o.T if p.size(0) > p.size(1) else o, alpha=-torch.optim._muon._adjust_lr(
                        lr, group["adjust_lr_fn"], p.shape))
        return loss


# The private torch pieces GroupedMuon.step relies on (torch 2.9-2.13 have them with these parameters;
# tests/test_torch_private_api.py pins them, so a torch that changes them fails a test, not a training run).
PRIVATE_MUON_API = {
    "torch.optim.Muon._init_group": ("self", "group", "params_with_grad", "grads", "muon_momentum_bufs"),
    "torch.optim._muon._adjust_lr": ("lr", "adjust_lr_fn", "param_shape"),
}


def _private_api_missing(api: dict[str, tuple[str, ...]]) -> str | None:
    """None when every `dotted.name` exists with exactly these parameters; else what differs."""
    import importlib

    for dotted, params in api.items():
        mod_name, *attrs = dotted.split(".")
        obj: Any = importlib.import_module(mod_name)
        for i, attr in enumerate(attrs):
            nxt = getattr(obj, attr, None)
            if nxt is None and inspect.ismodule(obj):  # torch.optim._muon: a submodule not imported yet
                with contextlib.suppress(ImportError):
                    nxt = importlib.import_module(".".join([mod_name, *attrs[:i + 1]]))
            if nxt is None:
                return f"{dotted} is missing"
            obj = nxt
        got = tuple(inspect.signature(obj).parameters)
        if got != params:
            return f"{dotted} takes {got}, expected {params}"
    return None


def muon_class() -> type[torch.optim.Muon]:
    """GroupedMuon where this torch has the private API it uses, else torch.optim.Muon itself (the same
    updates and state dict, one matrix at a time: slower, with a note saying why)."""
    missing = _private_api_missing(PRIVATE_MUON_API)
    if missing is None:
        return GroupedMuon
    print(f"note: torch {torch.__version__} changed a private API GroupedMuon uses ({missing}); "
          "using torch.optim.Muon, which gives the same updates more slowly", file=sys.stderr)
    return torch.optim.Muon


def newton_schulz(G: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float) -> torch.Tensor:
    """torch.optim.Muon's quintic Newton-Schulz orthogonalisation in bf16, for a batch (n, A, B), A <= B."""
    a, b, c = coefficients
    X = G.bfloat16()
    X = X / X.flatten(1).norm(dim=1).clamp(min=eps)[:, None, None]  # spectral norm <= 1
    for _ in range(steps):
        gram = X @ X.transpose(1, 2)
        X = torch.baddbmm(X, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), X, beta=a)
    return X


def get_lr(it: int, cfg: TrainConfig) -> float:
    """AdamW's learning rate at iteration `it` (Muon's is this times muon_lr / learning_rate)."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it > cfg.lr_decay_iters:
        return cfg.min_lr
    if cfg.lr_schedule == "wsd":
        decay_start = cfg.lr_decay_iters - cfg.decay_frac * cfg.lr_decay_iters
        if it < decay_start:
            return cfg.learning_rate
        ratio = (it - decay_start) / max(1.0, cfg.lr_decay_iters - decay_start)  # 0 -> 1
        return cfg.learning_rate + ratio * (cfg.min_lr - cfg.learning_rate)
    ratio = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)


def check_options(cfg: TrainConfig) -> None:
    """One line for optimizer settings that do not go together, before anything is built (the
    choices themselves are TrainConfig's Literal fields, checked by load_config)."""
    if not 0.0 <= cfg.decay_frac <= 1.0:
        raise UserError(f"decay_frac={cfg.decay_frac} must be between 0 and 1 "
                        "(the share of lr_decay_iters spent decaying)")
    if cfg.optimizer == "muon" and cfg.parallel == "fsdp":
        raise UserError("optimizer='muon' is not supported with parallel='fsdp' (Muon needs whole matrices); "
                        "use --parallel=ddp or --optimizer=adamw")


class Optimizers:
    """One or two torch optimizers stepped together (AdamW alone, or Muon + AdamW).

    `param_groups` lists every group of every optimizer, each with a "name" and its "base_lr" (the
    peak learning rate the schedule multiplies); `state_dict()` is AdamW's own for optimizer='adamw'
    (nanoGPT's checkpoint layout) and {'muon': ..., 'adamw': ...} for optimizer='muon'."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]):
        self.by_name = optimizers
        self.optimizers = list(optimizers.values())

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def set_lr(self, lr: float, cfg: TrainConfig) -> None:
        scale = lr / cfg.learning_rate if cfg.learning_rate else 0.0
        for g in self.param_groups:
            g["lr"] = g["base_lr"] * scale

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self, scaler: torch.amp.GradScaler | None = None) -> None:
        for opt in self.optimizers:
            if scaler is None:
                opt.step()
            else:
                scaler.step(opt)

    def unscale_(self, scaler: torch.amp.GradScaler) -> None:
        for opt in self.optimizers:
            scaler.unscale_(opt)

    def state_dict(self) -> dict[str, Any]:
        if list(self.by_name) == ["adamw"]:
            return self.by_name["adamw"].state_dict()
        return {name: opt.state_dict() for name, opt in self.by_name.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # torch restores the saved groups' hyper-parameters; this run's config (base_lr, group names) wins, as it
        # does for nanoGPT's learning_rate, which is set afresh every iteration
        mine = [(g["base_lr"], g["name"]) for g in self.param_groups]
        if list(self.by_name) == ["adamw"]:
            if "muon" in state:
                raise UserError("the checkpoint was trained with optimizer='muon'; resume with --optimizer=muon")
            self.by_name["adamw"].load_state_dict(state)
        else:
            if "muon" not in state:
                raise UserError("the checkpoint was trained with optimizer='adamw'; resume with --optimizer=adamw")
            for name, opt in self.by_name.items():
                opt.load_state_dict(state[name])
        for g, (base_lr, name) in zip(self.param_groups, mine, strict=False):  # nanoGPT's groups have no names
            g["base_lr"], g["name"] = base_lr, name


def build_optimizers(model: nn.Module, cfg: TrainConfig, device_type: str) -> Optimizers:
    """AdamW (nanoGPT's groups) or Muon for the hidden matrices + AdamW for the rest."""
    check_options(cfg)
    muon = cfg.optimizer == "muon"
    opts: dict[str, torch.optim.Optimizer] = {}
    if muon:
        opts["muon"] = muon_class()([{"params": split_params(model, muon)["hidden"], "name": "hidden"}],
                                     lr=cfg.muon_lr, momentum=cfg.muon_momentum, weight_decay=cfg.muon_weight_decay)
    opts["adamw"] = adamw(adamw_groups(model, cfg.weight_decay, muon), cfg.learning_rate, (cfg.beta1, cfg.beta2),
                          device_type)
    for opt in opts.values():
        for g in opt.param_groups:
            g["base_lr"] = g["lr"]
    return Optimizers(opts)


@torch.no_grad()
def group_norms(optim: Optimizers, before: list[torch.Tensor] | None = None) -> dict[str, float]:
    """Per-group L2 norms of the gradients (`grad_norm/<group>`) or, given the parameters as they
    were before the step, of the updates (`update_norm/<group>`)."""
    out = {}
    i = 0
    for g in optim.param_groups:
        ps = g["params"]
        if before is None:
            grads = [p.grad for p in ps if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else torch.zeros(())
            out[f"grad_norm/{g['name']}"] = float(norm)
        else:
            diffs = torch._foreach_sub([p.detach() for p in ps], before[i:i + len(ps)])
            out[f"update_norm/{g['name']}"] = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(diffs))))
        i += len(ps)
    return out


def snapshot(optim: Optimizers) -> list[torch.Tensor]:
    """Copies of every optimized parameter, in param_groups order (for update norms)."""
    return [p.detach().clone() for g in optim.param_groups for p in g["params"]]
