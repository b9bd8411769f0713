"""Checkpoints: nanoGPT's `ckpt.pt` layout, written atomically, read safely.

`ckpt.pt` holds nanoGPT's keys (model_args with nanoGPT's GPTConfig fields only, so its sample.py
loads our files) plus glassgpt's (glassgpt_model_args, glassgpt_fingerprint, tokenizer, rng). The
optimizer state is not in it: it goes to `ckpt.optim.<id>.pt` beside it, which ckpt.pt names
(`optimizer_file`), so sampling, eval and the traces read only the weights. The pair is one checkpoint:
the optimizer file is written first under a name of its own, then ckpt.pt (the commit point) by one
rename, and only then are older optimizer files removed — a kill at any moment leaves a ckpt.pt whose
optimizer file exists and belongs to it. nanoGPT's single-file checkpoints (`optimizer` inside) load
and resume as before. Beside them, `ckpt.json` names the same iteration and weights fingerprint as
JSON. Every file is written by tmp + fsync + rename; reads use `torch.load(weights_only=True)`.
docs/FORMATS.md has the details.
"""

from __future__ import annotations

import dataclasses
import pickle
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import torch

from glassgpt.artifacts import (
    cached_fingerprint,
    clean_leftovers,
    fingerprint_tensors,
    read_json,
    write_file_atomic,
    write_json_atomic,
)
from glassgpt.errors import UserError
from glassgpt.model import GPT, GPTConfig

CKPT_NAME = "ckpt.pt"
SIDECAR_NAME = "ckpt.json"
FORMAT = "glassgpt-ckpt/1"
# torch.compile wraps the model in `_orig_mod`, DDP in `module`: strip them in this one place.
WRAPPER_PREFIXES = ("_orig_mod.", "module.")
# nanoGPT's GPTConfig fields (karpathy/nanoGPT model.py): what its sample.py can take as model_args
NANOGPT_MODEL_ARGS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "dropout", "bias")
EXTRA_ARGS_KEY = "glassgpt_model_args"  # the other GPTConfig options; nanoGPT ignores the key
FINGERPRINT_KEY = "glassgpt_fingerprint"
OPTIM_FILE_KEY = "optimizer_file"  # ckpt.pt -> the name of its optimizer-state file beside it
SIDECAR_KEYS = ("model_args", EXTRA_ARGS_KEY, "iter_num", "best_val_loss", "config", "tokenizer", "data")
# messages of torch's zip reader for damaged files (other RuntimeErrors are bugs and propagate)
CORRUPT_MARKERS = ("PytorchStreamReader", "inline_container", "zip archive", "invalid header")
_WARNED: set[Path] = set()


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


def split_model_args(args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model_args, glassgpt_model_args) for a checkpoint. nanoGPT's sample.py calls
    `GPTConfig(**model_args)`, so when the architecture is nanoGPT's (every other option at its
    default) model_args holds only nanoGPT's keys and the rest goes beside it; otherwise model_args
    holds every option, so nanoGPT refuses the checkpoint loudly instead of running another model."""
    defaults = {f.name: f.default for f in dataclasses.fields(GPTConfig)}
    extra = {k: v for k, v in args.items() if k not in NANOGPT_MODEL_ARGS}
    nanogpt_arch = all(k in defaults and v == defaults[k] for k, v in extra.items())
    base = {k: v for k, v in args.items() if k in NANOGPT_MODEL_ARGS or not nanogpt_arch}
    return base, extra


def model_args_of(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The full GPTConfig dict of a checkpoint: model_args merged over glassgpt_model_args (model_args
    wins, so code that edits model_args, like extend-context, is obeyed)."""
    return {**(ckpt.get(EXTRA_ARGS_KEY) or {}), **ckpt["model_args"]}


def optim_path(path: str | Path, name: str) -> Path:
    return ckpt_path(path).parent / name


def _optim_files(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.stem}.optim.*.pt"))


def save_checkpoint(path: str | Path, ckpt: dict[str, Any]) -> Path:
    """Atomically write `ckpt`: its optimizer state (if any) to `<stem>.optim.<id>.pt`, then the
    weights and the rest to `path` naming that file, then the JSON sidecar ckpt.json, each by tmp +
    fsync + rename; then the optimizer files of earlier saves go. The weights' fingerprint is computed
    here, once, and stored in ckpt.pt and ckpt.json; the optimizer file's <id> is the same
    fingerprint's start and the iteration, so each save's pair is named apart."""
    path = Path(path)
    ckpt = dict(ckpt)
    ckpt["model_args"], ckpt[EXTRA_ARGS_KEY] = split_model_args(model_args_of(ckpt))
    ckpt[FINGERPRINT_KEY] = fingerprint_tensors(ckpt["model"])
    optim = ckpt.pop("optimizer", None)
    ckpt.pop(OPTIM_FILE_KEY, None)
    if optim:
        name = f"{path.stem}.optim.{ckpt.get('iter_num', 0)}-{ckpt[FINGERPRINT_KEY].split(':')[-1][:12]}.pt"
        write_file_atomic(optim_path(path, name), lambda f: _torch_save(optim, f))
        ckpt[OPTIM_FILE_KEY] = name
    write_file_atomic(path, lambda f: _torch_save(ckpt, f))  # the commit point of the pair
    side = {k: _jsonable(v) for k, v in ckpt.items() if k in SIDECAR_KEYS}
    side.update(format=FORMAT, checkpoint=path.name, fingerprint=ckpt[FINGERPRINT_KEY],
                saved_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                n_params=sum(v.numel() for k, v in ckpt["model"].items()
                             if k != "lm_head.weight" or not model_args_of(ckpt).get("tie_embeddings", True)))
    write_json_atomic(sidecar_path(path), side)
    for old in _optim_files(path):  # earlier saves' optimizer files: ckpt.pt no longer names them
        if old.name != ckpt.get(OPTIM_FILE_KEY):
            old.unlink(missing_ok=True)
    return path


