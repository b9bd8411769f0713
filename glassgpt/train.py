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
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from glassgpt import distributed
from glassgpt.checkpoint import ckpt_path, clean_state_dict, load_checkpoint, model_from_checkpoint, save_checkpoint
from glassgpt.config import TrainConfig, config_to_dict, load_config, wants_help
from glassgpt.data import BatchSampler, data_dir_for, require_prepared
from glassgpt.errors import UserError, run_main
from glassgpt.model import GPT, GPTConfig, device_peak_flops
from glassgpt.runtime import autocast, resolve_device, resolve_dtype
from glassgpt.tokenizer import read_meta

LOG_NAME = "log.jsonl"


def get_lr(it: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay from learning_rate to min_lr at lr_decay_iters, then flat."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it > cfg.lr_decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)


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
                x, y = batches.get_batch(split, gen)  # every rank draws every batch to stay in step
            if k % world == rank:
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


@dataclass
class RunLog:
    """Metrics as JSON lines in out_dir/log.jsonl (appended across resumes) and in memory."""

    path: Path | None
    records: list[dict] = field(default_factory=list)

    def write(self, **rec: Any) -> None:
        self.records.append(rec)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")


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
    ckpt = None
    if cfg.init_from == "scratch":
        if meta_vocab is None:
            print("no vocab_size in the dataset's metadata: using GPT-2's 50304 (50257 rounded up for efficiency)")
        args = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
                    bias=cfg.bias, vocab_size=meta_vocab or 50304, dropout=cfg.dropout,
                    activation=cfg.activation or "gelu")
        try:
            model = GPT(GPTConfig(**args))
        except ValueError as e:
            raise UserError(str(e)) from None
    elif cfg.init_from == "resume":
        ckpt = load_checkpoint(ckpt_path(cfg.out_dir), map_location="cpu")
        trained_block = int(ckpt["model_args"]["block_size"])
        if cfg.block_size > trained_block:
            raise UserError(f"block_size={cfg.block_size} is larger than the checkpoint's {trained_block}; grow it "
                            f"first with `glassgpt extend-context --out_dir={cfg.out_dir} --block_size={cfg.block_size}`")
        # nanoGPT: the architecture comes from the checkpoint, only dropout may change
        model = model_from_checkpoint(ckpt, dropout=cfg.dropout, activation=cfg.activation)
        if cfg.block_size < trained_block:
            model.crop_block_size(cfg.block_size)
        args = model.config.to_dict()
    else:
        from glassgpt.pretrained import from_pretrained

        model = from_pretrained(cfg.init_from, {"dropout": cfg.dropout})
        if cfg.block_size < model.config.block_size:
            model.crop_block_size(cfg.block_size)
        args = model.config.to_dict()
    cfg.block_size = model.config.block_size
    if cfg.init_from != "scratch":
        from glassgpt.pretrained import check_vocab

        # data the model cannot embed, or tokenized another way than the model was trained on
        check_vocab(model.config.vocab_size, meta, ckpt.get("tokenizer") if ckpt else None)
    return model, ckpt, args


