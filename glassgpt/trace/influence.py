"""Training-data influence by EK-FAC influence functions: which training windows taught the model a text.

    factors = fit_ekfac(model, windows)                                   # (N, T+1) token ids
    scores = influence_scores(model, factors, windows, query_ids, prompt_len)   # (N,) nats, + = proponent

`scores[i]` predicts how much the query's summed loss (over `query_ids[prompt_len:]`, each token given
its context as generation saw it) would change if window i were left out of training:

    dL_q(-i) ~= (1/N) g_q^T H^-1 g_i        (Koh & Liang 2017; Grosse et al. 2023, arXiv 2308.03296)

with the training loss the mean over N windows of each window's mean token loss (glassgpt trains on
the mean token loss), g_i the gradient of window i's loss, g_q the gradient of the query's summed loss
and H the Gauss-Newton Hessian of the training loss. Positive: removing the window would raise the
query's loss (a proponent, it taught the model this text); negative: an opponent.

H is EK-FAC (George et al. 2018) per nn.Linear (kronfluence's design): per layer A = E[a a^T] over
tokens of its inputs (with a 1 appended when it has a bias), S = E[g g^T] of the gradients at its
outputs with labels sampled from the model (the true Fisher), eigenbases Q_A, Q_S, then the eigenvalues
refitted on the windows' own gradients in that basis: lambda = E[(Q_S^T D_i Q_A)^2]. Damping is
`damping` x the layer's mean lambda. Embeddings (wte, wpe, value embeddings) are not Linears and are
left out; so is lm_head when the vocabulary is larger than HEAD_MAX_VOCAB (its S would be vocab^2).
Nothing stands in for an optimizer's state: the same H is used whether the model was trained with
AdamW or Muon. docs/influence.md has the walkthrough, the choices and their measurements.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from glassgpt.errors import UserError

DEFAULT_DAMPING = 0.1  # x mean eigenvalue per layer; chosen by leave-one-out agreement (docs/influence.md)
HEAD_MAX_VOCAB = 4096  # lm_head is left out above this vocabulary: S alone would be vocab^2 floats
SEED = 1234  # labels sampled for the Fisher: window i's generator is seeded with SEED + i

Reduce = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class EkfacFactors:
    """EK-FAC factors of one model, per included nn.Linear (names as in model.named_modules())."""

    layers: list[str]
    bias: list[bool]  # the layer has a bias: its inputs carry an appended 1
    q_a: list[torch.Tensor]  # (din', din') eigenvectors of A (din' = din + bias)
    q_s: list[torch.Tensor]  # (dout, dout) eigenvectors of S
    eig_a: list[torch.Tensor]  # (din',) K-FAC eigenvalues of A
    eig_s: list[torch.Tensor]  # (dout,)
    lambdas: list[torch.Tensor]  # (dout, din') corrected eigenvalues
    damping: float  # the relative damping it was fitted with
    n_train: int  # N of the 1/N in the scores: the training windows the loss is averaged over
    n_tokens: int = 0  # tokens the factors were fitted on
    extra: dict = field(default_factory=dict)

    def deltas(self) -> list[float]:
        """The absolute damping added to each layer's eigenvalues."""
        return [self.damping * float(lam.mean()) + 1e-12 for lam in self.lambdas]

    def state(self) -> dict[str, np.ndarray]:
        """Arrays to save (np.savez); `from_state` rebuilds the factors with the sidecar's `meta()`."""
        out = {}
        for i in range(len(self.layers)):
            for key in ("q_a", "q_s", "eig_a", "eig_s", "lambdas"):
                out[f"{key}_{i}"] = getattr(self, key)[i].numpy()
        return out

    def meta(self) -> dict:
        return {"layers": self.layers, "bias": self.bias, "damping": self.damping, "n_train": self.n_train,
                "n_tokens": self.n_tokens}

    @classmethod
    def from_state(cls, meta: dict, arrays: dict[str, np.ndarray]) -> EkfacFactors:
        n = len(meta["layers"])
        get = {k: [torch.from_numpy(np.asarray(arrays[f"{k}_{i}"])) for i in range(n)]
               for k in ("q_a", "q_s", "eig_a", "eig_s", "lambdas")}
        return cls(list(meta["layers"]), list(meta["bias"]), get["q_a"], get["q_s"], get["eig_a"], get["eig_s"],
                   get["lambdas"], damping=float(meta["damping"]), n_train=int(meta["n_train"]),
                   n_tokens=int(meta.get("n_tokens", 0)))


