"""Network health while training: gradient clipping, per-layer activation and weight norms, a plot.

Logged to out_dir/log.jsonl at log iterations (beside the per-group `grad_norm/*` and `update_norm/*`
that glassgpt.optim computes) and drawn in out_dir/health.png at the end of a run:

- `clip_frac`: the share of optimizer steps since the last log line whose gradient norm exceeded
  `grad_clip` (so clipping scaled it down), and `clip_scale`: the mean factor those gradients were
  multiplied by (grad_clip / |g|; 1.0 = never clipped). Counted on every step, not just logged ones,
  on the device without a host sync.
- `act_rms/<layer>`: the RMS of the residual stream after the embeddings (`emb`) and after each
  block (`h.0`, `h.1`, ...), from forward hooks on one fixed probe batch (the first rows of the same
  training windows every time, so the numbers are comparable across iterations) run through the
  uncompiled model in eval mode. The hooks are removed in a `finally`. Activations that grow layer
  after layer, or jump during training, are the usual first sign of an instability.
- `w_norm/<layer>`: the L2 norm of all weights of each block, and of the embeddings (`emb`).

The activation probe is skipped under FSDP (a sharded model's forward is collective and its
weights are shards); the clip statistics and group norms are still logged there.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

PROBE_ROWS = 4  # rows of the probe batch: enough for a stable RMS, a small share of a step's compute
PROBE_SEED = 20_231_129


class ClipStats:
    """Clip events counted on the device every step, read (one sync) at log iterations."""

    def __init__(self, grad_clip: float):
        self.grad_clip = grad_clip
        self._steps = 0
        self._clipped: torch.Tensor | None = None  # count of clipped steps since the last read
        self._scale_sum: torch.Tensor | None = None  # sum of grad_clip / |g| over those steps
        self.total_steps = 0
        self.total_clipped = 0

    def update(self, grad_norm: torch.Tensor | None) -> None:
        if grad_norm is None or self.grad_clip == 0.0:
            return
        if hasattr(grad_norm, "full_tensor"):  # FSDP returns a replicated DTensor
            grad_norm = grad_norm.full_tensor()
        gn = grad_norm.detach().float()
        clipped = (gn > self.grad_clip).float()
        scale = clipped * (self.grad_clip / gn.clamp_min(1e-12))
        self._clipped = clipped if self._clipped is None else self._clipped + clipped
        self._scale_sum = scale if self._scale_sum is None else self._scale_sum + scale
        self._steps += 1

    def read(self) -> dict[str, float]:
        """{'clip_frac', 'clip_scale'} over the steps since the last read; {} with clipping off."""
        if self._steps == 0 or self._clipped is None or self._scale_sum is None:
            return {}
        n, k = self._steps, float(self._clipped)
        out = {"clip_frac": k / n, "clip_scale": float(self._scale_sum) / k if k else 1.0}
        self.total_steps += n
        self.total_clipped += int(k)
        self._steps, self._clipped, self._scale_sum = 0, None, None
        return out

    def summary(self) -> str | None:
        self.read()
        if self.total_steps == 0:
            return None
        return (f"gradient clipped (|g| > {self.grad_clip}) on {self.total_clipped} of {self.total_steps} "
                f"steps ({100 * self.total_clipped / self.total_steps:.0f}%)")


def layer_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) whose output is the residual stream: the embeddings' dropout (`emb`) and each block."""
    tr: Any = model.transformer
    return [("emb", tr.drop), *((f"h.{i}", block) for i, block in enumerate(tr.h))]