def plot_losses(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [(r["iter"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["iter"], r["train_loss"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if steps:
        ax.plot(*zip(*steps), lw=0.8, alpha=0.6, label="train (batch)")
    if evals:
        it, tr, va = zip(*evals)
        ax.plot(it, tr, "o-", label="train (eval)")
        ax.plot(it, va, "o-", label="val (eval)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run a training job; returns {'iter_num', 'best_val_loss', 'last_eval', 'log': [records]}."""
    dist_info = distributed.setup(cfg.backend, resolve_device(cfg.device), cfg.parallel)
    finished = False
    try:
        result = _train(cfg, dist_info)
        finished = True
        return result
    finally:
        distributed.teardown(dist_info, finished)


def _train(cfg: TrainConfig, dist_info: distributed.DistInfo) -> dict[str, Any]:
    device = dist_info.device
    device_type = "cuda" if device.startswith("cuda") else device.split(":")[0]
    dtype = resolve_dtype(cfg.dtype, device)
    master = dist_info.master
    grad_accum = distributed.split_grad_accum(cfg.gradient_accumulation_steps, dist_info.world_size)
    if master:
        check_out_dir(cfg.out_dir)
    torch.manual_seed(cfg.seed + dist_info.rank)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ctx = autocast(device, dtype)

    data_dir = data_dir_for(cfg.dataset, cfg.data_dir)
    require_prepared(data_dir)
    meta = read_meta(data_dir)
    meta_vocab = int(meta["vocab_size"]) if meta and "vocab_size" in meta else None

    model, ckpt, model_args = build_model(cfg, meta)
    batches = BatchSampler(data_dir, cfg.block_size, cfg.batch_size, device, cfg.seed, dist_info.rank)
    model.to(device)
    raw_model = model
    if cfg.compile:
        print("compiling the model... (takes a ~minute)")
    # compiled and/or DDP-wrapped, or sharded in place by FSDP (so the optimizer comes after this)
    model = distributed.wrap_model(raw_model, dist_info, dtype, compile=cfg.compile)
    eval_model = distributed.eval_module(model)
    scaler = distributed.make_grad_scaler(dist_info, device_type, enabled=(dtype == "float16"))
    optimizer = raw_model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type)

    iter_num, best_val_loss, resumed_at = 0, 1e9, None
    if ckpt is not None:
        iter_num, best_val_loss = int(ckpt["iter_num"]), float(ckpt["best_val_loss"])
        if ckpt.get("optimizer"):
            distributed.load_optimizer_state(raw_model, optimizer, ckpt["optimizer"], dist_info)
        rng = ckpt.get("rng")
        if rng:  # glassgpt checkpoint: continue the exact random streams of the interrupted run
            mine = distributed.rank_rng_state(rng, dist_info)  # None: a rank the saving job did not have
            if mine is not None:
                torch.set_rng_state(mine["torch"])
                batches.load_state_dict(mine["sampler"])
            resumed_at = iter_num  # its eval at this iteration already ran before the save
        ckpt = None  # free memory

    vocab = model_args["vocab_size"] if meta_vocab is None else meta_vocab
    tokens_per_iter = grad_accum * dist_info.world_size * cfg.batch_size * cfg.block_size
    peak = device_peak_flops(device, dtype)
    run_log = RunLog(Path(cfg.out_dir) / LOG_NAME if master else None)
    config_dict = config_to_dict(cfg)
    tok_meta = {k: v for k, v in (meta or {"tokenizer": "gpt2"}).items() if k in ("tokenizer", "vocab_size", "stoi", "itos", "eot_token")}
    if master:
        print(f"{raw_model.get_num_params() / 1e6:.2f}M parameters | {tokens_per_iter:,} tokens per iteration "
              f"({grad_accum * dist_info.world_size} x {cfg.batch_size} x {cfg.block_size}) | device {device}, {dtype}")
        print(f"loss is -ln p(correct next token), averaged; uniform guessing over {vocab} tokens scores "
              f"ln({vocab}) = {math.log(vocab):.2f}")
        if cfg.wandb_log:
            try:
                import wandb
            except ImportError:
                raise UserError("wandb_log=True but wandb is not installed; `pip install wandb` or pass --wandb_log=False") from None
            wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=config_dict)

    def save(at_iter: int) -> None:
        # every rank joins (FSDP gathers its shards, every rank's RNG state is kept); rank 0 writes
        model_sd, optim_sd = distributed.gather_checkpoint(raw_model, optimizer, dist_info)
        ranks = distributed.gather_objects({"torch": torch.get_rng_state(), "sampler": batches.state_dict()}, dist_info)
        if not master:
            return
        save_checkpoint(ckpt_path(cfg.out_dir), {
            "model": clean_state_dict(model_sd), "optimizer": optim_sd,
            "model_args": model_args, "iter_num": at_iter, "best_val_loss": best_val_loss,
            "config": config_dict, "tokenizer": tok_meta,
            "rng": {**ranks[0], "ranks": ranks},
        })

    def nonfinite(what: str, value: float) -> UserError:
        path = ckpt_path(cfg.out_dir)
        kept = (f"the last good checkpoint {path} (iter {json.loads(path.with_suffix('.json').read_text())['iter_num']}) is kept"
                if path.with_suffix(".json").exists() else "no checkpoint had been saved")
        return UserError(f"{what} became {value} at iteration {iter_num}; training stopped and {kept}. "
                         "Try a lower learning_rate, grad_clip=1.0, or dtype=bfloat16")

    last_eval: dict[str, float] = {}
    t0 = time.time()
    run_t0 = t0
    local_iter = 0
    while True:
        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # every rank evaluates (its share) and decides alike; rank 0 alone prints, logs and writes
        if (iter_num % cfg.eval_interval == 0 or iter_num >= cfg.max_iters) and iter_num != resumed_at:
            losses = estimate_loss(eval_model, batches, cfg.eval_iters, ctx, dist_info)
            last_eval = losses
            if master:
                print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f} "
                      f"({explain_loss(losses['val'], vocab)})")
                run_log.write(iter=iter_num, train_loss=losses["train"], val_loss=losses["val"], lr=lr)
                if cfg.wandb_log:
                    wandb.log({"iter": iter_num, "train/loss": losses["train"], "val/loss": losses["val"], "lr": lr})
            if not math.isfinite(losses["val"]):
                raise nonfinite("val loss", losses["val"])
            if losses["val"] < best_val_loss or cfg.always_save_checkpoint:
                best_val_loss = min(best_val_loss, losses["val"])
                if iter_num > 0:
                    save(iter_num)
                    if master:
                        print(f"saved checkpoint to {ckpt_path(cfg.out_dir)}")
        if cfg.eval_only or iter_num >= cfg.max_iters:
            break

        loss_sum = torch.zeros((), device=device)
        for micro_step in range(grad_accum):
            x, y = batches.get_batch("train")
            # DDP all-reduces gradients only on the last micro-step
            with distributed.grad_sync(model, sync=micro_step == grad_accum - 1):
                with ctx:
                    _, loss = model(x, y)
                    loss = loss / grad_accum
                loss_sum += loss.detach()
                scaler.scale(loss).backward()
        # the job's loss (mean over ranks), so every rank sees the same value and stops alike
        loss_sum = distributed.all_reduce_mean(loss_sum, dist_info)
        log_iter = iter_num % cfg.log_interval == 0  # the same on every rank: FSDP's norm is collective
        log_now = log_iter and master
        grad_norm = None
        if cfg.grad_clip != 0.0 or log_iter:
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or float("inf"))
        # On the CPU the check is free (every op is synchronous); on GPUs only when logging.
        if device_type == "cpu" or log_iter:
            lossf = loss_sum.item()
            if not math.isfinite(lossf):
                raise nonfinite("loss", lossf)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        t1 = time.time()
        dt, t0 = t1 - t0, t1
        if log_now:
            gn = distributed.to_float(grad_norm) if grad_norm is not None else float("nan")
            clipped = cfg.grad_clip != 0.0 and gn > cfg.grad_clip
            tok_s = tokens_per_iter / dt  # the whole job's tokens (all ranks) per second
            # MFU = job FLOP/s over (world_size x one device's peak) = per-device rate over one peak
            mfu = raw_model.estimate_mfu(tok_s / dist_info.world_size, peak) if local_iter >= 5 else None
            mfu_s = f", mfu {mfu * 100:.1f}%" if mfu is not None else ""
            print(f"iter {iter_num}: loss {lossf:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms, {tok_s:,.0f} tok/s{mfu_s}, "
                  f"|g| {gn:.2f}{' (clipped)' if clipped else ''}")
            run_log.write(iter=iter_num, loss=lossf, lr=lr, ms=dt * 1000, tok_s=tok_s, grad_norm=gn, clipped=clipped,
                          **({"mfu": mfu} if mfu is not None else {}))
            if cfg.wandb_log:
                wandb.log({"iter": iter_num, "train/batch_loss": lossf, "grad_norm": gn, "tok_s": tok_s})
        iter_num += 1
        local_iter += 1

    if master and cfg.plot and local_iter > 0:
        records = []
        log_path = Path(cfg.out_dir) / LOG_NAME
        for line in log_path.read_text().splitlines() if log_path.exists() else []:
            records.append(json.loads(line))
        plot_losses(records, Path(cfg.out_dir) / "loss.png")
    if master and cfg.wandb_log:
        wandb.finish()
    elapsed = time.time() - run_t0
    if master and local_iter:
        print(f"done: {local_iter} iterations in {elapsed:.1f} s ({elapsed / local_iter * 1000:.1f} ms/iter), "
              f"best val loss {best_val_loss:.4f}")
    return {"iter_num": iter_num, "best_val_loss": best_val_loss, "last_eval": last_eval,
            "log": run_log.records, "elapsed": elapsed}


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(TrainConfig, argv, "train.py"):
        return None
    cfg = load_config(TrainConfig, argv)
    return train(cfg)


if __name__ == "__main__":
    sys.exit(distributed.finish_process(run_main(main)))
