"""Checkpoints kept beside out_dir/ckpt.pt: periodic ones and the best one.

- `--keep_every=N` writes the weights every N iterations as `ckpt-<iter>.pt` (+ `ckpt-<iter>.json`),
  atomically, without optimizer state. trace-spans, trace-knn, trace-neurons and neuron take
  `--ckpt_iter=N` to open one instead of ckpt.pt (through glassgpt.run.open_run(ckpt_iter=...)), so
  you can watch a copied span or a neuron appear over training.
- `ckpt-best.pt`: with `always_save_checkpoint=True` (nanoGPT's default) ckpt.pt is overwritten at
  every eval, also when val loss got worse. Before that happens to the best checkpoint, it is kept
  as ckpt-best.pt (a hard link: no copy, no extra disk until ckpt.pt moves on); it is removed again
  once ckpt.pt is the best. `--ckpt_iter=best` opens it. It holds the weights (to sample and trace):
  the optimizer file it names goes with the next save of ckpt.pt, so it cannot be resumed. With
  always_save_checkpoint=False, ckpt.pt itself is always the best and no ckpt-best.pt appears.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from glassgpt.errors import UserError

BEST = "best"
_KEPT = re.compile(r"^ckpt-(\d+)\.pt$")


def kept_path(out_dir: str | Path, ckpt_iter: int | str) -> Path:
    """out_dir/ckpt-<iter>.pt (or ckpt-best.pt)."""
    return Path(out_dir) / f"ckpt-{ckpt_iter}.pt"


def best_path(out_dir: str | Path, always_save_checkpoint: bool) -> str:
    """Where the best-val checkpoint is: ckpt-best.pt while ckpt.pt moves on at every eval, else ckpt.pt."""
    return str(kept_path(out_dir, BEST) if always_save_checkpoint else Path(out_dir) / "ckpt.pt")


def kept_iters(out_dir: str | Path) -> list[int]:
    """The iterations with a periodic checkpoint in out_dir, ascending."""
    d = Path(out_dir)
    found = (_KEPT.match(p.name) for p in d.iterdir()) if d.is_dir() else iter(())
    return sorted(int(m[1]) for m in found if m)


def resolve_ckpt_iter(out_dir: str | Path, ckpt_iter: int | str | None) -> Path:
    """The checkpoint file `--ckpt_iter` names in out_dir (None: out_dir itself, i.e. ckpt.pt).
    A missing one is one line naming those that exist."""
    out = Path(out_dir)
    if ckpt_iter is None:
        return out
    if out.suffix == ".pt":
        raise UserError(f"--ckpt_iter={ckpt_iter} picks a file in an out_dir, but {out} is already a file; pass "
                        "the directory, or the file without --ckpt_iter")
    key = str(ckpt_iter).strip()
    if key != BEST and not key.isdigit():
        raise UserError(f"--ckpt_iter={ckpt_iter} must be an iteration number or 'best'")
    path = kept_path(out, key if key == BEST else int(key))
    if not path.exists():
        iters = kept_iters(out)
        have = (f"kept iterations: {', '.join(map(str, iters))}" if iters else
                "none are kept there; train with --keep_every=N to keep them")
        raise UserError(f"no checkpoint for --ckpt_iter={ckpt_iter} in {out} ({path.name} missing); {have}")
    return path


def _link_or_copy(src: Path, dst: Path) -> None:
    """dst becomes src's content by one rename: a hard link where the file system has them, else a copy."""
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def keep_best(out_dir: str | Path) -> Path:
    """Keep the current ckpt.pt (and its ckpt.json) as ckpt-best.pt before ckpt.pt is overwritten.
    The sidecar goes first: a crash in between leaves a sidecar that names another iteration than
    its .pt, which the loader notices and reports; never a best .pt with a stale sidecar unnoticed."""
    out = Path(out_dir)
    dst = kept_path(out, BEST)
    if (out / "ckpt.json").exists():
        _link_or_copy(out / "ckpt.json", dst.with_suffix(".json"))
    _link_or_copy(out / "ckpt.pt", dst)
    return dst


def drop_best(out_dir: str | Path) -> None:
    """Remove ckpt-best.pt once ckpt.pt holds a better model (it would name a worse one)."""
    dst = kept_path(out_dir, BEST)
    dst.unlink(missing_ok=True)
    dst.with_suffix(".json").unlink(missing_ok=True)
