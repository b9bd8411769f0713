"""What this machine can do: the training recipe for it, torch.compile with a fallback, out-of-memory advice.

    python -m glassgpt.hardware          # prints the recipe's config file for `make demo`; why, on stderr

- `pick_recipe()`: a CUDA GPU gets config/train_shakespeare_char_gpu.py (bf16, torch.compile, flash
  attention through SDPA), Apple's MPS config/train_shakespeare_char_mps.py, a CPU the CPU record
  recipe config/train_shakespeare_char_cpu.py.
- `try_compile()`: torch.compile, then one forward and backward to make it compile now; if either
  fails (no C compiler, no Triton, an unsupported op), one line says so and training goes on
  uncompiled. The random streams are restored, so the run is the one it would have been.
- `oom_error()`: an out-of-memory error (CUDA, MPS or host) becomes one line naming what to lower.
  Checkpoints are written atomically, so the last one is intact.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from glassgpt.errors import UserError

REPO_CONFIG = Path("config")


@dataclass(frozen=True)
class Recipe:
    name: str  # "gpu", "mps" or "cpu"
    config: str  # the config file, relative to the repository root
    reason: str


def pick_recipe(cuda: bool | None = None, mps: bool | None = None) -> Recipe:
    """The Shakespeare-char recipe for this machine (arguments override detection, for tests)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if mps is None:
        mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if cuda:
        name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "a CUDA GPU"
        return Recipe("gpu", str(REPO_CONFIG / "train_shakespeare_char_gpu.py"),
                      f"CUDA is available ({name}): bf16 autocast, torch.compile, flash attention")
    if mps:
        return Recipe("mps", str(REPO_CONFIG / "train_shakespeare_char_mps.py"),
                      "no CUDA GPU, Apple MPS is available: float32 on the GPU, no torch.compile")
    return Recipe("cpu", str(REPO_CONFIG / "train_shakespeare_char_cpu.py"),
                  f"no CUDA GPU or Apple MPS found (torch {torch.__version__}): the CPU record recipe")


def compile_and_wrap(model: nn.Module, dist_info: Any, dtype: str, compile: bool, batches: Any, ctx: Any,
                     say: Any = print) -> nn.Module:
    """distributed.wrap_model with the compile fallback: compiled (checked on one training batch
    drawn from a generator of its own) where that works, else uncompiled. Under FSDP the model is
    compiled after sharding, inside wrap_model, and compiles at its first step."""
    from glassgpt import distributed

    if not compile or dist_info.fsdp:
        return distributed.wrap_model(model, dist_info, dtype, compile=compile)
    x, y = batches.get_batch("train", torch.Generator().manual_seed(0))
    compiled = try_compile(model, x, y, ctx, say)
    return distributed.wrap_model(compiled if compiled is not None else model, dist_info, dtype, compile=False)


def _restore_rng(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def try_compile(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: Any,
                say: Any = print) -> nn.Module | None:
    """torch.compile(model), compiled now by one forward+backward (training) and one forward (eval,
    no grad) on x, y; None after one line via `say` if compiling fails. Gradients are cleared and
    the random streams restored, so training starts as if this had not run."""
    rng = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if x.is_cuda else None)
    compiled: Any = None
    try:
        compiled = torch.compile(model)
        with ctx:
            _, loss = compiled(x, y)
        loss.backward()
        compiled.eval()
        with torch.no_grad(), ctx:
            compiled(x, y)
    except Exception as e:  # any failure to compile; a bug in the model fails again uncompiled
        if is_oom(e):
            raise
        first = (str(e).strip().splitlines() or [""])[0][:160]
        say(f"torch.compile failed ({type(e).__name__}: {first}); training continues uncompiled")
        compiled = None
    finally:
        model.train()
        model.zero_grad(set_to_none=True)
        _restore_rng(rng)
    return compiled


# Messages of out-of-memory errors that arrive as plain RuntimeErrors (MPS, the CPU allocator).
OOM_MARKERS = ("out of memory", "can't allocate memory", "not enough memory", "failed to allocate",
               "cannot allocate memory")


def is_oom(e: BaseException) -> bool:
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(e, RuntimeError) and any(m in str(e).lower() for m in OOM_MARKERS)


def oom_error(e: BaseException, cfg: Any, device: str, world_size: int = 1, last_ckpt: str | None = None) -> UserError:
    """One line: where memory ran out, what to lower (keeping the tokens per step), what is kept."""
    text = str(e)
    where = ("CUDA memory" if "CUDA" in text else "MPS memory" if "MPS" in text
             else "host memory" if device.startswith("cpu") or isinstance(e, MemoryError) else f"{device} memory")
    tokens = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    if cfg.batch_size > 1:
        half = max(1, cfg.batch_size // 2)
        accum = cfg.gradient_accumulation_steps * cfg.batch_size // half
        if accum % world_size:
            accum += world_size - accum % world_size
        batch = (f"--batch_size={half} with --gradient_accumulation_steps={accum} (about the same "
                 f"{tokens:,} tokens per step)")
    else:
        batch = "--batch_size is already 1"
    dtype = " or --dtype=bfloat16" if cfg.dtype in ("float32", "auto") and not device.startswith("cpu") else ""
    kept = f"the last checkpoint {last_ckpt} is intact" if last_ckpt else "no checkpoint had been saved"
    return UserError(f"out of {where} ({type(e).__name__}); lower {batch}, or --block_size={cfg.block_size // 2}, "
                     f"or the model (--n_layer={cfg.n_layer}, --n_embd={cfg.n_embd}){dtype}; {kept}")


def main() -> None:
    recipe = pick_recipe()
    print(f"recipe: {recipe.name} ({recipe.config}): {recipe.reason}", file=sys.stderr)
    print(recipe.config)


if __name__ == "__main__":
    main()
