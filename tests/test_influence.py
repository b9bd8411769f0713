"""Influence engine oracles: hook gradients vs torch.func, EK-FAC vs dense matrices, influence vs
leave-one-out retraining, tail-patch, and the query's token windows vs the sampler's rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from glassgpt.errors import UserError
from glassgpt.generate import window_length
from glassgpt.model import GPT, GPTConfig
from glassgpt.trace import influence as inf

ALL_OPTIONS = dict(rope=True, qk_norm=True, value_embed=True, smear=True, attn_gate=True, tie_embeddings=False,
                   activation="relu2", logit_softcap=15.0, bias=True)


def tiny_gpt(vocab: int = 20, block_size: int = 8, **kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=block_size, vocab_size=vocab, n_layer=2, n_head=2, n_embd=16, **kw)).eval()


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


# ------------------------------------------------------------------------------------------ the query


@pytest.mark.parametrize("window", ["chunked", "sliding"])
@pytest.mark.parametrize("n,prompt_len,bs", [(5, 2, 8), (8, 1, 8), (9, 1, 8), (40, 3, 8), (41, 30, 9), (100, 0, 16)])
def test_query_rows_score_each_token_once_with_the_samplers_context(n, prompt_len, bs, window):
    ids = list(range(100, 100 + n))
    x, y = inf.query_rows(ids, prompt_len, bs, window)
    seen = {}
    for r in range(len(x)):
        for p in np.flatnonzero(y[r].numpy() >= 0):
            tok = int(y[r, p])
            ctx = x[r, : p + 1].tolist()
            assert tok not in seen, f"token {tok} scored twice"
            assert ctx == ids[tok - 100 - len(ctx): tok - 100], "context is not the tokens just before"
            seen[tok] = len(ctx)
    want = {100 + i: window_length(i, bs, window) for i in range(max(prompt_len, 1), n)}
    assert seen == want


def test_query_needs_a_scored_token():
    with pytest.raises(UserError, match="nothing to trace"):
        inf.query_rows([1, 2, 3], 3, 8)


# ------------------------------------------------------------------------------------------ gradients


@pytest.mark.parametrize("options", [{}, ALL_OPTIONS], ids=["gpt2", "all-options"])
def test_hook_per_example_grads_equal_torch_func(options):
    model = tiny_gpt(**options)
    layers = inf.default_layers(model)
    x, y = torch.randint(0, 20, (3, 8)), torch.randint(0, 20, (3, 8))
    y[1, :3] = -1  # masked targets count nothing
    hooked = inf.per_example_grads(model, layers, x, y)
    # remove_duplicate=False: a tied lm_head gets its own entry, so its gradient is the head's use only
    # (what the hooks see), not the sum with the embedding's
    params = {k: v.detach() for k, v in model.named_parameters(remove_duplicate=False)}

    def loss(p, xi, yi):
        logits, _ = functional_call(model, p, (xi[None],), {"targets": xi[None]}, tie_weights=False)
        return nn.functional.cross_entropy(logits[0], yi, ignore_index=-1, reduction="sum")

    ref = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    mods = dict(model.named_modules())
    for n in layers:
        w = ref[f"{n}.weight"]
        want = torch.cat([w, ref[f"{n}.bias"][..., None]], -1) if mods[n].bias is not None else w
        torch.testing.assert_close(hooked[n], want, atol=2e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
    gates = 2 + 1 if options else 0  # an attention gate per block and the smear gate
    assert "lm_head" in layers and len(layers) == 2 * 4 + gates + 1


# ------------------------------------------------------------------------------------------ EK-FAC


def dense_ekfac(f: inf.EkfacFactors, i: int) -> torch.Tensor:
    """Layer i's damped EK-FAC matrix, formed densely over vec(W) (column-major, as kron(Q_A, Q_S))."""
    q = torch.kron(f.q_a[i].double(), f.q_s[i].double())
    lam = f.lambdas[i].double().T.reshape(-1) + f.deltas()[i]
    return q @ torch.diag(lam) @ q.T


