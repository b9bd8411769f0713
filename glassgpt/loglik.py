"""Log-likelihoods of continuations given contexts, batched: what multiple choice (glassgpt.evaluate)
and LAMBADA (glassgpt.lambada) score with."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glassgpt.errors import UserError
from glassgpt.model import GPT
from glassgpt.tokenizer import Tokenizer


def encode_pair(tok: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Tokens of context and continuation as the harness makes them: encode the whole string and split
    it after the context's tokens (trailing context spaces move to the continuation)."""
    n_space = len(context) - len(context.rstrip())
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    ctx_ids = tok.encode(context)
    whole = tok.encode(context + continuation)
    return ctx_ids, whole[len(ctx_ids):]


def continuation_logprobs(model: GPT, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
    """Sum of log p(continuation tokens | context) for each (context ids, continuation ids) pair."""
    return [ll for ll, _ in continuation_scores(model, pairs)]


@torch.no_grad()
def continuation_scores(model: GPT, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """(sum of log p(continuation tokens | context), whether every continuation token is the model's
    argmax) for each (context ids, continuation ids) pair, in one right-padded batch (causal attention:
    padding after a row never changes its scores)."""
    T = model.config.block_size
    rows, spans = [], []
    for ctx, cont in pairs:
        if not cont:
            raise UserError("an ending encodes to no tokens; every ending needs some text")
        full = (ctx + cont)[-(T + 1):]  # keep the end: the continuation and as much context as fits
        n = min(len(cont), len(full) - 1)
        rows.append(full)
        spans.append(n)
    width = max(len(r) for r in rows) - 1
    device = next(model.parameters()).device
    x = torch.zeros(len(rows), width, dtype=torch.long)
    y = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, : len(r) - 1] = torch.tensor(r[:-1])
        y[i, : len(r) - 1] = torch.tensor(r[1:])
    h = model.hidden_states(x.to(device))
    r_idx = torch.cat([torch.full((n,), i) for i, n in enumerate(spans)])
    c_idx = torch.cat([torch.arange(len(r) - 1 - n, len(r) - 1) for r, n in zip(rows, spans, strict=False)])
    logp = F.log_softmax(model.head(h[r_idx, c_idx]).float(), dim=-1)
    target = y.to(device)[r_idx, c_idx]
    picked = logp.gather(1, target[:, None])[:, 0].double().cpu()
    greedy = (logp.argmax(dim=-1) == target).cpu()
    return [(float(s.sum()), bool(g.all())) for s, g in zip(picked.split(spans), greedy.split(spans), strict=True)]
