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
