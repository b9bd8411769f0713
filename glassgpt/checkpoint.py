"""Checkpoints: nanoGPT's `ckpt.pt` layout, written atomically, read safely.

`ckpt.pt` holds nanoGPT's keys (model, optimizer, model_args, iter_num, best_val_loss, config), so
nanoGPT and glassgpt read each other's files, plus glassgpt's own (tokenizer, rng, sampler). Next to
it, `ckpt.json` holds the same metadata as JSON for people and tools that should not unpickle.

Writes go to a temporary file that is renamed over the old one only when complete, so a crash
mid-write leaves the previous checkpoint loadable. Reads use `torch.load(weights_only=True)`: a
checkpoint can hold tensors and plain data, never code.
"""

from __future__ import annotations

import json
import os
import time
import zipfile
from pathlib import Path
from typing import Any

import torch

from glassgpt.errors import UserError
from glassgpt.model import GPT, GPTConfig
from glassgpt.tokenizer import Tokenizer, read_meta, tokenizer_from_meta

CKPT_NAME = "ckpt.pt"
SIDECAR_NAME = "ckpt.json"
FORMAT = "glassgpt-ckpt/1"
# torch.compile wraps the model in `_orig_mod`, DDP in `module`: strip them in this one place.
WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def clean_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state_dict.items():
        changed = True
        while changed:
            changed = False
            for p in WRAPPER_PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return repr(x)


def ckpt_path(out_dir_or_file: str | Path) -> Path:
    p = Path(out_dir_or_file)
    return p if p.suffix == ".pt" else p / CKPT_NAME


def save_checkpoint(path: str | Path, ckpt: dict[str, Any]) -> Path:
    """Atomically write `ckpt` (torch) and its JSON sidecar (everything but tensors)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    side = {k: _jsonable(v) for k, v in ckpt.items() if k in ("model_args", "iter_num", "best_val_loss", "config", "tokenizer", "data")}
    side.update(format=FORMAT, checkpoint=path.name, saved_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                n_params=sum(v.numel() for k, v in ckpt["model"].items() if k != "lm_head.weight"))
    side_path = path.with_suffix(".json")
    side_tmp = side_path.with_name(f".{side_path.name}.tmp{os.getpid()}")
    side_tmp.write_text(json.dumps(side, indent=1, ensure_ascii=False))
    os.replace(side_tmp, side_path)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a glassgpt or nanoGPT checkpoint with weights_only=True; one clear line if it is not one."""
    path = ckpt_path(path)
    if not path.exists():
        raise UserError(f"no checkpoint at {path}; train one first (python train.py ... --out_dir={path.parent})")
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path} is not a PyTorch checkpoint (corrupt or truncated, or another format); "
                        "restore it from a backup or retrain")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} could not be loaded safely ({first[:200]}); it is corrupt, truncated, "
                        "or holds objects other than tensors and plain data") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        keys = sorted(ckpt)[:6] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f"{path} is not a glassgpt/nanoGPT checkpoint (it has {keys}, expected model and "
                        "model_args); for a Hugging Face GPT-2 directory use init_from=<dir>")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], **overrides: Any) -> GPT:
    """Build the GPT a checkpoint describes and load its weights (strictly)."""
    args = dict(ckpt["model_args"])
    args.update({k: v for k, v in overrides.items() if v is not None})
    try:
        model = GPT(GPTConfig.from_dict(args))
    except (TypeError, ValueError) as e:
        raise UserError(f"checkpoint model_args are invalid: {e}") from None
    state = clean_state_dict(ckpt["model"])
    # nanoGPT omits the causal-mask buffers (`attn.bias`) only in flash mode; drop any that appear.
    state = {k: v for k, v in state.items() if not k.endswith(".attn.bias")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to wte
    if missing or unexpected:
        raise UserError(f"checkpoint weights do not fit its model_args (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    return model


def checkpoint_tokenizer(ckpt: dict[str, Any], data_dir: str | Path | None = None,
                         vocab_dir: str | None = None) -> Tokenizer:
    """The tokenizer a checkpoint was trained with: stored in it (glassgpt), else the dataset's
    meta.json / meta.pkl (nanoGPT: data/<dataset>/), else GPT-2 BPE."""
    meta = ckpt.get("tokenizer")
    if not meta:
        cfg = ckpt.get("config") or {}
        d = Path(data_dir) if data_dir else (Path(cfg["data_dir"]) if cfg.get("data_dir") else Path("data") / str(cfg.get("dataset", "")))
        meta = read_meta(d) if cfg.get("dataset") or data_dir else None
    tok = tokenizer_from_meta(meta, vocab_dir)
    vocab = ckpt["model_args"].get("vocab_size")
    if vocab is not None and tok.vocab_size > vocab:
        raise UserError(f"tokenizer has {tok.vocab_size} tokens but the model only {vocab}; "
                        "point --data_dir at the dataset this checkpoint was trained on")
    return tok
