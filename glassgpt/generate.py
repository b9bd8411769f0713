"""The KV-cache inference engine behind sample.py and every trace that generates text.

nanoGPT's `model.generate` runs the whole context through the network for every new token. This
engine runs the prompt once (*prefill*), keeps each layer's keys and values in a preallocated cache,
and then feeds one token per step (*decode*): the new token's query attends to the cached keys, so a
step costs one token's worth of matmuls instead of a whole window's.

    from glassgpt.generate import generate
    from glassgpt.sampling import complete
    complete(model, tokenizer, "ROMEO:", 100).text                   # greedy, one prompt
    generate(model, [ids_a, ids_b], 100, temperature=0.8, top_k=200, seed=1)  # a batch of prompts

How the batch is laid out. Prompts of different lengths are left-padded to a common length, so the
last column is every row's newest token and decode steps write one shared slot. Each row's position
ids start at 0 at its own first token, and a key-padding mask hides the padding, so a row computes
exactly what it would alone: greedy output does not depend on what else is in the batch. Rows that
stop (stop token or stop string) leave the batch. Sampling draws from one torch.Generator per row,
seeded `seed + row`, so sample i is also independent of the batch and the same seed gives the same
text; for one row its draws are those of nanoGPT's `torch.manual_seed(seed); model.generate(...)`.

Beyond block_size. The model knows positions 0..block_size-1 only (learned `wpe` rows, or rotary
angles it was trained on): once a sequence is longer, the tokens kept must be re-embedded at new
positions, and a rolling cache (drop the oldest key, keep the rest) would be inexact for `wpe`. The engine
therefore never shifts cached keys; each step
conditions on a *window* of the latest tokens, given by `window_length(n)` for a sequence of n
tokens, with positions 0.. from the window's first token, and every step's logits are exactly those
of a full forward pass over that window (the oracle `full_recompute_generate` checks this). Two rules:

- `window="chunked"` (default): when the window is full (block_size tokens), start a new one from
  the last block_size//2 tokens (one prefill), then decode into it until it is full again. Each token
  sees between block_size//2 and block_size tokens; the cost is one half-window prefill per
  block_size//2 tokens, so long generations stay ~as fast as short ones.
- `window="sliding"`: nanoGPT's rule, every token sees the last block_size tokens. Past block_size the
  window moves every step, so the engine re-prefills it every step (as slow as nanoGPT there), and the
  output is token for token `model.generate`'s.

Per-step hooks. `on_step(step: Step)` is called after every forward pass with the tokens just chosen,
their logits, the pass's final hidden states and, for each position of the pass, which token of the
row's sequence it is (`token_index`): a trace can record what it needs per generated token without a
second forward pass. Every pass is the model's own `GPT.forward(idx, kv_cache=cache)` (the cache
below supplies positions, the padding mask and earlier keys), so named hooks (glassgpt/hooks.py) fire
during generation exactly as in a full forward, once per pass with the pass's (B, T, ...) tensors.
See docs/generation.md and docs/architecture.md.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch.nn import functional as F

from glassgpt.model import GPT

WINDOWS = ("chunked", "sliding")


def window_length(n: int, block_size: int, window: str = "chunked") -> int:
    """How many of a sequence's latest n tokens the next token is predicted from.

    Up to block_size: all of them. Beyond: 'sliding' keeps block_size; 'chunked' cycles through
    block_size//2, block_size//2 + 1, ..., block_size, then back to block_size//2.
    A pure function of n, so a row's result never depends on the rest of its batch.
    """
    if n <= block_size:
        return n
    if window == "sliding":
        return block_size
    if window != "chunked":
        raise ValueError(f"window must be one of {WINDOWS}, got {window!r}")
    keep = max(1, block_size // 2)
    return keep + (n - block_size - 1) % (block_size - keep + 1)


@dataclass
class Step:
    """What one forward pass of the engine saw and chose; passed to `on_step`."""

    index: int
    """Which new token this pass chose: 0 for the one after the prompt, then 1, 2, ..."""
    rows: list[int]
    """The prompt (index into `prompts`) of each batch row; finished rows have left the batch."""
    tokens: torch.Tensor
    """(B,) the token chosen for each row."""
    logits: torch.Tensor
    """(B, vocab) the raw logits it was chosen from (before temperature, top-k, top-p)."""
    hidden: torch.Tensor
    """(B, T, n_embd) final layer-normed hidden states of this pass (what lm_head scores)."""
    token_index: torch.Tensor
    """(B, T) for each position of this pass, the index of its token in the row's prompt+generated
    sequence; -1 for padding. T = 1 on decode steps."""
    prefill: bool
    """True when this pass (re)built the cache from a window of tokens (the first step, and whenever
    the window moves past block_size): positions that earlier passes already saw are seen again."""


@dataclass
class Completion:
    """One prompt's generation, as text and as token ids."""

    prompt: str
    text: str
    """The generated text only (the prompt excluded), cut just after the stop string if it came."""
    prompt_ids: list[int]
    output_ids: list[int]
    """The generated token ids (a stop token / the token completing a stop string included)."""


