"""A linear batch-size ramp: fewer tokens per optimizer step early in training, more later.

    python train.py config/train_shakespeare_char_cpu.py --batch_size=8 --gradient_accumulation_steps=3 \
        --batch_ramp_start=512 --batch_ramp_iters=600

The batch grows by *micro-steps*: one micro-batch is `batch_size x block_size` tokens on each
process, and iteration i runs `micro_steps(i)` of them before the optimizer step (gradient
accumulation). So shapes never change (nothing recompiles under torch.compile), every process does
the same number of micro-steps (DDP/FSDP stay in step), and the loss of a step is still the mean over
equal micro-batches. Tokens per step go linearly from `batch_ramp_start` at iteration 0 to the
configured batch (`gradient_accumulation_steps x batch_size x block_size`) at `batch_ramp_iters`,
rounded to whole micro-batches of the job (one per process at least).

The learning-rate schedule stays a function of the iteration, unchanged: warmup, decay and
`lr_decay_iters` mean what they mean without a ramp, and a ramped run simply sees fewer tokens in
its early steps. (The small-batch steps are where a large learning rate is safest, so nothing is
rescaled.) To compare with a constant batch at an equal token budget, give the ramped run more
iterations: `iters_for_tokens` says how many. The schedule is a pure function of the iteration, so
a resumed run picks up mid-ramp exactly where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass

from glassgpt.errors import UserError


@dataclass(frozen=True)
class BatchRamp:
    """Micro-steps per optimizer step as a function of the iteration, in units of one micro-batch
    on every process (`world_size` micro-steps of the job)."""

    unit_tokens: int  # tokens of one job-wide unit: world_size x batch_size x block_size
    start_units: int
    end_units: int
    ramp_iters: int

    def units(self, it: int) -> int:
        """Job-wide units at iteration `it`: linear in the iteration, rounded to the nearest unit."""
        if self.ramp_iters <= 0 or it >= self.ramp_iters:
            return self.end_units
        span = self.end_units - self.start_units
        return self.start_units + (span * max(it, 0) * 2 + self.ramp_iters) // (2 * self.ramp_iters)

    def micro_steps(self, it: int) -> int:
        """Micro-steps each process runs at iteration `it` (what gradient accumulation loops over)."""
        return self.units(it)

    def tokens(self, it: int) -> int:
        """Tokens of the whole job in the optimizer step of iteration `it`."""
        return self.units(it) * self.unit_tokens

    def tokens_seen(self, iters: int) -> int:
        """Tokens trained on in iterations 0 .. iters-1."""
        return sum(self.tokens(i) for i in range(min(iters, self.ramp_iters))) + \
            max(0, iters - self.ramp_iters) * self.tokens(self.ramp_iters)

    def describe(self) -> str:
        return (f"batch ramp: {self.tokens(0):,} -> {self.tokens(self.ramp_iters):,} tokens per step over "
                f"{self.ramp_iters} iterations (micro-steps {self.units(0)} -> {self.end_units} per process); "
                "the learning-rate schedule follows the iteration as without a ramp")


def build_ramp(start_tokens: int, ramp_iters: int, grad_accum: int, batch_size: int, block_size: int,
               world_size: int) -> BatchRamp | None:
    """The ramp of a training job (None when `start_tokens` is 0). `grad_accum` is the micro-steps
    per process at the end of the ramp (gradient_accumulation_steps / world_size)."""
    if start_tokens == 0:
        return None
    unit = world_size * batch_size * block_size
    end_tokens = grad_accum * unit
    if start_tokens < 0 or start_tokens > end_tokens:
        raise UserError(f"batch_ramp_start={start_tokens} must be between 1 and the configured tokens per step "
                        f"{end_tokens:,} (gradient_accumulation_steps x batch_size x block_size); raise "
                        "gradient_accumulation_steps for a larger final batch")
    if ramp_iters <= 0:
        raise UserError(f"batch_ramp_iters={ramp_iters} must be positive when batch_ramp_start is set")
    start_units = max(1, (start_tokens + unit // 2) // unit)
    if start_units == grad_accum:
        raise UserError(f"batch_ramp_start={start_tokens} rounds to the final batch ({end_tokens:,} tokens, "
                        f"micro-batches of {unit:,}): lower batch_size and raise gradient_accumulation_steps "
                        "so the batch can grow in steps")
    return BatchRamp(unit_tokens=unit, start_units=start_units, end_units=grad_accum, ramp_iters=ramp_iters)


def iters_for_tokens(ramp: BatchRamp, tokens: int) -> int:
    """The fewest iterations whose steps together train on at least `tokens` tokens."""
    ramp_total = ramp.tokens_seen(ramp.ramp_iters)
    if tokens > ramp_total:
        end = ramp.tokens(ramp.ramp_iters)
        return ramp.ramp_iters + -(-(tokens - ramp_total) // end)
    seen, it = 0, 0
    while seen < tokens:
        seen += ramp.tokens(it)
        it += 1
    return it