def test_eigenvalue_correction_is_the_fisher_diagonal_and_ihvp_is_a_dense_solve():
    model = tiny_gpt(bias=True)
    torch.manual_seed(1)
    windows = torch.randint(0, 20, (12, 9))
    f = inf.fit_ekfac(model, windows, batch_size=5, layers=["transformer.h.0.mlp.c_fc", "lm_head"])
    # the sampled-label per-window gradients, densely: Fisher = mean over tokens of vec(D) vec(D)^T
    ag = [inf.layer_grads(model, f.layers, windows[lo:lo + 5, :-1], None, first_index=lo)[0]
          for lo in range(0, 12, 5)]
    for i, n in enumerate(f.layers):
        d = torch.cat([torch.einsum("bto,bti->boi", g, a) for part in ag for a, g in [part[n]]]).double()
        vec = d.transpose(1, 2).reshape(len(d), -1)  # column-major vec
        fisher = vec.T @ vec / f.n_tokens
        q = torch.kron(f.q_a[i].double(), f.q_s[i].double())
        torch.testing.assert_close(torch.diagonal(q.T @ fisher @ q), f.lambdas[i].double().T.reshape(-1),
                                   atol=1e-6, rtol=1e-3)
        v = torch.randn(d.shape[1:], dtype=torch.float64)
        got = inf.ihvp(f, [v.float() if j == i else torch.zeros_like(f.lambdas[j]) for j in range(len(f.layers))])[i]
        want = torch.linalg.solve(dense_ekfac(f, i), v.T.reshape(-1)).reshape(v.shape[1], v.shape[0]).T
        torch.testing.assert_close(got.double(), want, atol=1e-5 * float(want.abs().max()), rtol=1e-3)


def test_influence_scores_equal_dense_gradient_dot_products():
    """(1/N) g_q^T H^-1 g_i with the per-window gradients from torch.func and H formed densely."""
    model = tiny_gpt(**ALL_OPTIONS)
    windows = torch.randint(0, 20, (6, 9))
    f = inf.fit_ekfac(model, windows, batch_size=4)
    query = [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    got = inf.influence_scores(model, f, windows, query, 2, batch_size=4)
    gq = inf.query_gradient(model, f.layers, query, 2)
    gi = inf.per_example_grads(model, f.layers, windows[:, :-1], windows[:, 1:])
    want = np.zeros(len(windows))
    for li, n in enumerate(f.layers):
        h = dense_ekfac(f, li)
        u = torch.linalg.solve(h, gq[li].double().T.reshape(-1))
        want += (gi[n].double().transpose(1, 2).reshape(len(windows), -1) @ u).numpy() / 8 / len(windows)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())