class TextStream:
    """Text of generated tokens as they arrive, never splitting a multi-byte UTF-8 character.

    A GPT-2 BPE token may end halfway through a character (an emoji can span several tokens), so
    token bytes go through an incremental UTF-8 decoder that holds back an unfinished character.
    The concatenated pieces plus `flush()` equal `tokenizer.decode(all ids)`.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._token_bytes = getattr(tokenizer, "token_bytes", None)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        if self._token_bytes is None:  # char-level: every token is whole characters
            return self.tokenizer.decode([token])
        return self._utf8.decode(self._token_bytes(token))

    def flush(self) -> str:
        return "" if self._token_bytes is None else self._utf8.decode(b"", final=True)


class KVCache:
    """Keys and values of every layer, preallocated, and where the sequence stands (nanochat-style).

    `GPT.forward(idx, kv_cache=cache)` asks `prepare(T)` for the position ids of the T new tokens and
    the attention mask, each layer's attention calls `write` (its keys join the cache; it gets all
    keys so far back), and `advance(T)` moves past them. Rows may be left-padded by different amounts
    (`reset(pad)`): a row's positions start at 0 at its first real token and its queries never see
    padding, so each row computes what it would alone. k[layer] is (B, n_head, capacity, head_size),
    allocated on the first write in the dtype the attention produced (bf16 under CUDA autocast)."""

    def __init__(self, n_layer: int, capacity: int, pad: torch.Tensor | None = None):
        self.n_layer, self.capacity = n_layer, capacity
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.reset(pad)

    def reset(self, pad: torch.Tensor | None = None) -> None:
        """Start over at slot 0 (the allocation is reused); pad (B,) = left-padding slots per row."""
        self.filled = 0  # slots in use, shared by all rows (the padded length)
        self.pad = pad if pad is not None and bool(pad.any()) else None
        self.mask: torch.Tensor | None = None
        self.prev_embed: torch.Tensor | None = None  # (B, 1, C): the last token's embedding, for smear
        self.prev_ids: torch.Tensor | None = None  # (B, ngram-1): the last tokens, for n-gram embeddings

    def prepare(self, T: int, device: torch.device) -> torch.Tensor:
        """Position ids (B or 1, T) of the next T tokens; sets `mask` for this pass: (B, 1, T, S) bool
        (True = may attend; S = filled + T), or None where SDPA's own causal rule is exact."""
        start = self.filled
        if start + T > self.capacity:
            raise ValueError(f"KV cache overflow: {start + T} > capacity {self.capacity}")
        q = torch.arange(start, start + T, device=device)  # the slots of this pass's queries
        pad = self.pad if self.pad is not None else torch.zeros(1, dtype=torch.long, device=device)
        pos = (q[None, :] - pad[:, None]).clamp(min=0)
        if self.pad is None and (start == 0 or T == 1):
            self.mask = None  # no padding, and causal is either square (prefill) or all keys (decode)
            return pos
        keys = torch.arange(start + T, device=device)
        mask = (keys[None, :] <= q[:, None])[None]  # (1, T, S) causal
        if self.pad is not None:
            # padding keys hidden; a padding query sees itself only, so no softmax row is all -inf
            real = keys[None, None, :] >= self.pad[:, None, None]
            mask = (mask & real) | (keys[None, None, :] == q[None, :, None])
        self.mask = mask[:, None]
        return pos

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, T, hs) at the next T slots and return this layer's keys/values so far."""
        if self.k is None:
            B, nh, _, hs = k.shape
            shape = (self.n_layer, B, nh, self.capacity, hs)
            self.k = torch.empty(shape, dtype=k.dtype, device=k.device)
            self.v = torch.empty(shape, dtype=v.dtype, device=v.device)
        end = self.filled + k.size(2)
        self.k[layer, :, :, self.filled:end] = k
        self.v[layer, :, :, self.filled:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, T: int) -> None:
        self.filled += T

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop the batch rows not in `rows` (finished generations)."""
        if self.k is not None:
            self.k = self.k.index_select(1, rows)
            self.v = self.v.index_select(1, rows)
        if self.pad is not None:
            self.pad = self.pad.index_select(0, rows)
        if self.prev_embed is not None:
            self.prev_embed = self.prev_embed.index_select(0, rows)
        if self.prev_ids is not None:
            self.prev_ids = self.prev_ids.index_select(0, rows)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generators: Sequence[torch.Generator]) -> torch.Tensor:
    """(B, vocab) logits -> (B,) token ids. temperature 0 is greedy (argmax). Otherwise nanoGPT's
    order: divide by temperature, keep the top_k, then (new) the smallest set of tokens whose
    probability reaches top_p, softmax, and one multinomial draw per row from that row's generator."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float("Inf")
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        p = F.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first always stays)
        drop_sorted = (p.cumsum(dim=-1) - p) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), -float("Inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.cat([torch.multinomial(probs[b : b + 1], 1, generator=g)[0] for b, g in enumerate(generators)])


def _check_args(model: GPT, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                top_k: int | None, top_p: float | None, window: str) -> None:
    if window not in WINDOWS:
        raise ValueError(f"window must be one of {WINDOWS}, got {window!r}")
    if max_new_tokens < 0 or temperature < 0:
        raise ValueError("max_new_tokens and temperature must be >= 0")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
    vocab = model.config.vocab_size
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: give at least one token (GPT-2: <|endoftext|>)")
        if min(p) < 0 or max(p) >= vocab:
            raise ValueError(f"prompt {i} has token ids outside the model's vocabulary [0, {vocab})")


def _generators(n: int, seed: int | None, device: torch.device) -> list[torch.Generator]:
    if seed is None:  # follow the global RNG, so torch.manual_seed still makes runs repeatable
        seed = int(torch.randint(0, 2**62, ()).item())
    return [torch.Generator(device=device).manual_seed(seed + i) for i in range(n)]


class _StopCheck:
    """Finds stop strings in a row's generated text as it streams in."""

    def __init__(self, stop: list[str], tokenizer):
        self.stop, self.stream, self.text = stop, TextStream(tokenizer), ""

    def push(self, token: int) -> bool:
        piece = self.stream.push(token)
        start = max(0, len(self.text) - max(map(len, self.stop)) + 1)
        self.text += piece
        return any(s in self.text[start:] for s in self.stop)


def _run_window(model: GPT, seqs: list[list[int]], active: list[int], want: list[int], cache: KVCache,
                prefill: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass of `generate`: (hidden (B, T, n_embd), token_index (B, T) of each position in
    its sequence, -1 for padding). Prefill (re)builds the cache from each row's window, left-padded,
    positions from 0 per row; decode feeds each row's newest token at the next slot."""
    device = model.lm_head.weight.device
    if prefill:
        W = max(want)
        pad = torch.tensor([W - w for w in want], device=device)
        idx = torch.tensor([[0] * (W - w) + seqs[r][-w:] for r, w in zip(active, want, strict=False)], device=device)
        cache.reset(pad)
        hidden = model(idx, kv_cache=cache, stop_at_layer=model.config.n_layer)  # (B, W, n_embd)
        j = torch.arange(W, device=device)
        start = torch.tensor([len(seqs[r]) - W for r in active], device=device)
        return hidden, (start[:, None] + j[None, :]).masked_fill(j[None, :] < pad[:, None], -1)
    idx = torch.tensor([[seqs[r][-1]] for r in active], device=device)
    hidden = model(idx, kv_cache=cache, stop_at_layer=model.config.n_layer)  # (B, 1, n_embd)
    return hidden, torch.tensor([[len(seqs[r]) - 1] for r in active], device=device)


def _record_tokens(tokens: list[int], active: list[int], seqs: list[list[int]], outputs: list[list[int]],
                   on_token: Callable[[int, int], None] | None, stop_ids: set[int],
                   stops: list[_StopCheck] | None) -> list[int]:
    """Append each row's new token (and stream it); returns the batch rows that go on."""
    keep = []
    for row, (r, tok) in enumerate(zip(active, tokens, strict=False)):
        seqs[r].append(tok)
        outputs[r].append(tok)
        if on_token is not None:
            on_token(r, tok)
        stopped = tok in stop_ids
        if stops is not None:
            stopped = stops[r].push(tok) or stopped
        if not stopped:
            keep.append(row)
    return keep


@torch.no_grad()  # no autograd graph: neither the steps nor the tensors handed to callbacks require grad
def generate(
    model: GPT,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_ids: Sequence[int] | None = None,
    stop: str | Sequence[str] | None = None,
    tokenizer=None,
    on_token: Callable[[int, int], None] | None = None,
    on_step: Callable[[Step], None] | None = None,
    window: str = "chunked",
) -> list[list[int]]:
    """Generate up to max_new_tokens for each prompt (lists of token ids) in one batch; returns the new
    tokens per prompt.

    temperature 0 = greedy; top_k / top_p filter before sampling; seed makes sampling repeatable
    (row i draws from its own generator seeded seed+i; None follows the global RNG). A row stops after
    a token in `stop_ids` or once its text contains a `stop` string (needs `tokenizer`); the stopping
    token is kept. `on_token(row, token)` is called for each new token as it is chosen (streaming),
    `on_step(Step)` after each forward pass. `window` says what is kept past block_size (see module
    docstring). The model is run in eval mode and put back as it was.
    """
    _check_args(model, prompts, max_new_tokens, temperature, top_k, top_p, window)
    if isinstance(stop, str):
        stop = [stop]
    stop = [s for s in (stop or []) if s]
    if stop and tokenizer is None:
        raise ValueError("stop strings need the tokenizer (tokenizer=...) to read the generated text")
    stop_set = set(stop_ids or [])
    device = model.lm_head.weight.device
    bs = model.config.block_size
    outputs: list[list[int]] = [[] for _ in prompts]
    seqs = [list(p) for p in prompts]  # prompt + generated, per prompt
    active = list(range(len(prompts)))  # prompt index of each batch row
    gens = _generators(len(prompts), seed, device)
    stops = [_StopCheck(stop, tokenizer) for _ in prompts] if stop else None
    # A window never grows past its first length + max_new_tokens, nor past block_size.
    capacity = min(bs, max((window_length(len(p), bs, window) for p in prompts), default=1) + max_new_tokens)
    cache = KVCache(model.config.n_layer, capacity)
    cur: list[int] = []  # window length held in the cache, per row

    was_training = model.training
    model.eval()
    try:
        for t in range(max_new_tokens):
            if not active:
                break
            want = [window_length(len(seqs[r]), bs, window) for r in active]
            prefill = t == 0 or cache.filled >= capacity or any(w != c + 1 for w, c in zip(want, cur, strict=False))
            hidden, token_index = _run_window(model, seqs, active, want, cache, prefill)
            cur = want
            logits = model.head(hidden[:, -1]).float()  # (B, vocab)
            tokens = sample_next(logits, temperature, top_k, top_p, [gens[r] for r in active])
            if on_step is not None:
                on_step(Step(t, list(active), tokens, logits, hidden, token_index, prefill))
            keep = _record_tokens(tokens.tolist(), active, seqs, outputs, on_token, stop_set, stops)
            if len(keep) < len(active):
                rows = torch.tensor(keep, dtype=torch.long, device=device)
                cache.keep_rows(rows)
                active = [active[i] for i in keep]
                cur = [cur[i] for i in keep]
    finally:
        model.train(was_training)
    return outputs


@torch.no_grad()
def full_recompute_generate(
    model: GPT,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    window: str = "sliding",
) -> list[list[int]]:
    """The slow oracle: one prompt at a time, a full forward pass over the window for every token, no
    cache. window='sliding' is nanoGPT's model.generate; 'chunked' is the engine's default rule.
    Sampling is the engine's (same generators), so seeded samples must agree too."""
    _check_args(model, prompts, max_new_tokens, temperature, top_k, top_p, window)
    device = model.lm_head.weight.device
    gens = _generators(len(prompts), seed, device)
    bs = model.config.block_size
    outputs = []
    was_training = model.training
    model.eval()
    try:
        for r, prompt in enumerate(prompts):
            seq = list(prompt)
            for _ in range(max_new_tokens):
                w = window_length(len(seq), bs, window)
                logits, _ = model(torch.tensor([seq[-w:]], device=device))
                seq.append(int(sample_next(logits[:, -1].float(), temperature, top_k, top_p, [gens[r]])[0]))
            outputs.append(seq[len(prompt):])
    finally:
        model.train(was_training)
    return outputs


__all__ = ["generate", "full_recompute_generate", "Completion", "Step", "TextStream",
           "window_length", "sample_next", "KVCache", "WINDOWS"]
