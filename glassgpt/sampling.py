"""How every command draws a generation: one settings block and one function.

`SamplingSettings` is mixed into the config of each command that generates text (`sample`,
`trace-spans`, `trace-knn`, `trace-neurons`, `report`) and is what the viewer's /api/generate
request is checked against, so its keys, defaults, ranges and choices are declared once.
`generate_from(model, tokenizer, prompt, settings)` turns a prompt and those settings into token ids
with one empty-prompt rule and one cropping rule, so the same `--start`, seed and settings give the
same text in every command (tests/test_sampling.py runs them side by side).

A new command that generates mixes the block into its config and calls `generate_from`:

    @dataclass
    class TraceThingConfig(SamplingSettings):
        out_dir: str = "out"
        max_new_tokens: int = 64   # a redeclared field keeps its place and takes the new default

    ids = generate_from(run.model, run.tokenizer, prompt, cfg)   # cfg *is* a SamplingSettings
    seq, pos0 = ids.prompt_ids + ids.outputs[0], len(ids.prompt_ids)

This module imports no torch at the top: config.py imports the block, and `--help` stays fast.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal

from glassgpt.errors import UserError

if TYPE_CHECKING:
    from glassgpt.generate import Completion, Step
    from glassgpt.model import GPT

@dataclass
class SamplingSettings:
    """The settings of one generation, shared by every command that generates."""

    max_new_tokens: int = 200
    """Tokens to generate."""
    temperature: float = 0.8
    """0 = greedy; 1.0 = the model's distribution; higher = more random."""
    top_k: int | None = 200
    """Sample from the k most likely tokens only (None: from every token)."""
    top_p: float | None = None
    """Then keep the smallest set of tokens whose probability reaches top_p (None: off)."""
    seed: int = 1337
    """Sampling is seeded: the same prompt, seed and settings give the same text in every command."""
    window_rule: Literal["chunked", "sliding"] = "chunked"
    """Past block_size: 'chunked' (restart from the last block_size//2 tokens when the window is
    full; fast) or 'sliding' (nanoGPT's: always the last block_size tokens; slow). docs/generation.md"""


def sampling_settings(obj: Any) -> SamplingSettings:
    """The block's fields of any object that has them (a command config mixing it in), as a plain
    SamplingSettings."""
    return SamplingSettings(**{f.name: getattr(obj, f.name) for f in dataclasses.fields(SamplingSettings)})


@dataclass
class Generated:
    prompt_ids: list[int]
    """The prompt's ids after the empty-prompt and cropping rules: what was generated from."""
    outputs: list[list[int]]
    """The generated ids of each sample (sample i drawn with seed + i)."""


def _note(msg: str) -> None:
    print(f"note: {msg}", file=sys.stderr)


def prompt_ids(tokenizer: Any, prompt: str, block_size: int, note: Callable[[str], None] = _note) -> list[int]:
    """The ids a prompt is generated from. Empty prompt: GPT-2's <|endoftext|> where the tokenizer has
    one (a new document starts), else a UserError. Longer than block_size: its last block_size tokens,
    as nanoGPT crops (`note` says so)."""
    ids = tokenizer.encode(prompt)  # a char tokenizer names characters it never saw (UserError)
    if not ids:
        eot = getattr(tokenizer, "eot_token", None)
        if eot is None:
            raise UserError("the prompt is empty and this tokenizer has no <|endoftext|> to start from; "
                            "give one with --start=TEXT or --start=FILE:path")
        ids = [eot]
    if len(ids) > block_size:
        note(f"the prompt is {len(ids)} tokens, longer than the model's block_size={block_size}; "
             f"using its last {block_size} tokens")
        ids = ids[-block_size:]
    return ids


def generate_from(model: GPT, tokenizer: Any, prompt: str, settings: SamplingSettings, *, num_samples: int = 1,
                  stop: str | None = None, on_token: Callable[[int, int], None] | None = None,
                  on_step: Callable[[Step], None] | None = None,
                  note: Callable[[str], None] = _note) -> Generated:
    """`num_samples` generations from `prompt` with `settings` (glassgpt.generate's KV-cache engine, in
    one batch). `stop` ends a sample once its text contains it; `on_token(row, token)` streams."""
    from glassgpt.generate import generate

    ids = prompt_ids(tokenizer, prompt, model.config.block_size, note)
    s = settings
    outputs = generate(model, [ids] * num_samples, s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                       top_p=s.top_p, seed=s.seed, stop=stop, tokenizer=tokenizer, on_token=on_token,
                       on_step=on_step, window=s.window_rule)
    return Generated(ids, outputs)


__all__ = ["SamplingSettings", "Generated", "generate_from", "prompt_ids", "sampling_settings"]


def complete(
    model: GPT,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 200,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = 1337,
    stop: str | None = None,
    window: str = "chunked",
    on_step: Callable[[Step], None] | None = None,
) -> Completion:
    """Generate from one text prompt (greedy by default) and return text and ids.

    The prompt goes through the commands' rules (prompt_ids): an empty prompt starts
    after GPT-2's <|endoftext|> where the tokenizer has one (else UserError), a prompt longer than
    block_size is cropped to its last block_size tokens."""
    from glassgpt.generate import Completion, generate

    ids = prompt_ids(tokenizer, prompt, model.config.block_size)
    out = generate(model, [ids], max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                   stop=stop, tokenizer=tokenizer, on_step=on_step, window=window)[0]
    text = tokenizer.decode(out)
    if stop and stop in text:
        text = text[: text.index(stop) + len(stop)]
    return Completion(prompt=prompt, text=text, prompt_ids=ids, output_ids=out)