@contextlib.contextmanager
def capture_activation_rms(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Forward hooks recording each layer's output RMS into the yielded dict; always removed."""
    found: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name: str):
        def fn(_module: nn.Module, _inputs: Any, output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            found[name] = out.detach().float().pow(2).mean().sqrt()
        return fn

    try:
        for name, module in layer_modules(model):
            handles.append(module.register_forward_hook(hook(name)))
        yield found
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def weight_norms(model: nn.Module) -> dict[str, float]:
    """`w_norm/emb` (token and position embeddings) and `w_norm/h.<i>` (all weights of block i)."""
    tr: Any = model.transformer
    emb = [p for n, p in tr.named_parameters() if n.startswith(("wte", "wpe"))]
    groups = {"emb": emb, **{f"h.{i}": list(b.parameters()) for i, b in enumerate(tr.h)}}
    return {f"w_norm/{k}": float(torch.linalg.vector_norm(torch.stack([p.detach().float().norm() for p in ps])))
            for k, ps in groups.items() if ps}


def probe_batch(batches: Any) -> torch.Tensor:
    """The same few training windows every time (a generator of its own: the training stream is untouched)."""
    gen = torch.Generator().manual_seed(PROBE_SEED)
    x, _ = batches.get_batch("train", gen)
    return x[:PROBE_ROWS]


@torch.no_grad()
def activation_norms(model: nn.Module, x: torch.Tensor, ctx: Any) -> dict[str, float]:
    """`act_rms/<layer>` of the uncompiled `model` on the probe batch `x`, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        with capture_activation_rms(model) as found, ctx:
            model(x)
    finally:
        model.train(was_training)
    return {f"act_rms/{k}": float(v) for k, v in found.items()}


def layer_norms(model: nn.Module, x: torch.Tensor | None, ctx: Any) -> dict[str, float]:
    """Activation (when a probe batch is given) and weight norms per layer, for one log record."""
    out = activation_norms(model, x, ctx) if x is not None else {}
    out.update(weight_norms(model))
    return out


def plot_health(records: list[dict], path: Path, grad_clip: float = 0.0) -> bool:
    """health.png: gradient norm and clipping, activation RMS per layer, weight norm per layer, each
    against the iteration. False (nothing written) when the log has no health records."""
    steps = [r for r in records if "grad_norm" in r]
    if not steps:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    fig.subplots_adjust(wspace=0.4)  # room for the clip axis on the right of the first panel
    it = [r["iter"] for r in steps]
    ax = axes[0]
    ax.plot(it, [r["grad_norm"] for r in steps], lw=0.8, label="|g| (before clipping)")
    if grad_clip:
        ax.axhline(grad_clip, color="gray", ls="--", lw=0.8, label=f"grad_clip {grad_clip}")
    clip = [(r["iter"], r["clip_frac"]) for r in steps if "clip_frac" in r]
    if clip:
        ax2 = ax.twinx()
        ax2.plot(*zip(*clip, strict=True), color="tab:red", lw=0.8, alpha=0.7, label="share of steps clipped")
        ax2.set_ylim(-0.02, 1.02)
        ax2.set_ylabel("share of steps clipped", color="tab:red")
    ax.set_title("gradient norm and clipping")
    ax.legend(loc="upper right", fontsize=8)
    for ax, prefix, title in ((axes[1], "act_rms/", "activation RMS after each layer"),
                              (axes[2], "w_norm/", "weight norm per layer")):
        names = sorted({k[len(prefix):] for r in steps for k in r if k.startswith(prefix)}, key=_layer_order)
        for name in names:
            pts = [(r["iter"], r[prefix + name]) for r in steps if prefix + name in r]
            ax.plot(*zip(*pts, strict=True), lw=1, label=name)
        ax.set_title(title)
        if names:
            ax.legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return True


def _layer_order(name: str) -> tuple[int, int]:
    return (0, 0) if name == "emb" else (1, int(name.split(".")[1]) if name.startswith("h.") else 0)


def overfit_warning(prev: dict[str, float] | None, now: dict[str, float], best_val: float, best_iter: int | None,
                    best_path: str | None) -> str | None:
    """A warning line when val loss rose since the previous eval while train loss fell (the model is
    memorising its training text), naming the best checkpoint kept; None otherwise."""
    if not prev or not (now["val"] > prev["val"] and now["train"] < prev["train"]):
        return None
    kept = (f"the best val loss {best_val:.4f} (iteration {best_iter}) is kept in {best_path}" if best_path
            else f"no checkpoint holds the best val loss {best_val:.4f} (iteration {best_iter})")
    return (f"warning: val loss rose {prev['val']:.4f} -> {now['val']:.4f} while train loss fell "
            f"{prev['train']:.4f} -> {now['train']:.4f}: overfitting (memorising the training text); {kept}. "
            "Fewer iterations, more text, a smaller model or dropout=0.1-0.2 help")
