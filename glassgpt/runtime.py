"""Device and precision choices shared by training, sampling and tracing."""

from __future__ import annotations

import contextlib
import os
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


# Below this many parameters a CPU forward is too small to split across threads: one thread wins,
# by ~3x when another process wants a core (issue 12: 2 threads vs 1 on a 2-core box).
SMALL_MODEL_PARAMS = 30_000_000


def choose_threads(n_params: int, device: str, threads: int | None = None) -> int | None:
    """Set torch's CPU thread count and return it: `threads` (--threads) if given, else
    $OMP_NUM_THREADS if set, else 1 for small models, else torch's default. On GPUs nothing is
    changed (None)."""
    if not device.startswith("cpu"):
        return None
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    n = threads or (int(env) if env.isdigit() and int(env) > 0 else None)
    if n is None:
        n = 1 if n_params < SMALL_MODEL_PARAMS else torch.get_num_threads()
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    return n