def _torch_save(obj: Any, f: Any) -> None:
    """torch.save, but a failed write surfaces as the OSError it was (a full disk: one line from
    write_file_atomic), not as the zip writer's "RuntimeError: ... unexpected pos" that hides it."""
    try:
        torch.save(obj, f)
    except RuntimeError as e:
        if isinstance(e.__context__, OSError):
            raise e.__context__ from None
        raise


def sidecar_path(path: str | Path) -> Path:
    return ckpt_path(path).with_suffix(".json")


def read_sidecar(path: str | Path) -> dict[str, Any] | None:
    """ckpt.json (no torch, no unpickling): iteration, fingerprint, config. None when absent."""
    side = read_json(sidecar_path(path), default=None, strict=False)
    return side if isinstance(side, dict) else None


def checkpoint_fingerprint(ckpt: dict[str, Any], path: str | Path) -> str:
    """The weights fingerprint of a loaded checkpoint: the one save_checkpoint stored in it, else
    (nanoGPT) computed once and cached beside the file. ckpt.json must name the same iteration and
    fingerprint; if not, ckpt.pt is trusted and a warning says so (once per file)."""
    path = ckpt_path(path)
    fp = ckpt.get(FINGERPRINT_KEY)
    if not fp:
        fp = cached_fingerprint([path], lambda: fingerprint_tensors(clean_state_dict(ckpt["model"])))
    side = read_sidecar(path)
    if side is not None and side.get("format") == FORMAT:
        # a sidecar of glassgpt <= 0.1 names no fingerprint: compare what it names
        disagree = [k for k, mine in (("iter_num", ckpt.get("iter_num")), ("fingerprint", fp))
                    if k in side and side[k] != mine]
        if disagree and path not in _WARNED:
            _WARNED.add(path)
            print(f"warning: {sidecar_path(path)} does not describe {path} ({', '.join(disagree)} differ; "
                  f"a write was interrupted?); trusting {path.name} (iter {ckpt.get('iter_num')})", file=sys.stderr)
    return str(fp)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", *,
                    with_optimizer: bool = False) -> dict[str, Any]:
    """Load a glassgpt or nanoGPT checkpoint with weights_only=True; one clear line if it is not one.
    Only the weights and metadata are read unless `with_optimizer` (resuming, extending): then
    ckpt["optimizer"] holds the optimizer state, from its own file or (a single-file checkpoint) from
    ckpt.pt (which is then read whole, as before the split)."""
    ckpt = _load_torch_file(ckpt_path(path), map_location, what="checkpoint")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        keys = sorted(ckpt)[:6] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f"{ckpt_path(path)} is not a glassgpt/nanoGPT checkpoint (it has {keys}, expected model "
                        "and model_args); for a Hugging Face GPT-2 directory use init_from=<dir>")
    if not with_optimizer:
        ckpt.pop("optimizer", None)
    elif ckpt.get(OPTIM_FILE_KEY) and "optimizer" not in ckpt:
        opath = optim_path(path, str(ckpt[OPTIM_FILE_KEY]))
        if not opath.exists():
            raise UserError(f"{opath} is missing: {ckpt_path(path).name} keeps its optimizer state there, so the "
                            "run cannot resume exactly; restore the file (the weights in "
                            f"{ckpt_path(path).name} still sample, evaluate and trace)")
        ckpt["optimizer"] = _load_torch_file(opath, map_location, what="optimizer state")
    return ckpt


def _load_torch_file(path: Path, map_location: str | torch.device, what: str) -> Any:
    """torch.load(weights_only=True) with one clear line for a missing, damaged or unsafe file. (Not
    mmap=True: a file that another program rewrites in place would crash this one with SIGBUS.)"""
    clean_leftovers(path)  # the temporary of a save that was killed
    if not path.exists():
        raise UserError(f"no {what} at {path}; train one first (python train.py ... --out_dir={path.parent})")
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path} is not a PyTorch checkpoint (corrupt or truncated, or another format); "
                        "restore it from a backup or retrain")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message ends in advice to load unsafely; the plain fact is what the user needs
        raise UserError(f"{path} holds Python objects that a safe load (weights_only=True) refuses to "
                        "run; glassgpt only loads checkpoints of tensors and plain data. Re-save it from "
                        "trusted code as a plain state dict, or retrain") from None
    except (zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"{path} is corrupt or truncated ({type(e).__name__}); restore it or retrain") from None
    except RuntimeError as e:
        if not any(s in str(e) for s in CORRUPT_MARKERS):
            raise  # an internal error, not a bad file
        raise UserError(f"{path} is corrupt or truncated ({str(e).splitlines()[0][:120]}); restore it or "
                        "retrain") from None


def model_from_checkpoint(ckpt: dict[str, Any], **overrides: Any) -> GPT:
    """Build the GPT a checkpoint describes and load its weights (strictly)."""
    args = model_args_of(ckpt)
    args.update({k: v for k, v in overrides.items() if v is not None})
    try:
        model = GPT(GPTConfig.from_dict(args))
    except (TypeError, ValueError) as e:
        raise UserError(f"checkpoint model_args are invalid: {e}") from None
    state = clean_state_dict(ckpt["model"])
    # nanoGPT omits the causal-mask buffers (`attn.bias`) only in flash mode; drop any that appear.
    state = {k: v for k, v in state.items() if not k.endswith(".attn.bias")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if model.config.tie_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]  # tied to wte: one matrix, either name
    if missing or unexpected:
        raise UserError(f"checkpoint weights do not fit its model_args (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    return model
