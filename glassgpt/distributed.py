"""One training job over several processes: PyTorch DDP or FSDP2, launched by torchrun.

    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py                      # DDP
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py --parallel=fsdp      # sharded
    torchrun --nnodes=2 --node_rank=0 --master_addr=10.0.0.1 --master_port=29500 \\
        --nproc_per_node=8 train.py config/train_gpt2.py                                         # docs/distributed.md

torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; without them this is one process and every helper here
is a no-op, so glassgpt/train.py reads the same either way. What each rank does:

- trains on its own micro-batches (BatchSampler seeds its stream with seed + rank) and does
  gradient_accumulation_steps / world_size of the job's micro-steps (`split_grad_accum`);
- DDP all-reduces gradients only on the last micro-step (`grad_sync`); FSDP reduce-scatters every
  micro-step, which keeps only a shard of the gradients in memory;
- takes part in every evaluation (each rank scores its share of the same fixed batches, and the
  sums are all-reduced: `all_reduce_sum`), so no rank waits alone in a collective, FSDP's collective
  forward passes line up, and the eval loss does not depend on the world size;
- joins the gathering of a checkpoint (`gather_checkpoint`): FSDP's shards are consolidated into
  the plain single-device `ckpt.pt` layout, which resumes on any world size and loads in sample.py.
Rank 0 alone prints, logs and writes files.

If a rank raises, its process group is torn down in `train()`'s `finally`; the other ranks fail at
their next collective (gloo: the peer's socket closes) or after the process-group timeout
(GLASSGPT_DIST_TIMEOUT seconds, default 600), and torchrun stops the job and names the failing rank.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from glassgpt.errors import UserError

TIMEOUT_ENV = "GLASSGPT_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0  # long enough for rank 0 to write a large checkpoint while the others wait
PARAM_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class DistInfo:
    enabled: bool
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    parallel: str = "ddp"

    @property
    def master(self) -> bool:
        """Rank 0 logs and writes checkpoints."""
        return self.rank == 0

    @property
    def fsdp(self) -> bool:
        return self.enabled and self.parallel == "fsdp"


def timeout_seconds() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise UserError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds; e.g. {TIMEOUT_ENV}=600") from None
    if value <= 0:
        raise UserError(f"{TIMEOUT_ENV}={raw} must be positive")
    return value


def setup(backend: str, device: str, parallel: str = "ddp") -> DistInfo:
    """Join the process group if launched by torchrun; pick this rank's device (one per local rank)."""
    if int(os.environ.get("RANK", -1)) == -1:
        return DistInfo(enabled=False, device=device, parallel=parallel)
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    timeout = timedelta(seconds=timeout_seconds())
    kwargs: dict[str, Any] = {}
    if device.startswith("cuda"):
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPUs; "
                            f"use --nproc_per_node={torch.cuda.device_count()} or fewer")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
        kwargs["device_id"] = torch.device(device)  # binds the NCCL communicator to this GPU up front
    elif backend == "nccl":
        backend = "gloo"  # nccl needs GPUs; gloo is PyTorch's CPU backend
    dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
    return DistInfo(enabled=True, rank=rank, local_rank=local_rank, world_size=world, device=device,
                    parallel=parallel)


def split_grad_accum(steps: int, world_size: int) -> int:
    """gradient_accumulation_steps counts micro-steps of the whole job; each rank does its share."""
    if steps % world_size:
        raise UserError(f"gradient_accumulation_steps={steps} is not divisible by the {world_size} processes; "
                        f"use a multiple of {world_size}")
    return steps // world_size


def teardown(info: DistInfo, finished: bool = False) -> None:
    """Leave the process group, also when this rank is failing (called from a `finally`).

    After a finished job the ranks first wait for each other (rank 0 may still be writing the last
    checkpoint): a gloo rank that tears down while a peer is still connected can abort at exit."""
    if info.enabled and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def finish_process(code: int) -> int:
    """End a torchrun worker with os._exit once its work is done and the process group destroyed.

    At interpreter shutdown gloo's threads can still hold work objects whose tensors need the GIL;
    finalization then aborts the rank ("terminate called without an active exception", SIGABRT, about
    1 run in 6 here), failing a job that finished (see pytorch/pytorch#179291). Checkpoints and logs are
    already on disk (written atomically) by then. A plain single process returns `code` normally."""
    if int(os.environ.get("RANK", -1)) == -1:
        return code
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# --- wrapping the model -------------------------------------------------------------------------

