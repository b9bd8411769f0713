"""The machine's side of training: recipe choice, the torch.compile fallback, out-of-memory, size advice.

No GPU runs here: the CUDA and MPS paths are checked by choosing recipes with detection overridden and
by raising the errors those devices raise (torch.OutOfMemoryError, MPS's RuntimeError) on the CPU; a
real host out-of-memory is provoked under an address-space limit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from glassgpt.advice import advise, suggest
from glassgpt.config import TrainConfig, load_config
from glassgpt.errors import UserError
from glassgpt.hardware import is_oom, oom_error, pick_recipe
from glassgpt.train import train
from tests.test_train import losses, tiny_cfg

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("cuda,mps,name,device,compile_", [(True, False, "gpu", "cuda", True),
                                                          (False, True, "mps", "mps", False),
                                                          (False, False, "cpu", "cpu", False)])
def test_recipe_per_machine_loads(cuda, mps, name, device, compile_):
    r = pick_recipe(cuda=cuda, mps=mps)
    assert r.name == name and r.reason
    cfg = load_config(TrainConfig, [str(REPO / r.config)])
    assert cfg.device == device and cfg.compile is compile_ and cfg.dataset == "shakespeare_char"
    if name == "gpu":
        assert cfg.dtype == "bfloat16"


def test_hardware_command_names_the_recipe_and_why():
    r = subprocess.run([sys.executable, "-m", "glassgpt.hardware"], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    want = pick_recipe()
    assert r.stdout.strip() == want.config and (REPO / want.config).exists()
    assert r.stderr.startswith(f"recipe: {want.name} (") and want.reason in r.stderr


class _FailsWhenCalled(nn.Module):
    """What torch.compile returns when the backend fails at the first call (lazy compilation)."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, *a, **k):
        raise RuntimeError("BackendCompilerFailed: backend='inductor' raised: no C compiler found")


@pytest.mark.parametrize("how", ["raises", "fails_at_first_call"])
def test_compile_failure_falls_back_to_eager_with_one_line(char_dataset, tmp_path, monkeypatch, capsys, how):
    want = train(tiny_cfg(char_dataset, tmp_path / "eager", max_iters=3, dropout=0.1))

    def broken_compile(model, *a, **k):
        if how == "raises":
            raise RuntimeError("Dynamo is not supported on Python 3.14+")
        return _FailsWhenCalled(model)

    monkeypatch.setattr(torch, "compile", broken_compile)
    capsys.readouterr()
    got = train(tiny_cfg(char_dataset, tmp_path / "c", max_iters=3, dropout=0.1, compile=True))
    lines = [line for line in capsys.readouterr().out.splitlines() if "torch.compile failed" in line]
    assert len(lines) == 1 and lines[0].endswith("training continues uncompiled"), lines
    # the fallback leaves the random streams as they were: the same run as never compiling
    assert losses(got) == losses(want)


def test_compile_that_works_is_used(char_dataset, tmp_path, monkeypatch, capsys):
    calls = []

    def fake_compile(model, *a, **k):  # stands in for a working torch.compile (same numbers, eager)
        calls.append(model)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    train(tiny_cfg(char_dataset, tmp_path / "c", max_iters=2, compile=True))
    assert len(calls) == 1 and "torch.compile failed" not in capsys.readouterr().out


def test_oom_recognised_for_every_device():
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom(RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: 1 GB)"))
    assert is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: "
                               "you tried to allocate 123 bytes"))
    assert is_oom(MemoryError())
    assert not is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    cfg = TrainConfig(batch_size=12, gradient_accumulation_steps=40, block_size=1024, dtype="float32")
    msg = str(oom_error(torch.OutOfMemoryError("x"), cfg, "cuda:0", world_size=8, last_ckpt="out/ckpt.pt (iter 5)"))
    # halving the batch doubles the micro-steps: 12 x 40 = 6 x 80 sequences per step (80 divisible by 8)
    assert "--batch_size=6 with --gradient_accumulation_steps=80 (about the same 491,520 tokens per step)" in msg
    assert "--block_size=512" in msg and "--dtype=bfloat16" in msg and "out/ckpt.pt (iter 5) is intact" in msg
    assert msg.startswith("out of cuda:0 memory")  # the message does not say which: the device does
    mps = str(oom_error(RuntimeError("MPS backend out of memory"), cfg, "mps", last_ckpt=None))
    assert mps.startswith("out of MPS memory") and mps.endswith("no checkpoint had been saved")


def test_cuda_oom_mid_training_is_one_line_and_keeps_the_checkpoint(char_dataset, tmp_path, monkeypatch):
    out = tmp_path / "out"
    train(tiny_cfg(char_dataset, out, max_iters=2, always_save_checkpoint=True))
    before = (out / "ckpt.pt").read_bytes()
    import glassgpt.model as model_mod

    def oom(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.10 GiB total)")

    monkeypatch.setattr(model_mod.GPT, "forward", oom)
    with pytest.raises(UserError, match=r"^out of CUDA memory \(OutOfMemoryError\); lower --batch_size=2 with "
                                        r"--gradient_accumulation_steps=4 .* the last checkpoint .*ckpt.pt \(iter 2\) "
                                        r"is intact$"):
        train(tiny_cfg(char_dataset, out, init_from="resume", max_iters=4))
    assert (out / "ckpt.pt").read_bytes() == before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux's")
def test_host_oom_under_an_address_space_limit(char_dataset, tmp_path):
    """A real allocation failure: the training process gets ~400 MB more address space than it has
    after start-up, and a batch whose activations need several GB. Exit 2, one line, checkpoint kept."""
    out = tmp_path / "out"
    train(tiny_cfg(char_dataset, out, max_iters=2, always_save_checkpoint=True))
    before = (out / "ckpt.pt").read_bytes()
    script = textwrap.dedent("""
        import resource, sys
        import torch
        import glassgpt.train
        from glassgpt.errors import run_main
        vm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize")) * 1024
        limit = vm + (400 << 20)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        sys.exit(run_main(glassgpt.train.main, sys.argv[1:]))
    """)
    args = [f"--{k}={v}" for k, v in dict(out_dir=out, data_dir=char_dataset, dataset=char_dataset.name, device="cpu",
                                          compile=False, init_from="resume", max_iters=4, batch_size=65536,
                                          block_size=16, gradient_accumulation_steps=1, eval_interval=1000,
                                          plot=False).items()]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: out of host memory"), r.stderr[-2000:]
    assert "--batch_size=32768 with --gradient_accumulation_steps=2" in err[0] and "is intact" in err[0]
    assert (out / "ckpt.pt").read_bytes() == before


def test_size_advice_is_a_runnable_suggestion():
    line = suggest(1_003_854, "cpu")
    assert line.startswith("data: 1,003,854 tokens. For this CPU try --n_layer=")
    flags = [w for w in line.split() if w.startswith("--")]
    cfg = load_config(TrainConfig, flags)  # every suggested flag is a real config key with a valid value
    a = advise(1_003_854, "cpu")
    assert (cfg.n_layer, cfg.n_embd, cfg.max_iters) == (a.n_layer, a.n_embd, a.max_iters)
    # less text: fewer iterations (val turns up after some epochs); a GPU: its own batch
    assert advise(90_000, "cpu").max_iters <= a.max_iters
    assert advise(1_003_854, "cuda").batch_size == 64 and "GPU" in suggest(1_003_854, "cuda")
