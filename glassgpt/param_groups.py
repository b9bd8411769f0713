"""The parameter groups every optimizer in glassgpt is built from, and nanoGPT's AdamW over them.

Its own module, below glassgpt.optim and glassgpt.config, so that the model (nanoGPT's
`GPT.configure_optimizers`) can build them without importing the training configuration.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn


def split_params(model: nn.Module, muon: bool) -> dict[str, list[nn.Parameter]]:
    """Named parameter groups: 'hidden' (2-D matrices inside the blocks), 'embed' (other 2-D weights:
    embeddings and an untied head), 'vector' (gains, biases). Without Muon, hidden and embed are
    merged into 'decay' as nanoGPT does."""
    groups: dict[str, list[nn.Parameter]] = {"hidden": [], "embed": [], "vector": []}
    for name, p in model.named_parameters():  # tied weights appear once
        if not p.requires_grad:
            continue
        if p.dim() < 2:
            groups["vector"].append(p)
        elif ".h." in f".{name}" and "wte" not in name and "wpe" not in name:
            groups["hidden"].append(p)
        else:
            groups["embed"].append(p)
    # nanoGPT's order (model order, all 2-D weights): nanoGPT checkpoints' AdamW state maps by position
    if not muon:
        decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
        return {"decay": decay, "vector": groups["vector"]}
    return groups


def adamw_groups(model: nn.Module, weight_decay: float, muon: bool = False) -> list[dict[str, Any]]:
    """AdamW's named parameter groups: 2-D weights ('decay', or with Muon only the 'embed' ones) at
    `weight_decay`, gains and biases ('vector') at 0. The one place parameter groups are made: train,
    bench, extend-context and nanoGPT's GPT.configure_optimizers all come here."""
    groups = split_params(model, muon)
    name = "embed" if muon else "decay"
    out = [{"params": groups[name], "weight_decay": weight_decay, "name": name},
           {"params": groups["vector"], "weight_decay": 0.0, "name": "vector"}]
    return [g for g in out if g["params"]]


def adamw(groups: list[dict[str, Any]], learning_rate: float, betas: tuple[float, float],
          device_type: str) -> torch.optim.AdamW:
    """torch's AdamW over `groups`, fused where torch has it for the device: on CUDA and (torch >= 2.4)
    CPU it steps ~10x faster than the per-tensor loop on this project's 2-core CPU."""
    fused_ok = "fused" in inspect.signature(torch.optim.AdamW).parameters and device_type in ("cuda", "cpu")
    extra = {"fused": True} if fused_ok else {}
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)
