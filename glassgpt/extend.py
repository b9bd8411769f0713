"""Grow a checkpoint's context length: `glassgpt extend-context --out_dir=out --block_size=512`.

GPT-2-style models learn one position embedding per position (`transformer.wpe`, block_size rows),
so a longer context needs new rows. This writes a new checkpoint (never over the source unless
--overwrite=True) whose wpe has `block_size` rows, made by one of two methods:

- copy (default): rows 0..B-1 stay exactly as trained; new row p (p >= B) is trained row p mod B,
  i.e. the trained table is tiled. The first B positions are untouched, so before any further
  training the extended model's logits on sequences of up to B tokens equal the original's. Beyond
  B the model sees positions it never trained on (each looks like an earlier one) until trained.
- interpolate: position interpolation (Chen et al. 2023, https://arxiv.org/abs/2306.15595) applied
  to learned embeddings: new row p is the linear interpolation of the trained table at fractional
  position p * (B - 1) / (B' - 1). Rows 0 and B'-1 equal trained rows 0 and B-1; all others are
  blends, so the whole range looks like the familiar one, stretched. Every position's embedding
  changes (except the two ends), so logits on the first B positions are NOT the original's.

A rotary model (GPTConfig.rope) has no position table: its weights and optimizer state stay as they
are and only the rotation changes (docs/architecture.md):

- copy: angles unchanged; positions >= B get angles the model never saw (plain extrapolation). The
  logits on sequences of up to B tokens equal the original's exactly.
- interpolate: position interpolation proper: rope_scale is multiplied by B'/B, so the B' positions
  turn through the angles the B trained ones did.
- base: "NTK-aware" base scaling (https://arxiv.org/abs/2309.00071, section 3.1): rope_base is
  multiplied by (B'/B)**(hs/(hs-2)), stretching the slow pairs most and the fast ones hardly at all.

An ALiBi model (GPTConfig.alibi) has neither: its attention bias depends on distances only and
extrapolates as it is, so only block_size grows (method copy; the others are refused) and logits on
sequences of up to B tokens are the original's.

Then continue training as usual, from the new directory:

    python train.py --init_from=resume --out_dir=<new_out_dir> --block_size=<new> --max_iters=<more>

The checkpoint is resume-ready: model_args.block_size and config.block_size are the new size,
iter_num is kept (so the learning-rate schedule continues), best_val_loss is reset (losses over the
longer context are not comparable with the old ones), the saved RNG state is dropped (so the resumed
run evaluates the extended model before its first step) and the AdamW state is adapted to wpe's new
shape: exp_avg_sq rows are mapped like the weights (so each row's step size stays on its trained
scale), exp_avg (momentum) is kept for unchanged rows and zeroed for new or blended ones (with
optimizer='muon' wpe is AdamW's, and Muon's state is kept). With --optimizer=reset the optimizer
state is dropped instead (fresh moments, same hyper-parameters).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from glassgpt.checkpoint import ckpt_path, load_checkpoint, model_from_checkpoint, save_checkpoint
from glassgpt.config import load_config, wants_help
from glassgpt.errors import UserError

WPE = "transformer.wpe.weight"


@dataclass
class ExtendConfig:
    out_dir: str = "out"
    """Directory with the source ckpt.pt."""
    block_size: int = 0
    """The new, longer context length (required)."""
    method: Literal["copy", "interpolate", "base"] = "copy"
    """'copy' (tile the trained rows; the first positions are unchanged) or 'interpolate' (stretch
    the trained table over the longer range; measured to continue training much better, see
    docs/neurons.md); rotary models also take 'base' (scale rope_base instead)."""
    new_out_dir: str | None = None
    """Where to write the extended checkpoint; default <out_dir>-ctx<block_size>."""
    overwrite: bool = False
    """Allow writing into a directory that already has a ckpt.pt (including the source itself)."""
    optimizer: Literal["adapt", "reset"] = "adapt"
    """'adapt' (extend AdamW's moments for wpe, see the module docstring) or 'reset' (drop them)."""


def extend_rows(table: torch.Tensor, new_rows: int, method: str) -> torch.Tensor:
    """A (new_rows, C) table from a (B, C) one by `method` (see the module docstring)."""
    old_rows = table.size(0)
    if method == "copy":
        return table[torch.arange(new_rows) % old_rows].clone()
    if method == "interpolate":
        if old_rows == 1:
            return table.expand(new_rows, -1).clone()
        # fractional source position of every new row; float64 so the ends land exactly on 0 and B-1
        pos = torch.arange(new_rows, dtype=torch.float64) * (old_rows - 1) / (new_rows - 1)
        lo = pos.floor().long().clamp(max=old_rows - 2)
        frac = (pos - lo).unsqueeze(1)
        t = table.double()
        return ((1 - frac) * t[lo] + frac * t[lo + 1]).to(table.dtype)
    raise ValueError(f"extend_rows: unknown method {method!r}")


def unchanged_rows(old_rows: int, new_rows: int, method: str) -> int:
    """How many leading rows an extension leaves exactly as they were."""
    return old_rows if method == "copy" else 1


def _wpe_optimizer_index(ckpt: dict[str, Any], adam: dict[str, Any]) -> int | None:
    """Which AdamW state index belongs to wpe. Rebuild the model and the parameter order its
    optimizer was built with (glassgpt.optim.adamw_groups, the builder train uses): named groups ('decay'
    or 'embed', 'vector') are matched by name; nanoGPT's unnamed ones are in the same order (2-D
    weights, then the rest). Every saved moment must then have its parameter's shape."""
    from glassgpt.optim import adamw_groups

    model = model_from_checkpoint(ckpt)
    saved = adam.get("param_groups", [])
    named = bool(saved) and all("name" in g for g in saved)
    groups = adamw_groups(model, 0.0, muon=named and any(g["name"] == "embed" for g in saved))
    by_name = {g["name"]: g["params"] for g in groups}
    flat = [p for g in saved for p in by_name.get(g["name"], [])] if named else [p for g in groups for p in g["params"]]
    wpe = model.transformer.wpe.weight
    ids = [i for i, p in enumerate(flat) if p is wpe]
    saved_ids = [i for g in saved for i in g["params"]]
    if len(ids) != 1 or len(saved_ids) != len(flat):
        return None
    for p, i in zip(flat, saved_ids, strict=False):  # a wrong order would hand wpe's new shape to another tensor
        st = adam.get("state", {}).get(i)
        if st is not None and "exp_avg" in st and tuple(st["exp_avg"].shape) != tuple(p.shape):
            return None
    return saved_ids[ids[0]]


def extend_optimizer(ckpt: dict[str, Any], new_rows: int, method: str, mode: str) -> dict[str, Any]:
    """The optimizer state_dict for the extended model (see the module docstring). With Muon
    ({'muon': ..., 'adamw': ...}) wpe is AdamW's; Muon's state is kept as it is."""
    opt = ckpt.get("optimizer") or {}
    muon = "muon" in opt and "adamw" in opt
    adam = opt["adamw"] if muon else opt
    if not adam or "state" not in adam:
        return copy.deepcopy(opt)  # nothing saved (e.g. an inference-only checkpoint): nothing to adapt
    if mode == "reset":
        def fresh(o):
            return {"state": {}, "param_groups": copy.deepcopy(o["param_groups"])}
        return {k: fresh(v) for k, v in opt.items()} if muon else fresh(opt)
    idx = _wpe_optimizer_index(ckpt, adam)
    if idx is None:
        raise UserError("the checkpoint's optimizer state does not match the model's parameter groups, "
                        "so wpe's moments cannot be found; rerun with --optimizer=reset")
    out = {"state": dict(adam["state"]), "param_groups": copy.deepcopy(adam["param_groups"])}
    st = adam["state"].get(idx)
    if st is not None:
        old_rows = st["exp_avg"].size(0)
        keep = unchanged_rows(old_rows, new_rows, method)
        exp_avg = torch.zeros((new_rows, *st["exp_avg"].shape[1:]), dtype=st["exp_avg"].dtype)
        exp_avg[:keep] = st["exp_avg"][:keep]
        # second moments stay non-negative under both maps (copy picks rows, interpolate blends them)
        exp_avg_sq = extend_rows(st["exp_avg_sq"], new_rows, method)
        out["state"][idx] = {**st, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    return {**copy.deepcopy({k: v for k, v in opt.items() if k != "adamw"}), "adamw": out} if muon else out


def _model_args(ckpt: dict[str, Any]) -> dict[str, Any]:
    """Every GPTConfig option of a checkpoint (nanoGPT's model_args over glassgpt's extra ones)."""
    return {**(ckpt.get("glassgpt_model_args") or {}), **ckpt["model_args"]}


def rotary_args(args: dict[str, Any], block_size: int, method: str) -> dict[str, Any]:
    """The rope_scale / rope_base of a rotary model extended from args["block_size"] to block_size."""
    factor = block_size / int(args["block_size"])
    hs = int(args["n_embd"]) // int(args["n_head"])
    scale, base = float(args.get("rope_scale", 1.0)), float(args.get("rope_base", 10000.0))
    if method == "interpolate":
        scale *= factor
    elif method == "base":
        base *= factor ** (hs / (hs - 2)) if hs > 2 else factor
    return {"rope_scale": scale, "rope_base": base}


def extend_checkpoint(ckpt: dict[str, Any], block_size: int, method: str = "copy",
                      optimizer: str = "adapt") -> dict[str, Any]:
    """A new checkpoint dict with `block_size` positions; the source dict is not modified."""
    args = _model_args(ckpt)
    old = int(args["block_size"])
    if block_size < old:
        raise UserError(f"block_size={block_size} is smaller than the checkpoint's {old}: extend-context only "
                        f"grows; to use a shorter context, pass --block_size={block_size} at train/sample time "
                        "(GPT.crop_block_size)")
    if block_size == old:
        raise UserError(f"the checkpoint already has block_size={old}; give a larger --block_size")
    state = dict(ckpt["model"])
    if args.get("alibi") and method != "copy":
        raise UserError(f"method={method} changes a position table or rotation; this ALiBi model has neither: "
                        "use --method=copy (block_size grows, nothing else changes)")
    if args.get("rope") or args.get("alibi"):  # no table to grow: weights and optimizer state stay
        # rotary: the rotation changes; ALiBi: only block_size does (its bias extrapolates as it is)
        extra = rotary_args(args, block_size, method) if args.get("rope") else {}
        opt = copy.deepcopy(ckpt.get("optimizer") or {})
    else:
        if method == "base":
            raise UserError("method=base scales the rotary base; this model has learned positions (wpe): "
                            "use --method=copy or --method=interpolate")
        wpe_keys = [k for k in state if k.endswith(WPE)]  # also finds `_orig_mod.`-prefixed names
        if len(wpe_keys) != 1:
            raise UserError(f"expected one {WPE} in the checkpoint, found {wpe_keys}; is this a GPT checkpoint?")
        state[wpe_keys[0]] = extend_rows(state[wpe_keys[0]], block_size, method)
        extra, opt = {}, extend_optimizer(ckpt, block_size, method, optimizer)
    # "rng" is dropped: the resumed run then starts a fresh batch stream and evaluates the extended
    # model before its first step (train skips that eval when it restores an interrupted run's rng).
    new = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer", "rng")}
    new["model"] = state
    new["optimizer"] = opt
    # model_args wins over glassgpt_model_args on load; save_checkpoint splits them again
    new["model_args"] = {**ckpt["model_args"], "block_size": block_size, **extra}
    new["config"] = {**(ckpt.get("config") or {}), "block_size": block_size}
    new["best_val_loss"] = 1e9
    new["extended_from"] = {"block_size": old, "method": method, "optimizer": optimizer,
                            "iter_num": ckpt.get("iter_num")}
    return new


def main(argv: list[str] | None = None) -> Path:
    if wants_help(ExtendConfig, argv, "glassgpt extend-context"):
        return Path()
    cfg = load_config(ExtendConfig, argv)
    if cfg.block_size <= 0:
        raise UserError("give the new context length, e.g. --block_size=512")
    src = ckpt_path(cfg.out_dir)
    ckpt = load_checkpoint(src, with_optimizer=True)
    new_dir = Path(cfg.new_out_dir or f"{cfg.out_dir.rstrip('/')}-ctx{cfg.block_size}")
    dst = new_dir / src.name
    if dst.exists() and not cfg.overwrite:
        what = "is the source checkpoint" if dst.resolve() == src.resolve() else "already exists"
        raise UserError(f"{dst} {what}; choose another --new_out_dir or pass --overwrite=True")
    new = extend_checkpoint(ckpt, cfg.block_size, cfg.method, cfg.optimizer)
    model_from_checkpoint(new)  # the new weights must load into the new shape before we write them
    save_checkpoint(dst, new)
    old = _model_args(ckpt)["block_size"]
    print(f"wrote {dst}: block_size {old} -> {cfg.block_size} ({cfg.method}; optimizer {cfg.optimizer})")
    print(f"continue training: python train.py --init_from=resume --out_dir={new_dir} "
          f"--block_size={cfg.block_size} --max_iters=<more than {ckpt.get('iter_num', 0)}>")
    return dst