def broadcast_module_states(module: nn.Module, src: int = 0) -> None:
    """Give every rank rank `src`'s parameters and buffers (DDP does this itself; FSDP does not)."""
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=src)


def wrap_model(model: nn.Module, info: DistInfo, dtype: str, compile: bool = False) -> nn.Module:
    """The module to train: `model` compiled and/or wrapped in DDP, or sharded in place with FSDP2.

    FSDP2 (`fully_shard`, https://pytorch.org/docs/stable/distributed.fsdp.fully_shard.html) shards
    each transformer Block and then the root, so a Block's weights are all-gathered just for its own
    forward and backward. The root holds wte, wpe, ln_f and lm_head: weight tying (lm_head.weight is
    transformer.wte.weight) survives because both names live in the same root shard group.
    """
    if info.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        broadcast_module_states(model)  # ranks were seeded differently; start from rank 0's weights
        device_type = torch.device(info.device).type
        mesh = init_device_mesh(device_type, (info.world_size,))
        # Compute in the training dtype, but reduce gradients in fp32 so averaging over ranks loses nothing.
        mp = MixedPrecisionPolicy(param_dtype=PARAM_DTYPES.get(dtype), reduce_dtype=torch.float32)
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        return torch.compile(model) if compile else model  # type: ignore[return-value]
    if compile:
        model = torch.compile(model)  # type: ignore[assignment]
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        cuda = info.device.startswith("cuda")
        model = DDP(model, device_ids=[info.local_rank] if cuda else None)
    return model


def eval_module(model: nn.Module) -> nn.Module:
    """The module to evaluate with. DDP's wrapper is skipped: every rank holds the full weights, and
    an eval forward must not join DDP's collectives. FSDP's forward is itself collective."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return model.module if isinstance(model, DDP) else model


def grad_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Context for one micro-step's forward+backward: DDP skips its gradient all-reduce unless `sync`
    (the last micro-step), as nanoGPT's require_backward_grad_sync flag did. FSDP always reduces."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if isinstance(model, DDP) and not sync:
        return model.no_sync()
    return contextlib.nullcontext()


def make_grad_scaler(info: DistInfo, device_type: str, enabled: bool) -> torch.amp.GradScaler:
    """fp16 needs loss scaling; under FSDP each rank holds other gradient shards, so the scaler must
    agree across ranks on whether any shard overflowed (ShardedGradScaler all-reduces that flag)."""
    if info.fsdp and enabled:
        return _sharded_grad_scaler(device_type)
    return torch.amp.GradScaler(device_type, enabled=enabled)


def _sharded_grad_scaler(device_type: str) -> torch.amp.GradScaler:
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    class FusedSafeShardedGradScaler(ShardedGradScaler):
        """ShardedGradScaler for fused AdamW. In torch 2.13 its found-inf flag is the *sum* over ranks
        with shape [1]; the fused step skips only when the flag is exactly 1 and cannot subtract a [1]
        from its 0-d step counters ("output with shape [] doesn't match the broadcast shape [1]"), so
        an overflow on 2 ranks would be stepped into NaN weights. Make it a 0-d 0/1 flag. Only unscale_
        all-reduces the flag over the ranks, so step() always goes through it."""

        def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
            super().unscale_(optimizer)
            state = self._per_optimizer_states[id(optimizer)]
            state["found_inf_per_device"] = {d: (t > 0).to(t.dtype).reshape(())
                                             for d, t in state["found_inf_per_device"].items()}

        def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
            if self._enabled and self._per_optimizer_states[id(optimizer)]["stage"].name == "READY":
                self.unscale_(optimizer)
            return super().step(optimizer, *args, **kwargs)

    scaler = FusedSafeShardedGradScaler(device_type, enabled=True)
    check_scaler_internals(scaler)
    return scaler


def check_scaler_internals(scaler: torch.amp.GradScaler) -> None:
    """FusedSafeShardedGradScaler reads GradScaler's private per-optimizer state (torch 2.9-2.13; pinned
    by tests/test_torch_private_api.py): fail at start-up with the reason, not mid-run with a KeyError."""
    from torch.amp.grad_scaler import OptState

    if not isinstance(getattr(scaler, "_per_optimizer_states", None), dict) or "READY" not in OptState.__members__:
        raise RuntimeError(f"torch {torch.__version__} changed GradScaler's private _per_optimizer_states / "
                           "OptState.READY, which FusedSafeShardedGradScaler relies on; use a torch from 2.9 to 2.13 "
                           "or --dtype=bfloat16 (no loss scaling)")


# --- metrics ------------------------------------------------------------------------------------

def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum `t` over all ranks (in place, returned); the identity for one process."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Average `t` over all ranks: the whole job's loss, not rank 0's share of it."""
    return all_reduce_sum(t, info) / info.world_size