# ----------------------------------------------------------------------------------------------------
# layers and the factorised gradients


def block_size(model: nn.Module) -> int:
    cfg: Any = getattr(model, "config", None)
    return int(cfg.block_size)


def default_layers(model: nn.Module) -> list[str]:
    """Every nn.Linear of the model; lm_head only when the vocabulary is at most HEAD_MAX_VOCAB."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    vocab = getattr(getattr(model, "config", None), "vocab_size", 0)
    return [n for n in names if n != "lm_head" or vocab <= HEAD_MAX_VOCAB]


def resolve_layers(model: nn.Module, layers: Sequence[str] | None) -> list[str]:
    mods = dict(model.named_modules())
    names = default_layers(model) if layers is None else list(layers)
    for n in names:
        if not isinstance(mods.get(n), nn.Linear):
            raise UserError(f"layer {n!r} is not an nn.Linear of this model; choose from "
                            f"{', '.join(default_layers(model))}")
    if not names:
        raise UserError("no nn.Linear layers selected for influence")
    return names


@contextlib.contextmanager
def capture(model: nn.Module, layers: Sequence[str]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record each layer's input a (B, T, din', with the bias's 1 appended) and output (kept in the
    graph, for autograd.grad) during forward passes: {name: [a, out]}. Hooks removed in `finally`."""
    mods = dict(model.named_modules())
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []

    def hook(name: str, bias: bool):
        def fn(_m: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
            a = inputs[0].detach().float()
            if bias:
                a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
            seen[name] = [a, out]
        return fn

    try:
        for n in layers:
            handles.append(mods[n].register_forward_hook(hook(n, mods[n].bias is not None)))
        yield seen
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _eval_with_grads(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) with every parameter requiring grad, restored afterwards."""
    was, flags = model.training, [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    try:
        for p, _ in flags:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        model.train(was)
        for p, f in flags:
            p.requires_grad_(f)


def token_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, T, V), per-token cross-entropy (B, T), 0 where y == -1)."""
    logits, _ = model(x, targets=y.clamp(min=0))  # targets: the model returns every position's logits
    ce = F.cross_entropy(logits.float().transpose(1, 2), y, ignore_index=-1, reduction="none")
    return logits, ce


def sample_labels(logits: torch.Tensor, first_index: int, seed: int = SEED) -> torch.Tensor:
    """Labels drawn from the model's own predictions (the true Fisher), row r with seed + first_index + r,
    so a window gets the same labels whatever batch or rank it is in."""
    probs = torch.softmax(logits.detach().float(), dim=-1)
    out = torch.empty(probs.shape[:2], dtype=torch.long, device=probs.device)
    for r in range(len(probs)):
        g = torch.Generator(device=probs.device).manual_seed(seed + first_index + r)
        out[r] = torch.multinomial(probs[r], 1, generator=g)[:, 0]
    return out


def layer_grads(model: nn.Module, layers: Sequence[str], x: torch.Tensor, y: torch.Tensor | None,
                weights: torch.Tensor | None = None, first_index: int = 0,
                ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Per layer (a (B, T, din'), g (B, T, dout)): inputs and the gradients at the outputs of
    sum_r weights[r] * (row r's summed token loss). y None: labels sampled from the model. The
    per-row gradient of a layer's weight is then sum_t g_t a_t^T. Also returns the (B, T) losses."""
    x = x.contiguous()
    with _eval_with_grads(model), capture(model, layers) as seen:
        logits, _ = model(x, targets=x)  # targets: every position's logits (their loss is not used)
        if y is None:
            y = sample_labels(logits, first_index)
        ce = F.cross_entropy(logits.float().transpose(1, 2), y, ignore_index=-1, reduction="none")
        w = torch.ones(len(x), device=x.device) if weights is None else weights
        outs = [seen[n][1] for n in layers]
        grads = torch.autograd.grad((ce.sum(1) * w).sum(), outs, allow_unused=True)
    res = {}
    for n, o, g in zip(layers, outs, grads, strict=True):
        res[n] = (seen[n][0], (torch.zeros_like(o) if g is None else g).detach().float())
    return res, ce.detach()


def per_example_grads(model: nn.Module, layers: Sequence[str], x: torch.Tensor, y: torch.Tensor,
                      weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """{layer: (B, dout, din')} gradient of each row's (weighted) summed token loss w.r.t. the layer's
    weight (bias as the last column), from the factorised a and g."""
    ag, _ = layer_grads(model, layers, x, y, weights)
    return {n: torch.einsum("bto,bti->boi", g, a) for n, (a, g) in ag.items()}


# ----------------------------------------------------------------------------------------------------
# fitting


def _batches(windows: torch.Tensor, batch_size: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    for lo in range(0, len(windows), batch_size):
        w = windows[lo:lo + batch_size]
        yield lo, w[:, :-1].contiguous(), w[:, 1:].contiguous()


def check_windows(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    w = torch.as_tensor(windows)
    if w.dim() != 2 or w.size(1) < 2 or len(w) == 0:
        raise UserError(f"windows must be (N, T+1) token ids with N >= 1 and T >= 1, got shape {tuple(w.shape)}")
    if w.size(1) - 1 > block_size(model):
        raise UserError(f"windows of {w.size(1) - 1} inputs exceed the model's block_size {block_size(model)}")
    return w.long().to(next(model.parameters()).device)


def _sides(model: nn.Module, layers: Sequence[str]) -> list[tuple[int, int]]:
    """(din', dout) per layer."""
    mods = dict(model.named_modules())
    return [(m.in_features + (m.bias is not None), m.out_features) for m in (mods[n] for n in layers)]


def covariances(model: nn.Module, layers: Sequence[str], windows: torch.Tensor, batch_size: int,
                first_index: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """Sums over tokens of a a^T and g g^T (float64), with sampled labels, and the token count."""
    sides = _sides(model, layers)
    sa = [torch.zeros(di, di, dtype=torch.float64) for di, _ in sides]
    ss = [torch.zeros(do, do, dtype=torch.float64) for _, do in sides]
    n_tok = 0
    for lo, x, _ in _batches(windows, batch_size):
        ag, _ = layer_grads(model, layers, x, None, first_index=first_index + lo)
        for i, n in enumerate(layers):  # float32 products (float64 matmuls are ~10x slower on a CPU), float64 sums
            a, g = (t.reshape(-1, t.size(-1)) for t in ag[n])
            sa[i] += (a.T @ a).double().cpu()
            ss[i] += (g.T @ g).double().cpu()
        n_tok += x.numel()
    return sa, ss, n_tok


def eigh_canonical(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """eigh with each eigenvector's sign fixed (largest-magnitude entry positive), so that sums that
    differ in the last bit (a sharded fit) give the same basis."""
    e, q = torch.linalg.eigh(m)
    idx = q.abs().argmax(0)
    return e, q * torch.sign(q[idx, torch.arange(q.size(1))])


def eigen_corrections(model: nn.Module, layers: Sequence[str], q_a: list[torch.Tensor], q_s: list[torch.Tensor],
                      windows: torch.Tensor, batch_size: int, first_index: int = 0) -> list[torch.Tensor]:
    """Sums over windows of (Q_S^T D_i Q_A)^2 (float64), D_i window i's gradient with sampled labels."""
    out = [torch.zeros(qs.size(0), qa.size(0), dtype=torch.float64) for qa, qs in zip(q_a, q_s, strict=True)]
    for lo, x, _ in _batches(windows, batch_size):
        ag, _ = layer_grads(model, layers, x, None, first_index=first_index + lo)
        for i, n in enumerate(layers):
            a, g = ag[n]
            dev = a.device
            rot = torch.einsum("bto,bti->boi", g @ q_s[i].to(dev).float(), a @ q_a[i].to(dev).float())
            out[i] += rot.square().sum(0).double().cpu()  # float32 squares, float64 sums over batches
    return out


def fit_ekfac(model: nn.Module, windows: torch.Tensor, *, damping: float | None = None, batch_size: int = 32,
              layers: Sequence[str] | None = None, n_train: int | None = None,
              reduce: Reduce | None = None, first_index: int = 0, allow_empty: bool = False) -> EkfacFactors:
    """EK-FAC factors of `model` fitted on `windows` ((N, T+1) token ids: inputs windows[:, :-1],
    targets windows[:, 1:]). damping: x each layer's mean eigenvalue (None: DEFAULT_DAMPING).
    n_train: the N of the scores' 1/N (default len(windows)). `reduce` sums a tensor over ranks and
    `first_index` is this rank's first window (a sharded fit equals one process; `allow_empty`: a rank
    may have none)."""
    if damping is not None and not damping > 0:
        raise UserError(f"damping={damping} must be > 0 (a fraction of each layer's mean eigenvalue)")
    if not (allow_empty and len(windows) == 0):
        windows = check_windows(model, windows)
    names = resolve_layers(model, layers)
    red: Reduce = reduce or (lambda t: t)
    sa, ss, n_tok = covariances(model, names, windows, batch_size, first_index)
    n_tok = int(red(torch.tensor([float(n_tok)], dtype=torch.float64)).item())
    q_a, q_s, e_a, e_s = [], [], [], []
    for a, s in zip(sa, ss, strict=True):
        ea, qa = eigh_canonical(red(a) / n_tok)
        es, qs = eigh_canonical(red(s) / n_tok)
        q_a.append(qa.float())
        q_s.append(qs.float())
        e_a.append(ea.clamp(min=0).float())
        e_s.append(es.clamp(min=0).float())
    lam = eigen_corrections(model, names, q_a, q_s, windows, batch_size, first_index)
    lambdas = [(red(x) / n_tok).float() for x in lam]
    mods = dict(model.named_modules())
    n = int(red(torch.tensor([float(len(windows))], dtype=torch.float64)).item())
    return EkfacFactors(names, [mods[x].bias is not None for x in names], q_a, q_s, e_a, e_s, lambdas,
                        damping=DEFAULT_DAMPING if damping is None else float(damping),
                        n_train=n if n_train is None else int(n_train), n_tokens=n_tok)


def ihvp(factors: EkfacFactors, grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """H^-1 v per layer for v = grads (each (dout, din') or (B, dout, din')): EK-FAC, damped."""
    out = []
    for i, (g, delta) in enumerate(zip(grads, factors.deltas(), strict=True)):
        qa, qs = factors.q_a[i].to(g.device), factors.q_s[i].to(g.device)
        rot = qs.T @ g @ qa
        out.append(qs @ (rot / (factors.lambdas[i].to(g.device) + delta)) @ qa.T)
    return out


# ----------------------------------------------------------------------------------------------------
# the query: which tokens it scores, and with which context


def query_rows(ids: Sequence[int], prompt_len: int, block_size: int,
               window: str = "chunked") -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs (R, W), targets (R, W), -1 = not scored): the query's tokens ids[prompt_len:] each
    predicted from the context generation gave it (glassgpt.generate.window_length: beyond block_size,
    'chunked' windows restart at block_size // 2 tokens, 'sliding' ones keep the last block_size).
    Every scored token once."""
    x, y, _ = query_layout(ids, prompt_len, block_size, window)
    return x, y


def query_layout(ids: Sequence[int], prompt_len: int, block_size: int,
                 window: str = "chunked") -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """query_rows plus each row's start in `ids` (row r position p predicts ids[start + p + 1])."""
    ids = list(ids)
    if len(ids) < 2 or not 0 <= prompt_len < len(ids):
        raise UserError(f"nothing to trace: the query has {len(ids)} token(s) and prompt_len={prompt_len}; "
                        "it needs at least one token after the prompt (and one before it)")
    if window not in ("chunked", "sliding"):
        raise UserError(f"window rule {window!r} is not one of chunked, sliding")
    prompt_len = max(prompt_len, 1)
    bs = block_size
    if window == "sliding":  # row s >= 1 predicts only token s + bs, from the bs tokens before it
        first, starts = bs - 1, [0, *range(1, max(1, len(ids) - bs))]
    else:  # row j >= 1 starts at j * step and owns the predictions of tokens s + keep .. s + bs
        keep = max(1, bs // 2)
        step = bs - keep + 1
        first, starts = keep - 1, [0]
        while bs + 1 + (len(starts) - 1) * step <= len(ids) - 1:
            starts.append(len(starts) * step)
    rows, tgts, kept = [], [], []
    for j, s in enumerate(starts):
        x = ids[s:s + bs]
        y = [-1] * len(x)
        for p in range(0 if j == 0 else first, len(x)):
            n = s + p + 1  # index of the token predicted at position p
            if prompt_len <= n < len(ids):
                y[p] = ids[n]
        if any(t >= 0 for t in y):
            rows.append(x)
            tgts.append(y)
            kept.append(s)
    width = max(map(len, rows))  # a shorter last row is padded: causal, so padding changes nothing before it
    rows = [r + [0] * (width - len(r)) for r in rows]
    tgts = [t + [-1] * (width - len(t)) for t in tgts]
    return torch.tensor(rows, dtype=torch.long), torch.tensor(tgts, dtype=torch.long), kept


def query_gradient(model: nn.Module, layers: Sequence[str], ids: Sequence[int], prompt_len: int,
                   window: str = "chunked") -> list[torch.Tensor]:
    """Per layer (dout, din'): gradient of the query's summed loss over ids[prompt_len:]."""
    x, y = query_rows(ids, prompt_len, block_size(model), window)
    dev = next(model.parameters()).device
    g = per_example_grads(model, layers, x.to(dev), y.to(dev))
    return [g[n].sum(0) for n in layers]


# ----------------------------------------------------------------------------------------------------
# scoring


def score_batch(model: nn.Module, factors: EkfacFactors, v: Sequence[torch.Tensor], x: torch.Tensor,
                y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores (B,), per-position contributions (B, T)) of rows x/y against v = H^-1 g_q / N: the
    factorised sum_t g_t^T v a_t of each row's mean token loss, never forming a per-row gradient."""
    ag, ce = layer_grads(model, factors.layers, x, y)
    per_pos = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for n, vl in zip(factors.layers, v, strict=True):
        a, g = ag[n]
        per_pos += ((a @ vl.to(a.device).T) * g).sum(-1).double()
    n_tok = (y >= 0).sum(1).clamp(min=1).double()
    per_pos = per_pos / n_tok[:, None]
    return per_pos.sum(1), per_pos


def query_direction(model: nn.Module, factors: EkfacFactors, query_ids: Sequence[int],
                    prompt_len: int, window: str = "chunked") -> list[torch.Tensor]:
    """H^-1 g_q / N per layer: what every training window's gradient is dotted with."""
    g_q = query_gradient(model, factors.layers, query_ids, prompt_len, window)
    return [t / factors.n_train for t in ihvp(factors, g_q)]


def influence_scores(model: nn.Module, factors: EkfacFactors, windows: torch.Tensor, query_ids: Sequence[int],
                     prompt_len: int, *, batch_size: int = 32, window: str = "chunked") -> np.ndarray:
    """(N,) float64: the predicted change (nats) of the query's summed loss over query_ids[prompt_len:]
    if each window were removed from training, (1/N) g_q^T H^-1 g_i; + = proponent. `window`: the
    sampler's rule for the context of query tokens beyond block_size."""
    windows = check_windows(model, windows)
    v = query_direction(model, factors, query_ids, prompt_len, window)
    out = np.zeros(len(windows), dtype=np.float64)
    for lo, x, y in _batches(windows, batch_size):
        out[lo:lo + len(x)] = score_batch(model, factors, v, x, y)[0].cpu().numpy()
    return out
