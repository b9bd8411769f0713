"""Multi-process training on CPU (gloo, 2 processes, a 2-layer model) against a single process.

The jobs run exactly as users launch them, `python -m torch.distributed.run --standalone
--nproc_per_node=2 train.py ...`, each under a timeout so a hang fails the test instead of stalling it.
The single-process oracle is `train()` itself with 2k accumulation steps, fed the same micro-batches
the two ranks draw (rank r's stream is seed + r, k micro-batches per iteration each).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import glassgpt.train as train_mod
from glassgpt import distributed
from glassgpt.checkpoint import load_checkpoint
from glassgpt.config import TrainConfig
from glassgpt.data import BatchSampler
from glassgpt.errors import UserError
from glassgpt.train import train
from tests.conftest import make_char_dataset

REPO = Path(__file__).resolve().parents[1]
WORLD, K = 2, 2  # 2 ranks x 2 micro-steps == 1 process x 4 micro-steps
TIMEOUT = 180  # seconds for one whole job on the shared 2-core machine; a hang fails the test
BASE = dict(device="cpu", compile=False, n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=4,
            gradient_accumulation_steps=WORLD * K, max_iters=4, lr_decay_iters=20, warmup_iters=2,
            eval_interval=2, eval_iters=3, log_interval=1, learning_rate=1e-3, plot=False, dropout=0.0,
            always_save_checkpoint=True)


def job_args(data_dir: Path, out_dir: Path, **kw) -> list[str]:
    opts = {**BASE, "data_dir": str(data_dir), "dataset": data_dir.name, "out_dir": str(out_dir), **kw}
    return [f"--{k}={v}" for k, v in opts.items()]


def job_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}


def torchrun(args: list[str], script: str | Path = "train.py", nproc: int = WORLD, timeout: float = TIMEOUT,
             **env: str) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --standalone --nproc_per_node=N script args`, output captured."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), *args]
    return subprocess.run(cmd, cwd=REPO, env=job_env(**env), capture_output=True, text=True, timeout=timeout)


def must_succeed(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, f"exit {r.returncode}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}"


def read_log(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


class RanksInOrder(BatchSampler):
    """One process drawing, within each iteration, rank 0's K training micro-batches, then rank 1's...:
    exactly the micro-batches a WORLD-process job trains on (BatchSampler seeds rank r with seed + r)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.rank_gens = [torch.Generator().manual_seed(self.seed + r) for r in range(WORLD)]
        self.micro = 0

    def get_batch(self, split, gen=None):
        if split == "train" and gen is None:
            gen = self.rank_gens[(self.micro // K) % WORLD]
            self.micro += 1
        return super().get_batch(split, gen)


@pytest.fixture
def one_thread():
    """In-process runs use one thread, as each torchrun worker does (OMP_NUM_THREADS=1): on the shared
    2-core machine a 2-thread pool spinning against other jobs is what makes tiny runs slow."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One dataset; a 2-process DDP job and a 2-process FSDP job over it, 4 iterations each."""
    root = tmp_path_factory.mktemp("dist")
    data = make_char_dataset(root / "data" / "tiny_char")
    out = {"data": data}
    for mode in ("ddp", "fsdp"):
        out[mode] = root / mode
        t0 = time.time()
        must_succeed(torchrun(job_args(data, out[mode], parallel=mode)))
        print(f"2-process {mode} job: {time.time() - t0:.1f} s")
    return out


@pytest.fixture(scope="module")
def reference(runs, tmp_path_factory) -> list[dict]:
    """1 process, WORLD*K accumulation steps, the same micro-batches as the 2-process jobs."""
    mp = pytest.MonkeyPatch()
    mp.setattr(train_mod, "BatchSampler", RanksInOrder)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("ref")
        return train(TrainConfig(**{**BASE, "data_dir": str(runs["data"]), "dataset": "tiny_char",
                                    "out_dir": str(out)}))["log"]
    finally:
        torch.set_num_threads(threads)
        mp.undo()


def compare_logs(got: list[dict], want: list[dict], what: str, tol: float = 1e-5) -> None:
    keys = ("loss", "grad_norm", "train_loss", "val_loss")
    assert [(r["iter"], sorted(k for k in keys if k in r)) for r in got] == \
           [(r["iter"], sorted(k for k in keys if k in r)) for r in want]
    diff = max(abs(g[k] - w[k]) for g, w in zip(got, want) for k in keys if k in w)
    print(f"{what} vs 1 process x {WORLD * K} micro-steps: max |difference| over loss, grad norm, eval = {diff:.3g}")
    assert diff <= tol, f"{what}: max difference {diff} > {tol}"
    losses = [r["loss"] for r in got if "loss" in r]
    assert losses[-1] < losses[0]  # and it is learning, not comparing two constant runs


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one_process_with_twice_the_accumulation(runs, reference, mode):
    compare_logs(read_log(runs[mode]), reference, f"2-process {mode}")


def test_fsdp_checkpoint_is_the_single_device_checkpoint(runs):
    """FSDP's gathered checkpoint holds the same tensors as DDP's (which are plain state dicts),
    in the same layout, with the tied embedding stored once."""
    a, b = load_checkpoint(runs["ddp"], with_optimizer=True), load_checkpoint(runs["fsdp"], with_optimizer=True)
    assert a["iter_num"] == b["iter_num"] == 4
    assert sorted(a["model"]) == sorted(b["model"])
    assert b["model"]["lm_head.weight"].data_ptr() == b["model"]["transformer.wte.weight"].data_ptr()
    model_diff = max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sorted(sa) == sorted(sb) and [g["params"] for g in a["optimizer"]["param_groups"]] == \
           [g["params"] for g in b["optimizer"]["param_groups"]]
    optim_diff = max((sa[i][n] - sb[i][n]).abs().max().item() for i in sa for n in ("exp_avg", "exp_avg_sq"))
    print(f"DDP vs FSDP checkpoint: max |weight diff| {model_diff:.3g}, max |Adam moment diff| {optim_diff:.3g}")
    assert model_diff < 1e-5 and optim_diff < 1e-5
    assert len(b["rng"]["ranks"]) == WORLD


def test_resume_two_process_checkpoints_in_one_process(runs, tmp_path, one_thread):
    """Both 2-process checkpoints resume in a plain 1-process run and continue identically (same
    weights, same Adam state, rank 0's data stream); sample.py loads them on one device."""
    import shutil

    from glassgpt.sample import main as sample_main

    results = {}
    for mode in ("ddp", "fsdp"):
        out = tmp_path / mode
        shutil.copytree(runs[mode], out)
        res = train(TrainConfig(**{**BASE, "data_dir": str(runs["data"]), "dataset": "tiny_char",
                                   "out_dir": str(out), "init_from": "resume", "max_iters": 6,
                                   "gradient_accumulation_steps": K}))
        assert res["iter_num"] == 6
        results[mode] = [r for r in res["log"] if "loss" in r]
        assert [r["iter"] for r in results[mode]] == [4, 5]
        texts = sample_main([f"--out_dir={out}", "--device=cpu", "--num_samples=1", "--max_new_tokens=8",
                             "--stream=False", "--seed=1"])
        assert len(texts) == 1 and len(texts[0]) >= 8
    diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(results["ddp"], results["fsdp"]))
    print(f"1-process continuation of the DDP vs the FSDP checkpoint: max |loss diff| {diff:.3g}")
    assert diff < 1e-5
    # and the continuation carries on from where the 2-process job was, not from scratch
    last = read_log(runs["ddp"])
    assert abs(results["ddp"][0]["loss"] - [r["loss"] for r in last if "loss" in r][-1]) < 0.3


@pytest.mark.slow  # two more 2-process jobs (~30 s on the shared machine)
def test_resume_on_two_processes_is_exact(runs, tmp_path):
    """Same world size: every rank continues its own saved streams, so 2 + 2 iterations == 4 straight."""
    half = tmp_path / "half"
    must_succeed(torchrun(job_args(runs["data"], half, max_iters=2)))
    must_succeed(torchrun(job_args(runs["data"], half, max_iters=4, init_from="resume")))
    got = [(r["iter"], r["loss"]) for r in read_log(half) if "loss" in r]
    want = [(r["iter"], r["loss"]) for r in read_log(runs["ddp"]) if "loss" in r]
    assert [i for i, _ in got] == [i for i, _ in want]
    diff = max(abs(a - b) for (_, a), (_, b) in zip(got, want))
    print(f"2-process resume vs straight run: max |loss diff| {diff:.3g}")
    assert diff < 1e-6


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_fsdp_mixed_precision_trains(runs, reference, tmp_path, dtype):
    """FSDP's MixedPrecisionPolicy (params gathered in bf16/fp16, gradients reduced in fp32) on gloo.
    fp16's first step overflows at the initial loss scale and must be skipped on every rank (the
    sharded scaler's flag), not stepped into NaN weights; then both track the fp32 run."""
    out = tmp_path / dtype
    must_succeed(torchrun(job_args(runs["data"], out, parallel="fsdp", dtype=dtype, max_iters=6)))
    log = read_log(out)
    steps = [r for r in log if "loss" in r]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    if dtype == "float16":
        assert steps[0]["grad_norm"] != steps[0]["grad_norm"]  # NaN: the overflowing step, skipped
    evals = [r["val_loss"] for r in log if "val_loss" in r]
    ref = [r["val_loss"] for r in reference if "val_loss" in r]
    diff = abs(evals[2] - ref[2])  # after 4 iterations
    print(f"FSDP {dtype}: val loss {evals} (fp32 single process at iter 4: {ref[2]:.4f}, |diff| {diff:.3g})")
    assert evals[-1] < evals[0] - 0.1
    assert diff < 0.05


FAULTY = """
import os, sys
import glassgpt.model as m
from glassgpt.errors import run_main
from glassgpt.train import main

if os.environ["RANK"] == "1":  # rank 1 fails in its 5th training forward pass; rank 0 is mid-job
    real, calls = m.GPT.forward, [0]

    def failing(self, *args, **kw):
        calls[0] += self.training
        if calls[0] > 4:
            raise RuntimeError("injected failure on rank 1")
        return real(self, *args, **kw)

    m.GPT.forward = failing
sys.exit(run_main(main))
"""


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_a_failing_rank_stops_the_job_with_its_error(runs, tmp_path, mode):
    script = tmp_path / "faulty.py"
    script.write_text(FAULTY)
    t0 = time.time()
    r = torchrun(job_args(runs["data"], tmp_path / "out", parallel=mode, max_iters=50), script=script,
                 timeout=120, GLASSGPT_DIST_TIMEOUT="30")
    out = r.stdout + r.stderr
    print(f"{mode}: job stopped in {time.time() - t0:.1f} s with exit {r.returncode}")
    assert r.returncode != 0
    assert "RuntimeError: injected failure on rank 1" in out  # the failing rank's own traceback
    assert "rank      : 1 (local_rank: 1)" in out  # torchrun names it as the root cause


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_surviving_rank_exits_without_torchrun(runs, tmp_path):
    """Without torchrun's agent to kill it, rank 0 must still leave when rank 1 dies: its next
    collective fails (gloo notices the closed connection) well within GLASSGPT_DIST_TIMEOUT."""
    script = tmp_path / "faulty.py"
    script.write_text(FAULTY)
    port = str(free_port())
    procs = []
    for rank in range(WORLD):
        env = job_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=port, GLASSGPT_DIST_TIMEOUT="30")
        procs.append(subprocess.Popen([sys.executable, str(script), *job_args(runs["data"], tmp_path / "o", max_iters=50)],
                                      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    t0 = time.time()
    try:
        outs = [p.communicate(timeout=90) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    print(f"both ranks exited after {time.time() - t0:.1f} s: {[p.returncode for p in procs]}")
    print(outs[0][1][-600:])
    assert procs[1].returncode != 0 and "injected failure on rank 1" in outs[1][1]
    assert procs[0].returncode != 0


def test_indivisible_accumulation_is_one_line(runs, tmp_path):
    r = torchrun(job_args(runs["data"], tmp_path / "out", gradient_accumulation_steps=3))
    assert r.returncode != 0
    line = "error: gradient_accumulation_steps=3 is not divisible by the 2 processes; use a multiple of 2"
    assert line in r.stderr.splitlines() or line in r.stdout.splitlines()
    assert "[rank0]: Traceback" not in r.stderr and "[rank1]: Traceback" not in r.stderr
    # torchrun's closing report (printed after the ranks exit) shows the line as the root cause,
    # from the rank's error file, instead of its generic "To enable traceback see ..."
    report = r.stderr[r.stderr.rindex("Root Cause"):]
    assert f"traceback : {line}" in report, report
    with pytest.raises(UserError, match="^gradient_accumulation_steps=5 is not divisible by the 4 processes"):
        distributed.split_grad_accum(5, 4)
    assert distributed.split_grad_accum(8, 4) == 2


PROBE = """
import torch, torch.distributed as dist
from glassgpt import distributed
from glassgpt.model import GPT, GPTConfig

info = distributed.setup("gloo", "cpu", "ddp")
x = torch.full((1, 4), float(info.rank + 1))
# DDP's no_sync really skips the all-reduce in this torch: gradients differ across ranks until the
# last micro-step, then are averaged
ddp = distributed.wrap_model(torch.nn.Linear(4, 1, bias=False), info, "float32")
with distributed.grad_sync(ddp, sync=False):
    ddp(x).sum().backward()
local = [torch.zeros(1, 4) for _ in range(2)]
dist.all_gather(local, ddp.module.weight.grad)
assert not torch.equal(local[0], local[1]), local
with distributed.grad_sync(ddp, sync=True):
    ddp(x).sum().backward()
dist.all_gather(local, ddp.module.weight.grad)
assert torch.equal(local[0], local[1]), local
assert torch.allclose(local[0], torch.full((1, 4), 3.0)), local  # (1 + 2 + 1 + 2) / 2: all micro-steps, averaged
# FSDP keeps the weight tying and starts every rank from rank 0's weights
info.parallel = "fsdp"
torch.manual_seed(info.rank)
gpt = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=8, vocab_size=16, bias=False))
distributed.wrap_model(gpt, info, "float32")
assert gpt.lm_head.weight is gpt.transformer.wte.weight
full = gpt.transformer.wte.weight.full_tensor()
both = [torch.zeros_like(full) for _ in range(2)]
dist.all_gather(both, full)
assert torch.equal(both[0], both[1])
print(f"probe ok on rank {info.rank}")
distributed.teardown(info, finished=True)  # barrier first: a gloo rank leaving early can abort at exit
distributed.finish_process(0)
"""


def test_no_sync_and_fsdp_tying_probe(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    r = torchrun([], script=script)
    must_succeed(r)
    assert r.stdout.count("probe ok on rank") == WORLD


def test_rank_rng_state_picks_this_ranks_stream():
    rng = {"torch": "t0", "sampler": "s0", "ranks": [{"torch": "t0", "sampler": "s0"}, {"torch": "t1", "sampler": "s1"}]}
    info = distributed.DistInfo(enabled=True, rank=1, world_size=2)
    assert distributed.rank_rng_state(rng, info)["sampler"] == "s1"
    assert distributed.rank_rng_state(rng, distributed.DistInfo(enabled=True, rank=2, world_size=3)) is None
    legacy = {"torch": "t0", "sampler": "s0"}  # single-process checkpoints before per-rank states
    assert distributed.rank_rng_state(legacy, distributed.DistInfo(enabled=False))["sampler"] == "s0"
    named = {"state": {"b": {"step": 1}, "a": {"step": 2}},
             "param_groups": [{"lr": 1.0, "params": ["a", "b"]}, {"lr": 2.0, "params": ["c"]}]}
    ids = distributed.optim_state_names_to_ids(named)
    assert ids == {"state": {1: {"step": 1}, 0: {"step": 2}},
                   "param_groups": [{"lr": 1.0, "params": [0, 1]}, {"lr": 2.0, "params": [2]}]}


def test_ddp_with_muon_matches_one_process(tmp_path, monkeypatch, one_thread):
    """optimizer='muon' under 2-rank DDP: the all-reduced gradients give each rank the same Muon step
    as one process with twice the accumulation; FSDP + Muon is refused in one line (glassgpt/optim.py)."""
    data = make_char_dataset(tmp_path / "data" / "tiny_char")
    muon = dict(optimizer="muon", muon_lr=0.02, rope=True, qk_norm=True, activation="relu2")
    must_succeed(torchrun(job_args(data, tmp_path / "ddp", **muon)))
    monkeypatch.setattr(train_mod, "BatchSampler", RanksInOrder)
    want = train(TrainConfig(**{**BASE, **muon, "data_dir": str(data), "dataset": "tiny_char",
                                "out_dir": str(tmp_path / "ref")}))["log"]
    # Muon's Newton-Schulz runs in bfloat16: the two sums of gradients differ in rounding only
    compare_logs(read_log(tmp_path / "ddp"), want, "2-process ddp + muon", tol=2e-3)
