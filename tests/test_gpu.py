"""GPU checks: bf16 autocast, torch.compile and flash attention actually run.

Marked `gpu`; they run wherever a CUDA device is present (`python -m pytest -m gpu` on a GPU machine)
and are skipped, saying so, where there is none (this project's CPU CI)."""

from __future__ import annotations

import pytest
import torch

from glassgpt.model import GPT, GPTConfig

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")]


def tiny(**kw) -> GPT:
    return GPT(GPTConfig(block_size=128, vocab_size=256, n_layer=2, n_head=4, n_embd=128, **kw)).cuda()


@pytest.mark.parametrize("options", [{}, {"rope": True, "qk_norm": True, "activation": "relu2"}])
def test_bf16_autocast_matches_fp32(options):
    torch.manual_seed(0)
    model = tiny(**options)
    idx = torch.randint(0, 256, (4, 128), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = model(idx, targets=idx)
    _, ref_loss = model(idx, targets=idx)
    assert abs(loss.float().item() - ref_loss.item()) < 2e-2, (loss.item(), ref_loss.item())


def test_flash_attention_kernel_runs():
    """The causal SDPA call the model makes runs on the flash kernel alone (no math fallback)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = tiny().to(torch.bfloat16)
    idx = torch.randint(0, 256, (2, 128), device="cuda")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        logits, _ = model(idx, targets=idx)
    assert torch.isfinite(logits.float()).all()


def test_compile_matches_eager():
    torch.manual_seed(0)
    model = tiny()
    idx = torch.randint(0, 256, (4, 128), device="cuda")
    _, eager = model(idx, targets=idx)
    _, compiled = torch.compile(model)(idx, targets=idx)
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-3)


def test_gpu_recipe_trains_compiled_in_bf16(char_dataset, tmp_path, capsys):
    """config/train_shakespeare_char_gpu.py (what `make demo` picks on a CUDA machine), 20 steps on tiny data."""
    from pathlib import Path

    from glassgpt.config import TrainConfig, load_config
    from glassgpt.hardware import pick_recipe
    from glassgpt.train import train

    recipe = pick_recipe()
    assert recipe.name == "gpu"
    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(TrainConfig, [str(repo / recipe.config), f"--out_dir={tmp_path / 'out'}",
                                    f"--data_dir={char_dataset}", "--block_size=64", "--max_iters=20",
                                    "--eval_interval=20", "--eval_iters=2", "--plot=False"])
    res = train(cfg)
    assert "torch.compile failed" not in capsys.readouterr().out
    assert res["iter_num"] == 20 and res["last_eval"]["val"] < 4.0


def test_real_cuda_oom_is_one_line(char_dataset, tmp_path):
    from glassgpt.errors import UserError
    from glassgpt.train import train
    from tests.test_train import tiny_cfg

    free, _ = torch.cuda.mem_get_info()
    rows = int(free // (16 * 4096 * 4)) + 1  # one (rows, 16, 4096) float32 activation is more than is free
    with pytest.raises(UserError, match=r"^out of CUDA memory .*--batch_size="):
        train(tiny_cfg(char_dataset, tmp_path / "o", device="cuda", n_embd=4096, n_head=32, n_layer=1,
                       batch_size=rows, max_iters=1))
