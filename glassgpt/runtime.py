"""Device and precision choices shared by training, sampling and tracing."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from glassgpt.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> str:
    """'auto' -> cuda > mps > cpu; an explicit device is checked so a typo fails with one line."""
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda", "mps"):
        raise UserError(f"device {device!r} is not one of cpu, cuda, cuda:N, mps, auto")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={device} but no CUDA GPU is available; use --device=cpu")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """'auto' -> bfloat16 on CUDA where supported, else float16 on CUDA, else float32."""
    if dtype == "auto":
        if device.startswith("cuda"):
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "float32"
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)} or auto")
    return dtype


def autocast(device: str, dtype: str) -> contextlib.AbstractContextManager:
    """Mixed precision context: a no-op for float32 (and on CPU, where bf16 autocast is slower here)."""
    device_type = "cuda" if device.startswith("cuda") else device.split(":")[0]
    if dtype == "float32" or device_type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=DTYPES[dtype])


def load_for_inference(out_dir: str | Path, device: str = "cpu", data_dir: str | None = None,
                       vocab_dir: str | None = None):
    """(model in eval mode on `device`, tokenizer, checkpoint dict) from out_dir/ckpt.pt."""
    from glassgpt.checkpoint import checkpoint_tokenizer, load_checkpoint, model_from_checkpoint

    ckpt = load_checkpoint(out_dir, map_location="cpu")
    model = model_from_checkpoint(ckpt)
    model.eval().to(device)
    tok = checkpoint_tokenizer(ckpt, data_dir=data_dir, vocab_dir=vocab_dir)
    return model, tok, ckpt