def to_float(t: torch.Tensor) -> float:
    """A scalar as a float; FSDP's clip_grad_norm_ returns a replicated DTensor."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return float(t.item())


# --- checkpoints --------------------------------------------------------------------------------

def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """[rank 0's obj, rank 1's, ...] on every rank (small picklable objects: RNG states)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def gather_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer,
                      info: DistInfo) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model state dict, optimizer state dict) in the single-device layout, complete on rank 0.

    Every rank must call this under FSDP: the full tensors are all-gathered shard by shard and kept
    on rank 0's CPU (cpu_offload), so the file is the one a single-device run writes. The optimizer
    state comes back keyed by parameter name and is renumbered to torch's usual 0..n-1 ids.
    """
    if not info.fsdp:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=opts)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=opts)
    if not info.master:
        return {}, {}
    # gathered per name, a tied weight comes back as two copies: store it once, as a plain model does
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first and name in model_sd:
            model_sd[name] = model_sd[first[id(p)]]
        first.setdefault(id(p), name)
    return model_sd, optim_state_names_to_ids(optim_sd)  # type: ignore[return-value]


def optim_state_names_to_ids(named: dict[str, Any]) -> dict[str, Any]:
    """torch.distributed.checkpoint's {param name: state} -> Optimizer.state_dict()'s {index: state};
    indices count the parameters through the param groups in order, as Optimizer.state_dict does."""
    ids: dict[str, int] = {}
    groups = []
    for g in named["param_groups"]:
        groups.append({**g, "params": [ids.setdefault(name, len(ids)) for name in g["params"]]})
    return {"state": {ids[name]: s for name, s in named["state"].items()}, "param_groups": groups}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                         info: DistInfo) -> None:
    """Load a single-device optimizer state dict (from any world size) into this rank's optimizer;
    under FSDP every rank passes the full state and keeps its own shard of it."""
    if not info.fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    name_of = {id(p): n for n, p in model.named_parameters()}
    index_to_name = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
    named = {"state": {index_to_name[int(i)]: s for i, s in state["state"].items()},
             "param_groups": [{**g, "params": [index_to_name[int(i)] for i in g["params"]]}
                              for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, optim_state_dict=named,  # type: ignore[arg-type]
                             options=StateDictOptions(full_state_dict=True))


def rank_rng_state(rng: dict[str, Any] | None, info: DistInfo) -> dict[str, Any] | None:
    """This rank's saved {'torch', 'sampler'} RNG states, or None when the checkpoint has none for it.

    A checkpoint holds every rank's states (`ranks`; older ones only rank 0's at top level). On the
    same world size each rank continues exactly; on a different one, ranks that existed continue
    their streams and new ranks start fresh ones.
    """
    if not rng:
        return None
    ranks = rng.get("ranks") or [{"torch": rng["torch"], "sampler": rng["sampler"]}]
    return ranks[info.rank] if info.rank < len(ranks) else None
