"""The GPT language model: GPT-2's architecture with nanoGPT's (and so OpenAI's) parameter names.

Everything about the network lives in this one file, readable in one sitting. The names
(`transformer.wte`, `h.{i}.attn.c_attn`, `h.{i}.mlp.c_fc`, ...) match nanoGPT checkpoints and, up to
the Conv1D transpose, Hugging Face's GPT-2, so weights map by name (see glassgpt/pretrained.py).
There is one forward pass: training, KV-cache decoding (glassgpt/generate.py's KVCache), hidden
states for the kNN store (`stop_at_layer`) and named hooks (glassgpt/hooks.py) all run it.
GPTConfig's defaults are GPT-2; the options from modded-nanogpt / nanochat (rotary, QK-norm, ReLU²,
untied head, zero-init projections, logit soft-cap) are off unless asked for (docs/architecture.md).

References:
1) OpenAI's GPT-2 TensorFlow implementation: https://github.com/openai/gpt-2/blob/master/src/model.py
2) nanoGPT: https://github.com/karpathy/nanoGPT/blob/master/model.py
3) nanochat: https://github.com/karpathy/nanochat/blob/master/nanochat/gpt.py
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F

ACTIVATIONS = ("gelu", "gelu_new", "relu2")
INITS = ("gpt2", "fan_in")
GATE_INPUT = 12  # channels the smear and attention gates read (modded-nanogpt's choice)


@dataclass
class GPTConfig:
    block_size: int = 1024
    """Context length: the most positions the model attends over (rows of `wpe`)."""
    vocab_size: int = 50304
    """GPT-2's 50257 padded up to a multiple of 64 for speed."""
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    """Biases in Linears and LayerNorms; True like GPT-2, False is a bit better and faster."""
    activation: str = "gelu"
    """'gelu' (exact erf, nanoGPT's nn.GELU), 'gelu_new' (tanh approximation, OpenAI's GPT-2; OpenAI
    weights need it) or 'relu2' (relu(x)**2, modded-nanogpt / nanochat)."""
    rope: bool = False
    """Rotary position embeddings (Su et al. 2021, https://arxiv.org/abs/2104.09864) on q and k instead
    of the learned `wpe` table (which is then absent)."""
    alibi: bool = False
    """ALiBi (Press et al. 2022, https://arxiv.org/abs/2108.12409): no position table and no rotation;
    head h adds -slope_h * (query position - key position) to its attention scores. Nothing is tied
    to block_size, so a model can be run on longer contexts by raising it (extend-context does)."""
    rope_base: float = 10000.0
    """Rotary base: pair i of a head turns at rope_base**(-2i/head_size) radians per position."""
    rope_scale: float = 1.0
    """Rotary position interpolation (https://arxiv.org/abs/2306.15595): positions are divided by it
    before rotating; extend-context sets it to new/old block_size."""
    qk_norm: bool = False
    """RMS-normalise each head's queries and keys (no gain) before attention (OLMo 2, nanochat)."""
    tie_embeddings: bool = True
    """lm_head shares its matrix with `wte` (GPT-2); False gives the head its own weights."""
    zero_init_proj: bool = False
    """Initialise every residual output projection (`c_proj`) to zero, so each block starts as the
    identity (modded-nanogpt); False is GPT-2's normal(0, 0.02/sqrt(2*n_layer))."""
    init: str = "gpt2"
    """'gpt2': every matrix and embedding normal(0, 0.02) (nanoGPT); 'fan_in' (nanochat,
    modded-nanogpt): matrices normal(0, fan_in**-0.5 * min(1, sqrt(fan_out/fan_in))), embeddings
    normal(0, 1), an untied head zero (a tied one keeps 0.02: it is the head). c_proj: zero_init_proj."""
    logit_softcap: float | None = None
    """If set, logits = cap * tanh(logits / cap) (Gemma 2, modded-nanogpt); None leaves them raw."""
    value_embed: bool = False
    """Value embeddings (modded-nanogpt, ResFormer https://arxiv.org/abs/2410.17897): every block adds
    a learned embedding of the current token (`transformer.ve.{i}`, vocab x n_embd) to its values."""
    smear: bool = False
    """Each position adds a gated copy of the previous token's embedding before the first block
    (modded-nanogpt's smear): a bigram path that costs no attention. The gate
    (`transformer.smear_gate`) reads the first GATE_INPUT channels of the current embedding."""
    attn_gate: bool = False
    """Scale each head's attention output by a sigmoid gate computed from the first GATE_INPUT
    channels of the block's normalised input (`h.{i}.attn.gate`; gated attention,
    https://arxiv.org/abs/2505.06708, as in modded-nanogpt): a head can switch itself off."""
    ngram: int = 0
    """n in 2..4: embeddings of the 2..n tokens ending at each position (`transformer.ngram.{n-2}`, zero
    at init) join the residual before every block, scaled per block (`ngram_lambdas`): a spelling
    table attention need not learn (modded-nanogpt's bigram hash embedding). 0: off."""
    ngram_rows: int = 8192
    """Rows per n-gram table. The bigram table is exact when (vocab_size+1) * vocab_size rows fit
    (char-level data); otherwise, like longer n-grams, ids are hashed into ngram_rows rows."""

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.rope and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"rope needs an even head size, got n_embd/n_head={self.n_embd // self.n_head}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.rope and self.alibi:
            raise ValueError("rope and alibi are two ways to encode positions: choose one")
        if self.ngram not in (0, 2, 3, 4) or self.ngram_rows < 1:
            raise ValueError(f"ngram must be 0, 2, 3 or 4 and ngram_rows >= 1, got {self.ngram}, {self.ngram_rows}")
        if self.rope_base <= 0 or self.rope_scale <= 0:
            raise ValueError("rope_base and rope_scale must be > 0")
        if (self.smear or self.attn_gate) and self.n_embd < GATE_INPUT:
            raise ValueError(f"smear and attn_gate read {GATE_INPUT} channels; n_embd={self.n_embd} is smaller")
        if self.logit_softcap is not None and self.logit_softcap <= 0:
            raise ValueError(f"logit_softcap must be > 0 or None, got {self.logit_softcap}")

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        """Build from a checkpoint's model_args (plus any options saved beside them), ignoring keys
        this version does not know."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)

    def non_gpt2_options(self) -> list[str]:
        """Names of the architecture options set away from GPT-2's (what HF GPT-2 export cannot
        represent). Sizes, dropout and bias are GPT-2 either way, as is either GELU."""
        gpt2 = GPTConfig()
        skip = {"block_size", "vocab_size", "n_layer", "n_head", "n_embd", "dropout", "bias"}
        out = [f.name for f in fields(self) if f.name not in skip and getattr(self, f.name) != getattr(gpt2, f.name)]
        return [n for n in out if not (n == "activation" and self.activation in ("gelu", "gelu_new"))
                and not (n.startswith("rope_") and not self.rope) and not (n == "ngram_rows" and not self.ngram)]


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's takes no bias=False before 2.1)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


def rotary_cos_sin(pos: torch.Tensor, head_size: int, base: float, scale: float = 1.0):
    """cos, sin (B, 1, T, head_size/2) for position ids pos (B, T), in float32."""
    inv_freq = base ** (-torch.arange(0, head_size, 2, dtype=torch.float32, device=pos.device) / head_size)
    angles = (pos.float() / scale)[:, None, :, None] * inv_freq  # (B, 1, T, hs/2)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + hs/2]) of x (B, nh, T, hs) by the position's angle (nanochat's
    half-split layout; any fixed pairing works as long as q and k use the same)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


def alibi_slopes(n_head: int) -> torch.Tensor:
    """ALiBi's head slopes: 2**(-8/n), 2**(-16/n), ..., 2**-8 for n heads when n is a power of two;
    otherwise those of the power of two p below n, then every other slope of 2p (the paper's rule)."""
    p = 2 ** int(math.log2(n_head))
    slopes = [2 ** (-8 * i / p) for i in range(1, p + 1)] + [2 ** (-8 * i / (2 * p)) for i in range(1, 2 * p, 2)]
    return torch.tensor(slopes[:n_head])


def alibi_bias(slopes: torch.Tensor, T: int, S: int, allowed: torch.Tensor | None) -> torch.Tensor:
    """Additive attention bias (B or 1, nh, T, S) for T queries in the last T of S key slots:
    -slope * (query slot - key slot), -inf on later keys and where `allowed` (B, 1, T, S) is False.
    A row's slots and positions differ by its left padding, the same for queries and keys, so the
    slot distance is the position distance, with or without a cache."""
    dist = torch.arange(S - T, S, device=slopes.device)[:, None] - torch.arange(S, device=slopes.device)
    bias = (-slopes[:, None, None].float() * dist).masked_fill(dist < 0, float("-inf"))[None]  # (1, nh, T, S)
    return bias if allowed is None else bias.masked_fill(~allowed, float("-inf"))


@functools.lru_cache(maxsize=8)
def _causal(T: int, device: torch.device) -> torch.Tensor:
    """(T, T) bool, True above the diagonal: the future a position may not attend to."""
    with torch.inference_mode(False):  # cached: a mask made under inference_mode would fail a later backward
        return torch.ones(T, T, dtype=torch.bool, device=device).triu(1)


class CausalSelfAttention(nn.Module):
    alibi: torch.Tensor | None  # ALiBi's head slopes (a buffer), or None
    def __init__(self, config: GPTConfig, layer_idx: int = 0):
        super().__init__()
        # key, query, value projections for all heads, in one batched Linear
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.qk_norm = config.qk_norm
        self.layer_idx = layer_idx  # which layer of a KVCache this attention reads and writes
        self.gate = nn.Linear(GATE_INPUT, config.n_head, bias=False) if config.attn_gate else None
        self.register_buffer("alibi", alibi_slopes(config.n_head) if config.alibi else None, persistent=False)

    def forward(self, x: torch.Tensor, rotary: tuple | None = None, kv_cache=None,
                ve: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.size()
        nh, hs = self.n_head, C // self.n_head
        qkv = self.c_attn(x)
        # On a CPU under bf16 autocast, QK-norm, rotary and SDPA run in float32 (SDPA's bf16 backward
        # is ~10x slower there): cast here once, sparing QK-norm and rotary their own casts. q and k
        # go through both as one tensor: half the kernel launches.
        dt, cpu_half = qkv.dtype, qkv.device.type == "cpu" and qkv.dtype in (torch.bfloat16, torch.float16)
        qk, v = qkv[..., : 2 * C], qkv[..., 2 * C :]
        if cpu_half:
            qk, v = qk.float(), v.float()
        if ve is not None:  # (B, T, C) value embedding of the tokens
            v = v + ve.to(v.dtype)  # embeddings stay float32 under autocast
        qk = qk.view(B, T, 2 * nh, hs).transpose(1, 2)  # (B, 2nh, T, hs): q's heads, then k's
        v = v.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        if self.qk_norm:
            qk = F.rms_norm(qk, (hs,), eps=1e-6).type_as(qk)  # type_as: autocast may run it in float32
        if rotary is not None:
            qk = apply_rotary(qk, *rotary)
        q, k = qk[:, :nh], qk[:, nh:]
        mask = None
        if kv_cache is not None:
            # the cache holds this layer's earlier keys/values and says which ones each query may see
            k, v = kv_cache.write(self.layer_idx, k, v)  # (B, nh, S, hs), S = cached + T
            mask = kv_cache.mask  # (B, 1, T, S) bool, or None when plain causal is right
        if self.alibi is not None:  # causal and padding masks folded into the additive bias
            mask = alibi_bias(self.alibi, T, k.size(2), mask).to(q.dtype)
        y = self._attend(q, k, v, mask, dt if cpu_half else None)  # (B, nh, T, hs)
        if self.gate is not None:  # one gate per head and position: (B, T, nh) -> (B, nh, T, 1)
            y = y * torch.sigmoid(self.gate(x[..., :GATE_INPUT])).transpose(1, 2).unsqueeze(-1).to(y.dtype)
        y = y.to(dt).transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def _attend(self, q, k, v, mask, cpu_half: torch.dtype | None) -> torch.Tensor:
        """softmax(q k^T / sqrt(hs)) v over the allowed keys. Flash / memory-efficient kernels where
        the device has them, exact math otherwise. On a CPU under bf16 autocast, a square causal
        context of at most 256 positions (training, a fresh prefill) takes explicit bf16 matmuls with
        a float32 softmax instead (faster there than either SDPA kernel: benchmarks/RESULTS.md);
        longer ones, cached decoding, ALiBi and dropout take SDPA in float32."""
        T, drop = q.size(2), self.dropout if self.training else 0.0
        if cpu_half is not None and mask is None and k.size(2) == T <= 256 and not drop:
            att = (q.to(cpu_half) @ k.to(cpu_half).transpose(-2, -1)).float() * q.size(-1) ** -0.5  # (B, nh, T, T)
            att = att.masked_fill(_causal(T, q.device), float("-inf")).softmax(-1)
            return att.to(cpu_half) @ v.to(cpu_half)
        with torch.autocast("cpu", enabled=False) if cpu_half is not None else contextlib.nullcontext():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and q.size(2) > 1,
                                                  dropout_p=drop)


class ReLU2(nn.Module):
    """relu(x)**2: sparse like ReLU, smooth at 0 (https://arxiv.org/abs/2109.08668)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        # A module of its own so that forward hooks (`blocks.{i}.mlp.hook_post`) see the 4*n_embd
        # neurons; named `gelu` as in nanoGPT whatever the activation (it holds no weights).
        self.gelu = ReLU2() if config.activation == "relu2" else nn.GELU(
            approximate="tanh" if config.activation == "gelu_new" else "none")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int = 0):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)
        self.resid_mid = nn.Identity()  # no weights: a place for the `blocks.{i}.hook_resid_mid` hook

    def forward(self, x: torch.Tensor, rotary: tuple | None = None, kv_cache=None,
                ve: torch.Tensor | None = None) -> torch.Tensor:
        x = self.resid_mid(x + self.attn(self.ln_1(x), rotary=rotary, kv_cache=kv_cache, ve=ve))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        modules: dict[str, nn.Module] = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if not (config.rope or config.alibi):  # rotary and ALiBi models have no position table
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        modules.update(drop=nn.Dropout(config.dropout),
                       h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                       ln_f=LayerNorm(config.n_embd, bias=config.bias))
        if config.smear:
            modules["smear_gate"] = nn.Linear(GATE_INPUT, 1, bias=False)
        if config.value_embed:
            modules["ve"] = nn.ModuleList(
                [nn.Embedding(config.vocab_size, config.n_embd) for _ in range(config.n_layer)])
        if config.ngram:
            V, rows = config.vocab_size, config.ngram_rows  # bigrams: (V + 1) * V rows, or hashed if more
            modules["ngram"] = nn.ModuleList([nn.Embedding(min((V + 1) * V, rows) if n == 2 else rows, config.n_embd)
                                              for n in range(2, config.ngram + 1)])
            self.ngram_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # Weight tying (https://paperswithcode.com/method/weight-tying): one matrix embeds tokens
            # and scores them. state_dict then holds both names for it, as nanoGPT and HF GPT-2 do.
            self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        fan_in = config.init == "fan_in"
        if fan_in:  # the head: zero when it is its own, GPT-2's 0.02 when it is also the embedding
            nn.init.normal_(self.lm_head.weight, std=0.02 * config.tie_embeddings)
        for table in self.transformer.ngram if config.ngram else []:
            nn.init.zeros_(table.weight)  # the model starts as if it had no n-gram tables
        # GPT-2 paper: scale the residual projections by 1/sqrt(2 * n_layer) at init (or zero them).
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                std = 0.0 if config.zero_init_proj else (self._std(p) if fan_in else 0.02)
                torch.nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * config.n_layer))

    def get_num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; position and n-gram embeddings excluded by default (token embeddings count
        once, as the tied lm_head)."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n_params -= self.transformer.wpe.weight.numel()
        if non_embedding and self.config.ngram:  # lookups, not matmuls: no FLOPs per token
            n_params -= sum(t.weight.numel() for t in self.transformer.ngram)
        return n_params

    @staticmethod
    def _std(w: torch.Tensor) -> float:
        """init='fan_in': 1/sqrt(fan_in), shrunk for matrices that narrow (https://arxiv.org/abs/2310.17813)."""
        return w.size(1) ** -0.5 * min(1.0, math.sqrt(w.size(0) / w.size(1)))  # (fan_out, fan_in)

    def _init_weights(self, module: nn.Module) -> None:
        fan_in = self.config.init == "fan_in"
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=self._std(module.weight) if fan_in else 0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=1.0 if fan_in else 0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache=None,
                stop_at_layer: int | None = None):
        """The one forward pass. Returns (logits, loss): logits (B, T, vocab) and the mean cross-entropy
        with targets; without, only the last position is scored (all sampling needs), as in nanoGPT.

        kv_cache (glassgpt.generate.KVCache): idx continues the cached sequence; positions, padding
        masks and earlier keys come from the cache, and this pass's keys are added to it.
        stop_at_layer=L returns only the residual stream (B, T, n_embd) after L blocks (0: the
        embeddings; n_layer: after ln_f, what lm_head scores), without computing the head."""
        B, T = idx.size()
        tr, cfg = self.transformer, self.config
        if kv_cache is None:
            if T > cfg.block_size:
                raise ValueError(f"Cannot forward sequence of length {T}, block size is only {cfg.block_size}")
            pos = torch.arange(0, T, dtype=torch.long, device=idx.device)[None]  # (1, T)
        else:
            pos = kv_cache.prepare(T, idx.device)  # (B, T) position ids; sets kv_cache.mask
        n_blocks = cfg.n_layer if stop_at_layer is None else stop_at_layer
        if not 0 <= n_blocks <= cfg.n_layer or (kv_cache is not None and n_blocks < cfg.n_layer):
            raise ValueError(f"stop_at_layer={stop_at_layer} must be in 0..{cfg.n_layer} (n_layer with a kv_cache)")
        x = tr.wte(idx)
        rotary = None
        if cfg.rope:
            rotary = rotary_cos_sin(pos, cfg.n_embd // cfg.n_head, cfg.rope_base, cfg.rope_scale)
        elif not cfg.alibi:
            x = x + tr.wpe(pos)
        x = tr.drop(x)
        if cfg.smear:
            x = self.smear(x, pos, kv_cache)
        ngram = self.ngram_embed(idx, pos, kv_cache) if cfg.ngram else None
        for i, block in enumerate(tr.h[:n_blocks]):
            if ngram is not None:
                x = x + self.ngram_lambdas[i] * ngram
            ve = tr.ve[i](idx) if cfg.value_embed else None
            x = block(x, rotary=rotary, kv_cache=kv_cache, ve=ve)
        if kv_cache is not None:
            kv_cache.advance(T)
        if stop_at_layer is not None and n_blocks < cfg.n_layer:
            return x
        x = tr.ln_f(x)
        if stop_at_layer is not None:
            return x
        if targets is not None:
            logits = self.head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        else:
            logits, loss = self.head(x[:, [-1], :]), None  # list index keeps the time dim
        return logits, loss

    def smear(self, x: torch.Tensor, pos: torch.Tensor, kv_cache=None) -> torch.Tensor:
        """x[t] + sigmoid(smear_gate(x[t, :GATE_INPUT])) * x[t-1] for embeddings x (B, T, C) at
        positions pos (B or 1, T); a row's first token (position 0) has no previous one. With a cache,
        the previous token of this pass's first one is the cache's `prev_embed`."""
        first = kv_cache.prev_embed if kv_cache is not None and kv_cache.prev_embed is not None else x[:, :1]
        if kv_cache is not None:
            kv_cache.prev_embed = x[:, -1:]
        prev = torch.cat([first.to(x.dtype), x[:, :-1]], dim=1)  # (B, T, C)
        gate = torch.sigmoid(self.transformer.smear_gate(x[..., :GATE_INPUT])) * (pos > 0).unsqueeze(-1)
        return x + gate.to(x.dtype) * prev

    def ngram_embed(self, idx: torch.Tensor, pos: torch.Tensor, kv_cache=None) -> torch.Tensor:
        """Sum over n = 2..ngram of the embedding of the n tokens ending at each position (B, T, C).
        A token a row does not have (before its position 0) counts as id vocab_size. Exact bigram
        rows are prev * vocab + token; hashed rows XOR the tokens times odd constants (modded-nanogpt's
        bigram hash), modulo the rows. With a cache, the tokens before this pass are its `prev_ids`."""
        V, n, T = self.config.vocab_size, self.config.ngram, idx.size(1)
        past = kv_cache.prev_ids if kv_cache is not None and kv_cache.prev_ids is not None else None
        ids = torch.cat([idx.new_full((idx.size(0), n - 1), V) if past is None else past, idx], dim=1)
        if kv_cache is not None:
            kv_cache.prev_ids = ids[:, -(n - 1):]
        key, out = idx * 36313, 0
        for k in range(1, n):  # k: how many tokens back
            table = self.transformer.ngram[k - 1]
            prev = ids[:, n - 1 - k : n - 1 - k + T].masked_fill(pos < k, V)  # (B, T)
            key = key ^ (prev * (27191, 51497, 70001)[k - 1])
            exact = k == 1 and table.num_embeddings == (V + 1) * V
            out = out + table(prev * V + idx if exact else key % table.num_embeddings)
        return out  # type: ignore[return-value]

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for final hidden states x (..., n_embd): lm_head, soft-capped if configured."""
        logits = self.lm_head(x)
        cap = self.config.logit_softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """Final layer-normed hidden states (B, T, n_embd): what the head scores."""
        return self(idx, stop_at_layer=self.config.n_layer)

    def crop_block_size(self, block_size: int) -> None:
        """Model surgery to use a smaller context than the one trained with (e.g. GPT-2's 1024)."""
        if block_size > self.config.block_size:
            raise ValueError(
                f"crop_block_size can only shrink: {block_size} > {self.config.block_size}; "
                "use `glassgpt extend-context` to grow it"
            )
        self.config.block_size = block_size
        if "wpe" in self.transformer:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def configure_optimizers(
        self, weight_decay: float, learning_rate: float, betas: tuple[float, float], device_type: str
    ) -> torch.optim.Optimizer:
        """nanoGPT's AdamW: the 2-D weights (matmuls, embeddings) decayed, biases and gains not; the
        groups come from glassgpt.param_groups, the one parameter-group builder."""
        from glassgpt.param_groups import adamw, adamw_groups

        return adamw(adamw_groups(self, weight_decay), learning_rate, betas, device_type)

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
