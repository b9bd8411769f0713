"""Device and precision choices shared by training, sampling and tracing."""

from __future__ import annotations

import contextlib
import os
import sys
import time

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
    if dtype not in DTYPES:  # the commands' dtype fields are Literal[...]: a bad one never gets here
        raise ValueError(f"resolve_dtype: unknown dtype {dtype!r}")
    if dtype == "bfloat16" and device.startswith("cpu") and not cpu_has_native_bf16():
        print("warning: this CPU has no native bfloat16 (AVX512-BF16 or AMX), so dtype=bfloat16 is "
              "emulated and slower than float32; pass --dtype=float32", file=sys.stderr)
    return dtype


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU multiplies bfloat16 in hardware (x86 AVX512-BF16 / AMX, Arm BF16); True where
    /proc/cpuinfo cannot say (not Linux)."""
    try:
        with open(cpuinfo) as f:
            flags = {w for line in f if line.startswith(("flags", "Features")) for w in line.split()}
    except OSError:
        return True
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def autocast(device: str, dtype: str) -> contextlib.AbstractContextManager:
    """Mixed precision context: a no-op for float32. On a CPU only bfloat16 autocasts (matmuls on AMX /
    AVX512-BF16 units; attention stays float32, see CausalSelfAttention); float16 there is a no-op."""
    device_type = "cuda" if device.startswith("cuda") else device.split(":")[0]
    if dtype == "float32" or (device_type != "cuda" and dtype != "bfloat16"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=DTYPES[dtype])


# Below this many parameters a CPU step is too small to share a core: while another process is busy,
# a thread that has to wait for a core slows every step (1109 vs 214 ms/iter with 2 threads vs 1 at load
# ~5 on 2 cores). On an idle machine every core helps (2 threads 34 ms vs 1 thread 51 ms per step of
# nanoGPT's CPU recipe), so small models take the cores nobody else uses. benchmarks/RESULTS.md has both.
SMALL_MODEL_PARAMS = 30_000_000


def _cpu_times() -> tuple[int, int] | None:
    """(idle, total) jiffies of all CPUs from /proc/stat, or None where there is none (not Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[3] + (fields[4] if len(fields) > 4 else 0), sum(fields[:8])  # idle + iowait


def idle_cores(total: int, window: float = 0.05) -> int:
    """How many of `total` cores other processes leave idle right now (at least 1): the idle share of
    the CPUs over a `window`-second sleep (this process sleeps, so only the others count), else the
    1-minute load average where /proc/stat is missing. The load average lags: right after another
    job ends it still says busy, which is why it is only the fallback."""
    before = _cpu_times()
    if before is not None:
        time.sleep(window)
        after = _cpu_times()
        d_idle, d_total = after[0] - before[0], after[1] - before[1]
        if d_total > 0:
            return max(1, min(total, round((os.cpu_count() or total) * d_idle / d_total)))
    try:
        busy = int(os.getloadavg()[0])  # floor: an editor or a shell at load 0.3 takes no core
    except (AttributeError, OSError):
        return total
    return max(1, min(total, total - busy))


def choose_threads(n_params: int, device: str, threads: int | None = None) -> int | None:
    """Set torch's CPU thread count and return it: `threads` (--threads) if given, else
    $OMP_NUM_THREADS if set, else for small models the cores other processes leave idle
    (`idle_cores`), else torch's default. On GPUs nothing is changed (None)."""
    if not device.startswith("cpu"):
        return None
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    n = threads or (int(env) if env.isdigit() and int(env) > 0 else None)
    if n is None:
        n = idle_cores(torch.get_num_threads()) if n_params < SMALL_MODEL_PARAMS else torch.get_num_threads()
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    return n


# Dense peak FLOP/s per device for MFU, from the vendors' datasheets (bf16/fp16 tensor cores, dense;
# fp32 rows for dtype=float32). Matched against torch.cuda.get_device_name(). Unlisted -> None.
PEAK_FLOPS = {
    # name substring: (bf16/fp16, fp32 incl. tf32 where used by matmuls)
    "H200": (989e12, 494e12),
    "H100": (989e12, 494e12),  # SXM; PCIe is lower, named "H100 PCIe"
    "H100 PCIe": (756e12, 378e12),
    "A100": (312e12, 156e12),
    "A10G": (125e12, 62.5e12),
    "L4": (121e12, 60e12),
    "V100": (125e12, 15.7e12),
    "RTX 4090": (165e12, 82.6e12),
    "RTX 3090": (71e12, 35.6e12),
    "T4": (65e12, 8.1e12),
}


def device_peak_flops(device: str | torch.device, dtype: str = "bfloat16") -> float | None:
    """Peak FLOP/s of the actual device, or None where no honest figure is known (CPU, MPS)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    best = None
    for key, (half, single) in PEAK_FLOPS.items():
        if key in name and (best is None or len(key) > len(best[0])):
            best = (key, half if dtype in ("bfloat16", "float16") else single)
    return best[1] if best else None
