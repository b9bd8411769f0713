"""Deterministic retraining on subsets of a fixed window set: the counterfactual the attribution tests measure.

The loop is a minimal one over glassgpt's `GPT` with the optimizer glassgpt trains it with
(`GPT.configure_optimizers`: AdamW, decay on 2-D weights, fused on CPU) and a cosine learning rate.
It is not `glassgpt.train`, which samples random offsets of a token stream: attribution needs the
training examples to be fixed windows, each seen at a known step.

The same-order rule: the windows are dealt into batches by one fixed permutation per epoch (seeded by
`seed` and the epoch), for every subset alike. Removing windows leaves every other window in the same
batch slot at the same step; a batch is the mean loss over its kept windows, a batch with none kept is
skipped, and the learning-rate schedule counts every slot, so nothing else moves. Runs are float32 on
the CPU with dropout 0, so the same subset gives the same weights, bit for bit, on one thread.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch

from glassgpt.model import GPT, GPTConfig


@dataclass(frozen=True)
class TrainSpec:
    """A tiny char GPT and how it is trained (base model and each finetune)."""

    vocab_size: int = 96
    block_size: int = 32
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 48
    learning_rate: float = 2e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    batch_size: int = 16
    epochs: int = 1
    grad_clip: float = 1.0
    seed: int = 0

    def model_config(self) -> GPTConfig:
        return GPTConfig(block_size=self.block_size, vocab_size=self.vocab_size, n_layer=self.n_layer,
                         n_head=self.n_head, n_embd=self.n_embd, dropout=0.0, bias=True)


def new_model(spec: TrainSpec, seed: int | None = None) -> GPT:
    torch.manual_seed(spec.seed if seed is None else seed)
    return GPT(spec.model_config())


def cosine_lr(step: int, total: int, spec: TrainSpec) -> float:
    ratio = step / max(1, total - 1)
    return spec.learning_rate * (spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * ratio)))


def batch_slots(n_windows: int, spec: TrainSpec) -> list[np.ndarray]:
    """The fixed schedule: window ids of every batch slot, epoch after epoch (the last batch of an
    epoch may be short). The same for every subset; a subset only masks windows out."""
    slots = []
    for epoch in range(spec.epochs):
        order = np.random.default_rng([spec.seed, epoch]).permutation(n_windows)
        slots += [order[b:b + spec.batch_size] for b in range(0, n_windows, spec.batch_size)]
    return slots


def _optimizer(model: GPT, spec: TrainSpec) -> torch.optim.Optimizer:
    return model.configure_optimizers(spec.weight_decay, spec.learning_rate, (0.9, 0.95), "cpu")


def train_windows(model: GPT, windows: torch.Tensor, keep: np.ndarray | None, spec: TrainSpec) -> GPT:
    """Train `model` in place on the kept rows of `windows` (N, T+1) by the fixed schedule.
    keep: bool (N,), None = all."""
    n = len(windows)
    keep = np.ones(n, dtype=bool) if keep is None else np.asarray(keep, dtype=bool)
    if keep.shape != (n,):
        raise ValueError(f"keep has shape {keep.shape}, expected ({n},)")
    opt = _optimizer(model, spec)
    slots = batch_slots(n, spec)
    model.train()
    for step, slot in enumerate(slots):
        rows = slot[keep[slot]]
        if len(rows) == 0:
            continue  # every window of this slot removed: skip the step, keep the schedule
        _step(model, opt, windows[torch.from_numpy(rows)], cosine_lr(step, len(slots), spec), spec.grad_clip)
    model.eval()
    return model


def _step(model: GPT, opt: torch.optim.Optimizer, batch: torch.Tensor, lr: float, grad_clip: float) -> None:
    """One optimizer step on a batch of (T+1)-token windows at learning rate `lr`, gradients clipped."""
    for group in opt.param_groups:
        group["lr"] = lr
    _, loss = model(batch[:, :-1].contiguous(), batch[:, 1:].contiguous())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


def train_base(tokens: np.ndarray, spec: TrainSpec, steps: int, batch_size: int = 32) -> GPT:
    """The base model: `steps` AdamW steps on random windows of a token stream (seeded), cosine lr."""
    model = new_model(spec)
    rng = np.random.default_rng([spec.seed, 12345])
    T = spec.block_size
    starts = rng.integers(0, len(tokens) - T - 1, size=(steps, batch_size))
    data = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    opt = _optimizer(model, spec)
    model.train()
    for step in range(steps):
        batch = torch.stack([data[s:s + T + 1] for s in starts[step]])
        _step(model, opt, batch, cosine_lr(step, steps, spec), spec.grad_clip)
    model.eval()
    return model


def finetune(base: GPT, windows: torch.Tensor, keep: np.ndarray | None, spec: TrainSpec) -> GPT:
    """A fresh copy of `base`, trained on the kept windows."""
    return train_windows(copy.deepcopy(base), windows, keep, spec)


def from_scratch(windows: torch.Tensor, keep: np.ndarray | None, spec: TrainSpec) -> GPT:
    """A freshly initialised model (seeded by spec.seed: the same init for every subset), trained on
    the kept windows."""
    return train_windows(new_model(spec), windows, keep, spec)


def query_xy(queries: list[np.ndarray], prompt_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded inputs and targets of the queries; targets outside ids[prompt_len:] are -1 (ignored)."""
    L = max(len(q) for q in queries)
    x = torch.zeros((len(queries), L - 1), dtype=torch.long)
    y = torch.full((len(queries), L - 1), -1, dtype=torch.long)
    for i, q in enumerate(queries):
        t = torch.as_tensor(np.asarray(q, dtype=np.int64))
        x[i, :len(t) - 1] = t[:-1]
        y[i, prompt_len - 1:len(t) - 1] = t[prompt_len:]
    return x, y


@torch.no_grad()
def query_losses(model: torch.nn.Module, queries: list[np.ndarray], prompt_len: int) -> np.ndarray:
    """(Q,) summed next-token loss (nats) of each query over its tokens ids[prompt_len:], i.e. the
    targets at positions prompt_len-1 .. len-2. Queries may differ in length (right-padded: the model
    is causal, so padding never changes an earlier position)."""
    if prompt_len < 1:
        raise ValueError("prompt_len must be >= 1: the first token has no prediction")
    x, y = query_xy(queries, prompt_len)
    model.eval()
    out = np.zeros(len(queries))
    for a in range(0, len(queries), 64):
        logits, _ = model(x[a:a + 64], y[a:a + 64])
        tgt = y[a:a + 64]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tgt.clamp(min=0), reduction="none")
        out[a:a + 64] = (nll * (tgt >= 0)).sum(1).double().numpy()
    return out
