"""The training loop: nanoGPT's train.py as functions a test can call with a 2-layer model for 3 steps.

    python train.py config/train_shakespeare_char.py --device=cpu --compile=False
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py

docs/training.md walks through it in the order data flows. What the logged numbers mean:
- loss: the average of -ln p(correct next token) over the batch, in nats. A model that guesses
  uniformly over V tokens scores ln(V) (4.17 for Shakespeare's 65 characters).
- perplexity = e^loss: the number of tokens the model is, on average, "choosing between".
- e^-loss: the geometric-mean probability the model gives the correct next token.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from glassgpt import advice, distributed, hardware, health, kept
from glassgpt.checkpoint import ckpt_path, clean_state_dict, load_checkpoint, model_from_checkpoint, save_checkpoint
from glassgpt.config import GPTOptions, TrainConfig, config_to_dict, load_config, wants_help
from glassgpt.data import BatchSampler, data_dir_for, require_prepared
from glassgpt.errors import UserError, run_main
from glassgpt.model import GPT, GPTConfig
from glassgpt.optim import Optimizers, build_optimizers, check_options, get_lr, group_norms, snapshot
from glassgpt.runlog import LOG_NAME, RunLog, plot_losses
from glassgpt.runtime import autocast, choose_threads, device_peak_flops, resolve_device, resolve_dtype
from glassgpt.schedule import BatchRamp, build_ramp
from glassgpt.tokenizer import read_meta


@torch.no_grad()
def estimate_loss(model: torch.nn.Module, batches: BatchSampler, eval_iters: int, ctx,
                  dist_info: distributed.DistInfo | None = None) -> dict[str, float]:
    """Mean loss over `eval_iters` fixed batches of each split.

    Under torchrun the batches are rank 0's, dealt round-robin over the ranks, and the sums are
    all-reduced: the same number for any world size, and every rank runs the same number of forward
    passes (FSDP's are collective; a rank short of a batch re-scores its last one with weight 0)."""
    rank, world = (dist_info.rank, dist_info.world_size) if dist_info else (0, 1)
    rank0 = copy.copy(batches)
    rank0.rank = 0  # the eval generator is seeded per rank: use rank 0's on every rank
    out = {}
    model.eval()
    for split in ("train", "val"):
        gen = rank0.eval_generator(split)
        total = torch.zeros(2, dtype=torch.float64, device=batches.device)  # (sum of losses, count)
        for k in range(-(-eval_iters // world) * world):
            if k < eval_iters:
                ix = batches.draw(split, gen)  # every rank draws every batch's positions to stay in step,
            if k % world == rank:
                x, y = batches.batch_at(split, ix)  # but reads and copies only its own batches
                with ctx:
                    _, loss = model(x, y)
                total += torch.stack([loss.detach().double(), total.new_ones(())]) * float(k < eval_iters)
        if dist_info is not None:
            distributed.all_reduce_sum(total, dist_info)
        out[split] = (total[0] / total[1]).item()
    model.train()
    return out


def explain_loss(loss: float, vocab_size: int) -> str:
    return (f"ppl {math.exp(min(loss, 50)):.2f}, p(next) {math.exp(-loss):.3f}; "
            f"uniform guess ln({vocab_size}) = {math.log(vocab_size):.2f}")


def check_out_dir(out_dir: str) -> None:
    """Fail before training, not at the first checkpoint, if out_dir cannot be written."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = Path(out_dir) / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"out_dir {out_dir} is not writable ({e.strerror}); choose another --out_dir") from None


def build_model(cfg: TrainConfig, meta: dict | None) -> tuple[GPT, dict | None, dict]:
    """(model, checkpoint if resuming, model_args) for init_from = scratch | resume | gpt2* | HF dir.
    `meta` is the prepared dataset's metadata (None: nanoGPT-style GPT-2 data without meta)."""
    meta_vocab = int(meta["vocab_size"]) if meta and "vocab_size" in meta else None
    ckpt, init_tok = None, None
    if cfg.init_from == "scratch":
        if meta_vocab is None:
            print("no vocab_size in the dataset's metadata: using GPT-2's 50304 (50257 rounded up for efficiency)")
        args = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
                    bias=cfg.bias, vocab_size=meta_vocab or 50304, dropout=cfg.dropout,
                    activation=cfg.activation or "gelu", **arch_options(cfg))
        try:
            model = GPT(GPTConfig(**args))
        except ValueError as e:
            raise UserError(str(e)) from None
    elif cfg.init_from == "resume":
        ckpt = load_checkpoint(ckpt_path(cfg.out_dir), map_location="cpu", with_optimizer=True)
        trained_block = int(ckpt["model_args"]["block_size"])
        if cfg.block_size > trained_block:
            raise UserError(f"block_size={cfg.block_size} is larger than the checkpoint's {trained_block}; grow it "
                            "first with `glassgpt extend-context "
                            f"--out_dir={cfg.out_dir} --block_size={cfg.block_size}`")
        # nanoGPT: the architecture comes from the checkpoint, only dropout may change
        model = model_from_checkpoint(ckpt, dropout=cfg.dropout, activation=cfg.activation)
        if cfg.block_size < trained_block:
            model.crop_block_size(cfg.block_size)
        args = model.config.to_dict()
    else:  # GPT-2 weights, an HF directory, or another run to finetune (glassgpt/finetune.py)
        from glassgpt.finetune import init_weights

        model, init_tok = init_weights(cfg, refuse_options_for_pretrained)
        if cfg.activation is not None and cfg.activation != model.config.activation:
            raise UserError(f"--activation={cfg.activation} cannot be used with init_from={cfg.init_from}: its "
                            f"weights were trained with {model.config.activation}; drop --activation")
        if cfg.block_size < model.config.block_size:
            model.crop_block_size(cfg.block_size)
        args = model.config.to_dict()
    cfg.block_size = model.config.block_size
    if cfg.init_from != "scratch":
        from glassgpt.pretrained import check_vocab

        # data the model cannot embed, or tokenized another way than the model was trained on
        check_vocab(model.config.vocab_size, meta, ckpt.get("tokenizer") if ckpt else init_tok)
    return model, ckpt, args


ARCH_OPTIONS = tuple(f.name for f in dataclasses.fields(GPTOptions))  # GPTConfig's options (glassgpt.config)


def arch_options(cfg: TrainConfig) -> dict[str, Any]:
    """The GPTConfig architecture options of a from-scratch model (defaults: GPT-2's)."""
    return {k: getattr(cfg, k) for k in ARCH_OPTIONS}


def refuse_options_for_pretrained(cfg: TrainConfig) -> None:
    """GPT-2 weights fix the architecture: an option that would change it is refused, not ignored."""
    if cfg.activation not in (None, "gelu", "gelu_new"):  # a local GPT-2 directory may hold either GELU
        raise UserError(f"--activation={cfg.activation} cannot be used with init_from={cfg.init_from}: GPT-2's "
                        "weights were trained with a GELU; drop --activation")
    default = TrainConfig()
    changed = [k for k in ARCH_OPTIONS if getattr(cfg, k) != getattr(default, k)]
    if changed:
        raise UserError(f"--{changed[0]} cannot be used with init_from={cfg.init_from}: GPT-2's weights fix the "
                        "architecture; drop it or train from scratch")


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run a training job; returns {'iter_num', 'best_val_loss', 'last_eval', 'log': [records], 'elapsed'}."""
    cfg = copy.deepcopy(cfg)  # the job settles some fields (block_size of a pretrained model): not the caller's
    check_options(cfg)
    dist_info = distributed.setup(cfg.backend, resolve_device(cfg.device), cfg.parallel)
    finished = False
    try:
        result = _train(cfg, dist_info)
        finished = True
        return result
    except (MemoryError, RuntimeError) as e:
        if not hardware.is_oom(e):
            raise
        side = ckpt_path(cfg.out_dir).with_suffix(".json")
        last = f"{ckpt_path(cfg.out_dir)} (iter {json.loads(side.read_text())['iter_num']})" if side.exists() else None
        raise hardware.oom_error(e, cfg, dist_info.device, dist_info.world_size, last) from None
    finally:
        distributed.teardown(dist_info, finished)


@dataclass
class Job:
    """Everything one training job holds, built by `_setup` and advanced by `_step`."""

    cfg: TrainConfig
    dist: distributed.DistInfo
    device: str
    device_type: str
    dtype: str
    ctx: Any
    grad_accum: int
    batches: BatchSampler
    raw_model: GPT
    model: torch.nn.Module
    eval_model: torch.nn.Module
    optimizer: Optimizers
    scaler: torch.amp.GradScaler
    model_args: dict
    tok_meta: dict
    vocab: int
    run_log: RunLog
    config_dict: dict
    threads: int | None = None
    iter_num: int = 0
    best_val_loss: float = 1e9
    resumed_at: int | None = None
    saved_iter: int | None = None  # out_dir's checkpoint iteration on every rank (only rank 0 sees ckpt.json)
    best_iter: int | None = None  # the iteration of best_val_loss
    ramp: BatchRamp | None = None
    clip: health.ClipStats = field(default_factory=lambda: health.ClipStats(0.0))
    probe: torch.Tensor | None = None  # health's fixed probe batch (None: health off or FSDP)
    last_eval: dict[str, float] | None = None

    @property
    def master(self) -> bool:
        return self.dist.master

    @property
    def tokens_per_iter(self) -> int:
        return self.grad_accum * self.dist.world_size * self.cfg.batch_size * self.cfg.block_size


def _setup(cfg: TrainConfig, dist_info: distributed.DistInfo) -> tuple[Job, dict | None]:
    """Seeds, data, model (wrapped for compile/DDP/FSDP), optimizers; (job, checkpoint if resuming)."""
    device = dist_info.device
    device_type = "cuda" if device.startswith("cuda") else device.split(":")[0]
    dtype = resolve_dtype(cfg.dtype, device)
    if dist_info.master:
        check_out_dir(cfg.out_dir)
    torch.manual_seed(cfg.seed + dist_info.rank)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    data_dir = data_dir_for(cfg.dataset, cfg.data_dir)
    require_prepared(data_dir)
    meta = read_meta(data_dir)
    meta_vocab = int(meta["vocab_size"]) if meta and "vocab_size" in meta else None

    raw_model, ckpt, model_args = build_model(cfg, meta)
    threads = choose_threads(raw_model.get_num_params(), device, cfg.threads)
    batches = BatchSampler(data_dir, cfg.block_size, cfg.batch_size, device, cfg.seed, dist_info.rank)
    raw_model.to(device)
    if cfg.compile and dist_info.master:
        print("compiling the model... (takes a ~minute)")
    # compiled (or not, after one line) and/or DDP-wrapped, or sharded in place by FSDP (so the optimizer comes after)
    model = hardware.compile_and_wrap(raw_model, dist_info, dtype, cfg.compile, batches, autocast(device, dtype),
                                      say=print if dist_info.master else lambda _m: None)
    grad_accum = distributed.split_grad_accum(cfg.gradient_accumulation_steps, dist_info.world_size)
    tok_meta = {k: v for k, v in (meta or {"tokenizer": "gpt2"}).items()
                if k in ("tokenizer", "vocab_size", "stoi", "itos", "eot_token", "bpe")}
    job = Job(cfg=cfg, dist=dist_info, device=device, device_type=device_type, dtype=dtype, ctx=autocast(device, dtype),
              grad_accum=grad_accum,
              batches=batches, raw_model=raw_model, model=model, eval_model=distributed.eval_module(model),
              optimizer=build_optimizers(raw_model, cfg, device_type),
              scaler=distributed.make_grad_scaler(dist_info, device_type, enabled=(dtype == "float16")),
              model_args=model_args, tok_meta=tok_meta,
              vocab=model_args["vocab_size"] if meta_vocab is None else meta_vocab,
              run_log=RunLog(Path(cfg.out_dir) / LOG_NAME if dist_info.master else None),
              config_dict=config_to_dict(cfg), threads=threads, clip=health.ClipStats(cfg.grad_clip),
              ramp=build_ramp(cfg.batch_ramp_start, cfg.batch_ramp_iters, grad_accum, cfg.batch_size, cfg.block_size,
                              dist_info.world_size),
              probe=health.probe_batch(batches) if cfg.health and not dist_info.fsdp else None)
    return job, ckpt


def _torch_optimizer(job: Job) -> Any:
    # FSDP's state-dict helpers need the torch optimizer itself (only AdamW runs under FSDP)
    return job.optimizer.by_name["adamw"] if job.dist.fsdp else job.optimizer


def _resume(job: Job, ckpt: dict) -> None:
    """Continue the interrupted run: counters, optimizer state, every random stream, the log."""
    job.iter_num, job.best_val_loss = int(ckpt["iter_num"]), float(ckpt["best_val_loss"])
    job.saved_iter, job.best_iter = job.iter_num, ckpt.get("best_iter")
    if ckpt.get("optimizer"):
        distributed.load_optimizer_state(job.raw_model, _torch_optimizer(job), ckpt["optimizer"], job.dist)
    rng = ckpt.get("rng")
    if rng:  # glassgpt checkpoint: continue the exact random streams of the interrupted run
        mine = distributed.rank_rng_state(rng, job.dist)  # None: a rank the saving job did not have
        if mine is not None:
            torch.set_rng_state(mine["torch"])
            cuda = mine.get("cuda")
            if cuda and job.device_type == "cuda" and len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda)
            job.batches.load_state_dict(mine["sampler"])
        job.resumed_at = job.iter_num  # its eval at this iteration already ran before the save
    if job.master:
        # without saved RNG state (a nanoGPT checkpoint) the eval at this iteration runs again
        job.run_log.truncate(job.iter_num, keep_eval=job.resumed_at is not None)


def _rng_state(job: Job) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "sampler": job.batches.state_dict()}
    if job.device_type == "cuda":  # dropout on a GPU draws from the CUDA generators
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _save(job: Job, at_iter: int, path: Path | None = None) -> None:
    """ckpt.pt, or (`path`: a kept checkpoint, glassgpt.kept) the weights without optimizer state."""
    # every rank joins (FSDP gathers its shards, every rank's RNG state is kept); rank 0 writes
    model_sd, optim_sd = distributed.gather_checkpoint(job.raw_model, _torch_optimizer(job), job.dist)
    ranks = distributed.gather_objects(_rng_state(job), job.dist)
    if path is None:
        job.saved_iter = at_iter
    if not job.master:
        return
    path = path or ckpt_path(job.cfg.out_dir)
    save_checkpoint(path, {
        "model": clean_state_dict(model_sd), "optimizer": optim_sd if path.name == "ckpt.pt" else None,
        "model_args": job.model_args, "iter_num": at_iter, "best_val_loss": job.best_val_loss,
        "best_iter": job.best_iter, "config": job.config_dict, "tokenizer": job.tok_meta,
        "rng": {**ranks[0], "ranks": ranks},
    })
    print(f"saved checkpoint to {path}")


def _nonfinite(job: Job, what: str, value: float) -> UserError:
    kept = (f"the last good checkpoint {ckpt_path(job.cfg.out_dir)} (iter {job.saved_iter}) is kept"
            if job.saved_iter is not None else "no checkpoint had been saved")
    return UserError(f"{what} became {value} at iteration {job.iter_num}; training stopped and {kept}. "
                     "Try a lower learning_rate, grad_clip=1.0, or dtype=bfloat16")


def _print_header(job: Job) -> None:
    cfg, raw = job.cfg, job.raw_model
    threads = f", {job.threads} thread{'s' if job.threads != 1 else ''}" if job.threads else ""
    print(f"{raw.get_num_params() / 1e6:.2f}M parameters | {job.tokens_per_iter:,} tokens per iteration "
          f"({job.grad_accum * job.dist.world_size} x {cfg.batch_size} x {cfg.block_size}) | device {job.device}"
          f"{threads}, {job.dtype} | optimizer {cfg.optimizer}, {cfg.lr_schedule} schedule")
    n_tokens = sum(len(d) for d in job.batches.data.values())
    print(advice.suggest(n_tokens, job.device, n_params=raw.get_num_params(), tokens_per_iter=job.tokens_per_iter))
    if job.ramp is not None:
        print(job.ramp.describe())
    print(f"loss is -ln p(correct next token), averaged; uniform guessing over {job.vocab} tokens scores "
          f"ln({job.vocab}) = {math.log(job.vocab):.2f}")


def _evaluate(job: Job, lr: float, wandb: Any) -> dict[str, float]:
    """Every rank evaluates (its share) and decides alike; rank 0 alone prints, logs and writes."""
    losses = estimate_loss(job.eval_model, job.batches, job.cfg.eval_iters, job.ctx, job.dist)
    if job.master:
        print(f"step {job.iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f} "
              f"({explain_loss(losses['val'], job.vocab)})")
        job.run_log.write(iter=job.iter_num, train_loss=losses["train"], val_loss=losses["val"], lr=lr)
        if wandb is not None:
            wandb.log({"iter": job.iter_num, "train/loss": losses["train"], "val/loss": losses["val"], "lr": lr})
    if not math.isfinite(losses["val"]):
        raise _nonfinite(job, "val loss", losses["val"])
    improved = losses["val"] < job.best_val_loss
    if improved:
        job.best_val_loss, job.best_iter = losses["val"], job.iter_num
    if (improved or job.cfg.always_save_checkpoint) and job.iter_num > 0:
        if job.master and not improved and job.saved_iter is not None and job.saved_iter == job.best_iter:
            kept.keep_best(job.cfg.out_dir)  # ckpt.pt is about to hold a worse model: keep the best aside
        _save(job, job.iter_num)
        if job.master and improved:
            kept.drop_best(job.cfg.out_dir)
    if job.master:
        best = kept.best_path(job.cfg.out_dir, job.cfg.always_save_checkpoint) if job.best_iter else None
        warn = health.overfit_warning(job.last_eval, losses, job.best_val_loss, job.best_iter, best)
        if warn:
            print(warn)
    job.last_eval = losses
    return losses


def _step(job: Job, log_iter: bool) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
    """One optimizer step over grad_accum micro-batches: (job loss, grad norm, grad-health norms).
    The norms are computed only at log iterations (the same on every rank: FSDP's norm is collective)."""
    cfg, opt = job.cfg, job.optimizer
    loss_sum = torch.zeros((), device=job.device)
    for micro_step in range(job.grad_accum):
        x, y = job.batches.get_batch("train")
        # DDP all-reduces gradients only on the last micro-step
        with distributed.grad_sync(job.model, sync=micro_step == job.grad_accum - 1):
            with job.ctx:
                _, loss = job.model(x, y)
                loss = loss / job.grad_accum
            loss_sum += loss.detach()
            job.scaler.scale(loss).backward()
    # the job's loss (mean over ranks), so every rank sees the same value and stops alike
    loss_sum = distributed.all_reduce_mean(loss_sum, job.dist)
    norms: dict[str, float] = {}
    grad_norm = None
    if cfg.grad_clip != 0.0 or log_iter:
        opt.unscale_(job.scaler)
        # per-group norms of local tensors are the job's under DDP, not under FSDP's shards
        if log_iter and not job.dist.fsdp:
            norms = group_norms(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(job.raw_model.parameters(), cfg.grad_clip or float("inf"))
        job.clip.update(grad_norm)
    # On the CPU the check is free (every op is synchronous); on GPUs only when logging.
    if job.device_type == "cpu" or log_iter:
        lossf = loss_sum.item()
        if not math.isfinite(lossf):
            raise _nonfinite(job, "loss", lossf)
    before = snapshot(opt) if norms else None
    opt.step(job.scaler)
    job.scaler.update()
    opt.zero_grad(set_to_none=True)
    if before is not None:
        norms.update(group_norms(opt, before))
    return loss_sum, grad_norm, norms


def _log_step(job: Job, loss: torch.Tensor, grad_norm: torch.Tensor | None, norms: dict[str, float],
              lr: float, dt: float, local_iter: int, wandb: Any) -> None:
    cfg = job.cfg
    norms = {**norms, **job.clip.read()}
    if cfg.health and not job.dist.fsdp:
        norms.update(health.layer_norms(job.raw_model, job.probe, job.ctx))
    if job.ramp is not None:
        norms["batch_tokens"] = job.tokens_per_iter
    lossf = float(loss)
    gn = distributed.to_float(grad_norm) if grad_norm is not None else float("nan")
    clipped = cfg.grad_clip != 0.0 and gn > cfg.grad_clip
    tok_s = job.tokens_per_iter / dt  # the whole job's tokens (all ranks) per second
    # MFU = job FLOP/s over (world_size x one device's peak) = per-device rate over one peak
    peak = device_peak_flops(job.device, job.dtype)
    mfu = job.raw_model.estimate_mfu(tok_s / job.dist.world_size, peak) if local_iter >= 5 else None
    mfu_s = f", mfu {mfu * 100:.1f}%" if mfu is not None else ""
    print(f"iter {job.iter_num}: loss {lossf:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms, "
          f"{job.tokens_per_iter / dt:,.0f} tok/s"
          f"{mfu_s}, |g| {gn:.2f}{' (clipped)' if clipped else ''}")
    job.run_log.write(iter=job.iter_num, loss=lossf, lr=lr, ms=dt * 1000, tok_s=tok_s, grad_norm=gn, clipped=clipped,
                      **({"mfu": mfu} if mfu is not None else {}), **norms)
    if wandb is not None:
        wandb.log({"iter": job.iter_num, "train/batch_loss": lossf, "grad_norm": gn, "tok_s": tok_s, **norms})


def _start_wandb(job: Job) -> Any:
    if not (job.master and job.cfg.wandb_log):
        return None
    try:
        import wandb
    except ImportError:
        raise UserError("wandb_log=True but wandb is not installed; "
                        "`pip install wandb` or pass --wandb_log=False") from None
    wandb.init(project=job.cfg.wandb_project, name=job.cfg.wandb_run_name, config=job.config_dict)
    return wandb


def _train(cfg: TrainConfig, dist_info: distributed.DistInfo) -> dict[str, Any]:
    job, ckpt = _setup(cfg, dist_info)
    if ckpt is not None:
        _resume(job, ckpt)
        ckpt = None  # free memory
    if job.master:
        _print_header(job)
    wandb = _start_wandb(job)
    last_eval: dict[str, float] = {}
    t0 = run_t0 = time.time()
    local_iter = 0
    while True:
        lr = get_lr(job.iter_num, cfg)
        job.optimizer.set_lr(lr, cfg)
        if (job.iter_num % cfg.eval_interval == 0 or job.iter_num >= cfg.max_iters) and job.iter_num != job.resumed_at:
            last_eval = _evaluate(job, lr, wandb)
        if cfg.keep_every and job.iter_num % cfg.keep_every == 0 and 0 < job.iter_num != job.resumed_at:
            _save(job, job.iter_num, kept.kept_path(cfg.out_dir, job.iter_num))
        if cfg.eval_only or job.iter_num >= cfg.max_iters:
            break
        log_iter = job.iter_num % cfg.log_interval == 0
        if job.ramp is not None:
            job.grad_accum = job.ramp.micro_steps(job.iter_num)
        loss, grad_norm, norms = _step(job, log_iter)
        t1 = time.time()
        dt, t0 = t1 - t0, t1
        if log_iter and job.master:
            _log_step(job, loss, grad_norm, norms, lr, dt, local_iter, wandb)
        job.iter_num += 1
        local_iter += 1
    return _finish(job, wandb, local_iter, time.time() - run_t0, last_eval)


def _finish(job: Job, wandb: Any, local_iter: int, elapsed: float, last_eval: dict[str, float]) -> dict[str, Any]:
    out_dir = Path(job.cfg.out_dir)
    if job.master and job.cfg.plot and local_iter > 0:
        log_path = out_dir / LOG_NAME
        records = [json.loads(line) for line in (log_path.read_text().splitlines() if log_path.exists() else [])]
        plot_losses(records, out_dir / "loss.png")
        health.plot_health(records, out_dir / "health.png", job.cfg.grad_clip)
    if wandb is not None:
        wandb.finish()
    summary = job.clip.summary()
    if job.master and summary and local_iter:
        print(summary)
    if job.master and local_iter:
        print(f"done: {local_iter} iterations in {elapsed:.1f} s ({elapsed / local_iter * 1000:.1f} ms/iter), "
              f"best val loss {job.best_val_loss:.4f}")
    return {"iter_num": job.iter_num, "best_val_loss": job.best_val_loss, "last_eval": last_eval,
            "log": job.run_log.records, "elapsed": elapsed}


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(TrainConfig, argv, "train.py"):
        return None
    cfg = load_config(TrainConfig, argv)
    return train(cfg)


if __name__ == "__main__":
    sys.exit(distributed.finish_process(run_main(main)))
