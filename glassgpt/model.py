"""The GPT language model: GPT-2's architecture with nanoGPT's (and so OpenAI's) parameter names.

Everything about the network lives in this one file, readable in one sitting. The names
(`transformer.wte`, `h.{i}.attn.c_attn`, `h.{i}.mlp.c_fc`, ...) match nanoGPT checkpoints and, up to
the Conv1D transpose, Hugging Face's GPT-2, so weights map by name (see glassgpt/pretrained.py).

References:
1) OpenAI's GPT-2 TensorFlow implementation: https://github.com/openai/gpt-2/blob/master/src/model.py
2) nanoGPT: https://github.com/karpathy/nanoGPT/blob/master/model.py
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F

ACTIVATIONS = ("gelu", "gelu_new")


@dataclass
class GPTConfig:
    block_size: int = 1024
    """Context length: the most positions the model can attend over (rows of `wpe`)."""
    vocab_size: int = 50304
    """GPT-2's 50257 padded up to a multiple of 64 for speed."""
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    """Biases in Linears and LayerNorms; True like GPT-2, False is a bit better and faster."""
    activation: str = "gelu"
    """'gelu' (exact erf, nanoGPT's nn.GELU) or 'gelu_new' (tanh approximation, OpenAI's GPT-2).
    Checkpoints keep the one they were trained with; OpenAI weights need 'gelu_new'."""

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        """Build from a checkpoint's model_args, ignoring keys this version does not know."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's takes no bias=False before 2.1)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        # key, query, value projections for all heads, in one batched Linear
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, C) -> q, k, v each (B, nh, T, hs). Shared with the KV-cache engine."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        hs = C // self.n_head
        return tuple(t.view(B, T, self.n_head, hs).transpose(1, 2) for t in (q, k, v))

    def merge_heads(self, y: torch.Tensor) -> torch.Tensor:
        """(B, nh, T, hs) -> output projection of (B, T, C)."""
        B, nh, T, hs = y.size()
        y = y.transpose(1, 2).contiguous().view(B, T, nh * hs)
        return self.resid_dropout(self.c_proj(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split_heads(x)
        # Flash / memory-efficient kernels where the device has them; exact math otherwise.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )  # (B, nh, T, hs)
        return self.merge_heads(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        # A module of its own so that forward hooks on `h.{i}.mlp.gelu` see the 4*n_embd neurons.
        self.gelu = nn.GELU(approximate="tanh" if config.activation == "gelu_new" else "none")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (https://paperswithcode.com/method/weight-tying): one matrix embeds tokens and
        # scores them. state_dict then holds both names for it, as nanoGPT and HF GPT-2 do.
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2 paper: scale the residual projections by 1/sqrt(2 * n_layer) at init.
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def get_num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; position embeddings excluded by default (token embeddings count once,
        as the tied lm_head)."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """Final layer-normed hidden states (B, T, n_embd): what the lm_head scores."""
        _, t = idx.size()
        if t > self.config.block_size:
            raise ValueError(f"Cannot forward sequence of length {t}, block size is only {self.config.block_size}")
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)  # (t,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        return self.transformer.ln_f(x)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab) and, with targets, the mean cross-entropy. Without targets only the
        last position is scored (all that sampling needs), as in nanoGPT."""
        x = self.hidden_states(idx)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        else:
            logits = self.lm_head(x[:, [-1], :])  # list index keeps the time dim
            loss = None
        return logits, loss

    def crop_block_size(self, block_size: int) -> None:
        """Model surgery to use a smaller context than the one trained with (e.g. GPT-2's 1024)."""
        if block_size > self.config.block_size:
            raise ValueError(
                f"crop_block_size can only shrink: {block_size} > {self.config.block_size}; "
                "use `glassgpt extend-context` to grow it"
            )
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def configure_optimizers(
        self, weight_decay: float, learning_rate: float, betas: tuple[float, float], device_type: str
    ) -> torch.optim.Optimizer:
        # Decay the 2-D weights (matmuls, embeddings), not biases and LayerNorm gains.
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        # The fused kernel runs on CUDA and (torch >= 2.4) CPU: on this project's 2-core CPU it
        # steps ~10x faster than the per-tensor loop.
        fused_ok = "fused" in inspect.signature(torch.optim.AdamW).parameters and device_type in ("cuda", "cpu")
        extra = {"fused": True} if fused_ok else {}
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)

    def flops_per_token(self) -> int:
        """Training FLOPs per token, PaLM appendix B: 6N + 12 L H Q T."""
        cfg = self.config
        N = self.get_num_params()
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        return 6 * N + 12 * L * H * Q * T

    def estimate_mfu(self, tokens_per_sec: float, peak_flops: float | None) -> float | None:
        """Model FLOPs utilisation: achieved training FLOP/s over the device's peak. None when the
        peak is unknown (CPUs, unlisted GPUs): report tokens/s instead."""
        if not peak_flops:
            return None
        return self.flops_per_token() * tokens_per_sec / peak_flops

    @torch.no_grad()
    def generate(
        self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None
    ) -> torch.Tensor:
        """nanoGPT's reference sampler: recomputes the whole context for every token. The fast path is
        glassgpt.generate (KV cache); this one stays as the oracle it is tested against."""
        for _ in range(max_new_tokens):
            idx_cond = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size :]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :]
            if temperature == 0:
                idx_next = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("Inf")
                probs = F.softmax(logits, dim=-1)
                idx_next = torch.multinomial(probs, num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx


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
