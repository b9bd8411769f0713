"""nanoGPT's bench.py: time training iterations of a GPT, or write a profiler trace.

    python bench.py --device=cpu --compile=False --n_layer=4 --n_embd=128 --block_size=64
    python bench.py --profile=True        # trace in bench_log/, open in chrome://tracing or TensorBoard

Prints ms/iter and tokens/s; MFU where the device's peak FLOP/s is known (GPUs listed in
glassgpt/model.py), never against a made-up CPU peak.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

from glassgpt.config import BenchConfig, TrainConfig, load_config, wants_help
from glassgpt.data import BatchSampler, data_dir_for
from glassgpt.errors import run_main
from glassgpt.model import GPT, GPTConfig
from glassgpt.optim import build_optimizers
from glassgpt.runtime import autocast, device_peak_flops, resolve_device, resolve_dtype
from glassgpt.tokenizer import read_meta


def make_batches(cfg: BenchConfig, device: str):
    data_dir = data_dir_for(cfg.dataset, cfg.data_dir)
    if cfg.real_data and (data_dir / "train.bin").exists():
        sampler = BatchSampler(data_dir, cfg.block_size, cfg.batch_size, device, cfg.seed)
        meta = read_meta(data_dir) or {}
        return (lambda: sampler.get_batch("train")), int(meta.get("vocab_size", 50304)), f"real data from {data_dir}"
    x = torch.randint(50304, (cfg.batch_size, cfg.block_size), device=device)
    y = torch.randint(50304, (cfg.batch_size, cfg.block_size), device=device)
    why = "" if not cfg.real_data else f" ({data_dir}/train.bin not found)"
    return (lambda: (x, y)), 50304, "random data" + why


def bench(cfg: BenchConfig) -> dict:
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    device_type = "cuda" if device.startswith("cuda") else device.split(":")[0]
    torch.manual_seed(cfg.seed)
    get_batch, vocab, source = make_batches(cfg, device)
    # every GPTConfig field bench has a key for (its sizes), named as GPTConfig names them
    arch = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(GPTConfig) if hasattr(cfg, f.name)}
    model = GPT(GPTConfig(**arch, vocab_size=vocab)).to(device)
    # nanoGPT bench.py's AdamW (weight decay 1e-2, lr 1e-4), with train's parameter groups
    optimizer = build_optimizers(model, TrainConfig(weight_decay=1e-2, learning_rate=1e-4, beta1=0.9, beta2=0.95),
                                 device_type)
    if cfg.compile:
        print("compiling model...")
        model = torch.compile(model)  # type: ignore[assignment]
    ctx = autocast(device, dtype)
    sync = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
    print(f"{source}; {model.get_num_params() / 1e6 if hasattr(model, 'get_num_params') else 0:.2f}M params; "
          f"device {device}, {dtype}")

    def step():
        x, y = get_batch()
        with ctx:
            _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    if cfg.profile:
        out = Path("bench_log")
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU]
            + ([torch.profiler.ProfilerActivity.CUDA] if device_type == "cuda" else []),
            schedule=torch.profiler.schedule(wait=5, warmup=5, active=5, repeat=1),
            on_trace_ready=torch.profiler.tensorboard_trace_handler(str(out)),
            record_shapes=False, profile_memory=False, with_stack=False,
        ) as prof:
            for k in range(20):
                loss = step()
                sync()
                print(f"{k}/20 loss: {loss.item():.4f}")
                prof.step()
        print(f"profiler trace written to {out}/")
        return {}

    for _ in range(10):  # burn-in: allocator, compile, caches
        step()
    sync()
    times = []
    for _ in range(cfg.num_steps):
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
    raw = model._orig_mod if hasattr(model, "_orig_mod") else model
    ms = statistics.median(times) * 1000
    tok_s = cfg.batch_size * cfg.block_size / (ms / 1000)
    mfu = raw.estimate_mfu(tok_s, device_peak_flops(device, dtype))
    mfu_s = f", MFU {mfu * 100:.2f}%" if mfu is not None else " (MFU: no known peak FLOP/s for this device)"
    print(f"time per iteration: {ms:.2f} ms (median of {cfg.num_steps}), {tok_s:,.0f} tokens/s{mfu_s}; "
          f"last loss {loss.item():.4f}")
    return {"ms_per_iter": ms, "tokens_per_s": tok_s, "mfu": mfu}


def main(argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(BenchConfig, argv, "bench.py"):
        return None
    return bench(load_config(BenchConfig, argv))


if __name__ == "__main__":
    sys.exit(run_main(main))
