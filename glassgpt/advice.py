"""How big a model, how many iterations, what batch: advice from a measured table, not folklore.

    from glassgpt.advice import suggest
    print(suggest(n_tokens=1_003_854, device="cpu"))

train.py prints it after its header line; `prepare` can print it for the data it wrote. The table below comes from
benchmarks/bench_size_advice.py (char-level corpora of 100k, 1.1M and 10M characters, three model
sizes at one compute budget; docs/training.md "How big a model for your text" has the numbers). What
it showed: at a CPU's budget the smallest model wins on every corpus size (it takes the most steps),
and on a small corpus val loss turns up after some epochs, so iterations are capped at 8 epochs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Advice:
    n_layer: int
    n_head: int
    n_embd: int
    batch_size: int
    block_size: int
    max_iters: int
    why: str


# (corpus up to this many tokens, n_layer, n_head, n_embd, most epochs), measured on a CPU with the CPU
# record recipe (block 64, batch 24) by benchmarks/bench_size_advice.py: at an equal FLOP budget the
# 2x128 model beat 4x192 on 100k, 1.1M and 10M characters, and on 100k characters val loss was still
# falling at 6.4 epochs but rose past ~13 (1.64 at 12.8 epochs, 1.85 at 19, 2.17 at 25.6 with train 0.68).
CPU_TABLE: tuple[tuple[int | None, int, int, int, float], ...] = (
    (None, 2, 4, 128, 8.0),
)
CPU_BATCH, CPU_BLOCK, CPU_MAX_ITERS = 24, 64, 1650  # the CPU record recipe's batch and budget
# Not measured on a GPU by this project: nanoGPT's baby GPT (its README: val ~1.47 on tiny-shakespeare,
# 1M characters, in 5000 iterations of 64 x 256), smaller for small corpora, iterations capped by epochs.
GPU_BATCH, GPU_BLOCK, GPU_MAX_ITERS = 64, 256, 5000


def advise(n_tokens: int, device: str = "cpu") -> Advice:
    """The suggested recipe for a corpus of `n_tokens` training tokens on `device`."""
    n_tokens = max(1, int(n_tokens))
    gpu = device.startswith(("cuda", "mps"))
    if gpu:
        size = (6, 6, 384) if n_tokens >= 500_000 else (4, 4, 256)
        epochs = 80.0  # nanoGPT's recipe: 5000 x 64 x 256 tokens, ~80 epochs of tiny-shakespeare, with dropout 0.2
        batch, block, budget = GPU_BATCH, GPU_BLOCK, GPU_MAX_ITERS
        why = ("nanoGPT's baby GPT recipe for a GPU, with --dropout=0.2 (not measured by glassgpt; the CPU "
               "table in docs/training.md shows the trend)")
    else:
        row = next(r for r in CPU_TABLE if r[0] is None or n_tokens <= r[0])
        size, epochs = (row[1], row[2], row[3]), row[4]
        batch, block, budget = CPU_BATCH, CPU_BLOCK, CPU_MAX_ITERS
        why = "measured on a CPU at the CPU record's budget (docs/training.md, 'How big a model for your text')"
    by_epochs = int(epochs * n_tokens / (batch * block))
    iters = max(10, min(budget, by_epochs))
    return Advice(*size, batch_size=batch, block_size=block, max_iters=iters, why=why)


def suggest(n_tokens: int, device: str = "cpu", n_params: int | None = None, tokens_per_iter: int | None = None) -> str:
    """One line: how many tokens there are and the model size, iterations and batch to try on this
    device. Given this run's parameter count and tokens per iteration, it also says how many epochs
    the run's first 1000 iterations are."""
    a = advise(n_tokens, device)
    kind = "GPU" if device.startswith(("cuda", "mps")) else "CPU"
    epochs = a.max_iters * a.batch_size * a.block_size / max(1, n_tokens)
    line = (f"data: {n_tokens:,} tokens. For this {kind} try --n_layer={a.n_layer} --n_head={a.n_head} "
            f"--n_embd={a.n_embd} --batch_size={a.batch_size} --block_size={a.block_size} --max_iters={a.max_iters} "
            f"(~{epochs:.1f} epochs; {a.why})")
    if n_params is not None and tokens_per_iter:
        line += (f"; this run: {n_params / 1e6:.2f}M parameters, {1000 * tokens_per_iter / n_tokens:.1f} epochs "
                 "per 1000 iterations")
    return line