def test_shards_sums_add_up_to_the_whole():
    """What a sharded fit all-reduces: each shard's sums (labels seeded by the global window index)."""
    model = tiny_gpt()
    windows = torch.randint(0, 20, (10, 9))
    f = inf.fit_ekfac(model, windows, batch_size=3)
    shards = ((0, 4), (4, 10))
    parts = [inf.covariances(model, f.layers, windows[lo:hi], 3, lo) for lo, hi in shards]
    whole = inf.covariances(model, f.layers, windows, 3, 0)
    lam = [inf.eigen_corrections(model, f.layers, f.q_a, f.q_s, windows[lo:hi], 3, lo) for lo, hi in shards]
    lam_whole = inf.eigen_corrections(model, f.layers, f.q_a, f.q_s, windows, 2, 0)  # batching must not matter
    for i in range(len(f.layers)):
        for j in (0, 1):
            torch.testing.assert_close(parts[0][j][i] + parts[1][j][i], whole[j][i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lam[0][i] + lam[1][i], lam_whole[i], rtol=1e-4, atol=1e-6)
    assert parts[0][2] + parts[1][2] == whole[2] == f.n_tokens


# ------------------------------------------------------------------------------------------ counterfactuals


class SoftmaxRegression(nn.Module):
    """Next token from a one-hot of the current one: a convex model with GPT's call signature, where the
    Gauss-Newton matrix is the Hessian and leave-one-out retraining converges exactly."""

    def __init__(self, vocab: int):
        super().__init__()
        self.config = GPTConfig(block_size=16, vocab_size=vocab, n_layer=1, n_head=1, n_embd=vocab)
        self.lm_head = nn.Linear(vocab, vocab)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        return self.lm_head(nn.functional.one_hot(idx, self.config.vocab_size).to(self.lm_head.weight.dtype)), None


def train_convex(model: nn.Module, windows: torch.Tensor, keep: torch.Tensor, l2: float) -> None:
    """Minimise (1/N) sum_{i kept} window i's mean token loss + l2/2 |theta|^2 (N = all windows)."""
    opt = torch.optim.LBFGS(model.parameters(), max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")
    x, y = windows[keep, :-1], windows[keep, 1:]

    def closure():
        opt.zero_grad()
        ce = nn.functional.cross_entropy(model(x)[0].transpose(1, 2), y, reduction="none").mean(1)
        loss = ce.sum() / len(windows) + l2 / 2 * sum(p.square().sum() for p in model.parameters())
        loss.backward()
        return loss

    opt.step(closure)


def query_loss(model: nn.Module, query: list[int], prompt_len: int) -> float:
    x, y = inf.query_rows(query, prompt_len, model.config.block_size)
    with torch.no_grad():
        logits = model(x, targets=x)[0]  # targets: every position's logits
        return float(nn.functional.cross_entropy(logits.transpose(1, 2), y, ignore_index=-1, reduction="sum"))


def convex_loo(n: int = 24, l2: float = 1e-2, vocab: int = 6):
    """A convex problem where leave-one-out retraining is exact: softmax regression on n windows of a
    Markov chain (every fourth window random). Returns (windows, trained base, query, measured change
    of the query's loss when each window is left out)."""
    torch.manual_seed(0)
    trans = torch.softmax(torch.randn(vocab, vocab) * 1.5, -1)  # a Markov chain, then some odd windows
    windows = torch.zeros(n, 7, dtype=torch.long)
    for i in range(n):
        windows[i, 0] = i % vocab
        for t in range(1, 7):
            windows[i, t] = torch.multinomial(trans[windows[i, t - 1]], 1) if i % 4 else torch.randint(0, vocab, ())
    base = SoftmaxRegression(vocab).double()
    train_convex(base, windows, torch.ones(n, dtype=torch.bool), l2)
    query = [0, 1, 2, 3, 4, 5, 0, 2]
    actual = []
    for i in range(n):
        m = SoftmaxRegression(vocab).double()
        m.load_state_dict(base.state_dict())
        train_convex(m, windows, torch.arange(n) != i, l2)
        actual.append(query_loss(m, query, 2) - query_loss(base, query, 2))
    return windows, base, query, actual


def test_influence_agrees_with_leave_one_out_retraining():
    n, l2 = 24, 1e-2
    windows, base, query, actual = convex_loo(n, l2)
    model = base.float()
    # the Fisher from sampled labels is noisy on 24 short windows: fit it on 40 passes of them
    f = inf.fit_ekfac(model, windows.repeat(40, 1), n_train=n)
    f.damping = l2 / float(f.lambdas[0].mean())  # damping = the L2 term: the Hessian's own
    pred = inf.influence_scores(model, f, windows, query, 2)
    rho, signs = spearman(pred, np.array(actual)), float(np.mean(np.sign(pred) == np.sign(actual)))
    rand = spearman(np.random.default_rng(0).normal(size=n), np.array(actual))
    actual = np.array(actual)
    slope = float(pred @ actual / (actual @ actual))  # the scale: nats, with the 1/N convention
    print(f"LOO: Spearman {rho:.3f}, sign agreement {signs:.2f}, slope {slope:.2f}; random scores: Spearman {rand:.3f}")
    # measured: EK-FAC 0.85 (the exact Hessian's influence function: 0.99; EK-FAC's basis is not exact here)
    assert rho > 0.75 and signs >= 0.85 and 0.5 < slope < 2 and abs(rand) < 0.75


def trained_tiny_gpt(steps: int = 40) -> tuple[GPT, torch.Tensor]:
    """A 2-layer GPT trained on 48 fixed windows of a few repeating patterns (some shared, some rare)."""
    torch.manual_seed(0)
    patterns = [[1, 2, 3, 4], [5, 6, 7, 8], [1, 6, 3, 8], [9, 10, 11, 12], [13, 2, 14, 4]]
    windows = torch.tensor([(patterns[i % 5 if i % 7 else 4] * 3)[: 9] for i in range(48)])
    x, y = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
    windows[::3, 4] = torch.randint(1, 15, (16,))  # noise, so windows differ
    model = tiny_gpt(vocab=16, block_size=8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        _, loss = model(x, targets=y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), windows


def test_tail_patch_top_proponent_teaches_more_than_random_windows():
    """One SGD step on the top proponent raises the query's log-probability more than a step on most
    random windows; the top opponent (the control, scored by the same engine) does not. (Measured:
    the top proponent's gain is the largest of all 48 windows; a model trained to ~0 loss breaks this.)"""
    model, windows = trained_tiny_gpt()
    query, prompt = [13, 2, 14, 4, 13, 2, 14], 3
    f = inf.fit_ekfac(model, windows, batch_size=16)
    scores = inf.influence_scores(model, f, windows, query, prompt, batch_size=16)

    def gain(i: int, lr: float = 1e-3) -> float:  # small: the first-order regime influence predicts
        m = tiny_gpt(vocab=16, block_size=8)
        m.load_state_dict(model.state_dict())
        _, loss = m(windows[i:i + 1, :-1].contiguous(), targets=windows[i:i + 1, 1:].contiguous())
        loss.backward()
        with torch.no_grad():
            for p in m.parameters():
                p -= lr * p.grad
        return query_loss(model, query, prompt) - query_loss(m, query, prompt)  # + = log p(query) rose

    rand = [gain(i) for i in np.random.default_rng(0).choice(len(windows), 16, replace=False)]
    top, bottom = gain(int(np.argmax(scores))), gain(int(np.argmin(scores)))
    print(f"tail-patch gain: top proponent {top:+.4f}, top opponent {bottom:+.4f}, "
          f"random median {np.median(rand):+.4f} (max {max(rand):+.4f})")
    assert top > np.quantile(rand, 0.75) and bottom < np.median(rand)
