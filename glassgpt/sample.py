"""Sample text from a trained model: nanoGPT's sample.py, on the KV-cache engine (glassgpt/generate.py).

    python sample.py --out_dir=out-shakespeare-char --device=cpu
    python sample.py --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=3 --max_new_tokens=200
    python sample.py --init_from=gpt2 --start=FILE:prompt.txt --temperature=0   # OpenAI weights, greedy
    glassgpt sample --out_dir=out-shakespeare-char --interactive   # one prompt per stdin line, until EOF

Each sample is printed as prompt + generated text followed by a line of dashes, as nanoGPT does. A
single sample streams to the terminal token by token. Keys: `glassgpt sample --help`
(glassgpt.config.SampleConfig). Sample i is drawn with seed+i, so the same seed prints the same text.
"""

from __future__ import annotations

import sys
from contextlib import AbstractContextManager
from typing import TextIO

import torch

from glassgpt.config import SampleConfig, load_config, read_text_arg, wants_help
from glassgpt.errors import UserError
from glassgpt.generate import WINDOWS, TextStream, generate
from glassgpt.model import GPT
from glassgpt.runtime import autocast, resolve_device, resolve_dtype
from glassgpt.tokenizer import Tokenizer

SEPARATOR = "---------------"


def check_config(cfg: SampleConfig) -> None:
    if cfg.num_samples < 1:
        raise UserError(f"num_samples must be >= 1, got {cfg.num_samples}")
    if cfg.max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be >= 0, got {cfg.max_new_tokens}")
    if cfg.temperature < 0:
        raise UserError(f"temperature must be >= 0 (0 = greedy), got {cfg.temperature}")
    if cfg.top_k is not None and cfg.top_k < 1:
        raise UserError(f"top_k must be >= 1 or None, got {cfg.top_k}")
    if cfg.top_p is not None and not 0 < cfg.top_p <= 1:
        raise UserError(f"top_p must be in (0, 1] or None, got {cfg.top_p}")
    if cfg.window not in WINDOWS:
        raise UserError(f"window must be one of {', '.join(WINDOWS)}, got {cfg.window!r}")


def load_model(cfg: SampleConfig, device: str) -> tuple[GPT, Tokenizer]:
    """The model (eval mode, on device) and its tokenizer, from out_dir/ckpt.pt, GPT-2 weights or an
    HF directory: glassgpt.run.open_run resolves each."""
    if cfg.init_from == "scratch":
        raise UserError("init_from=scratch has nothing to sample from; use resume (a checkpoint in --out_dir), "
                        "a GPT-2 name (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a Hugging Face GPT-2 directory")
    from glassgpt.run import open_run

    source = cfg.out_dir if cfg.init_from == "resume" else cfg.init_from
    run = open_run(source, device=device, data_dir=cfg.data_dir, vocab_dir=cfg.vocab_dir,
                   threads=getattr(cfg, "threads", None))
    return run.model, run.tokenizer


def encode_prompt(tok: Tokenizer, text: str, block_size: int) -> list[int]:
    """Token ids of the prompt, cropped from the left to block_size (with a note on stderr)."""
    ids = tok.encode(text)  # a char tokenizer names characters it never saw (UserError)
    if not ids:
        if tok.eot_token is None:
            raise UserError("the prompt is empty; give one with --start=TEXT or --start=FILE:path")
        ids = [tok.eot_token]  # GPT-2 convention: generate as if a new document starts
    if len(ids) > block_size:
        print(f"note: the prompt is {len(ids)} tokens, longer than the model's block_size={block_size}; "
              f"using its last {block_size} tokens", file=sys.stderr)
        ids = ids[-block_size:]
    return ids


def cut_at_stop(text: str, stop: str | None) -> str:
    """Text up to and including the first stop string."""
    if stop and stop in text:
        return text[: text.index(stop) + len(stop)]
    return text


class _Streamer:
    """Writes one sample's text to the terminal as its tokens arrive."""

    def __init__(self, tok: Tokenizer, stop: str | None, out: TextIO):
        self.stream, self.stop, self.out = TextStream(tok), stop, out
        self.text, self.shown = "", 0

    def on_token(self, row: int, token: int) -> None:
        self.text += self.stream.push(token)
        self._show()

    def finish(self) -> None:
        self.text += self.stream.flush()
        self._show()
        self.out.write("\n")

    def _show(self) -> None:
        shown = cut_at_stop(self.text, self.stop)
        self.out.write(shown[self.shown:])
        self.out.flush()
        self.shown = len(shown)


def sample_prompt(cfg: SampleConfig, model: GPT, tok: Tokenizer, prompt: str,
                  ctx: AbstractContextManager) -> list[str]:
    """Generate cfg.num_samples continuations of `prompt` in one batch and print them nanoGPT-style."""
    out = sys.stdout
    ids = encode_prompt(tok, prompt, model.config.block_size)
    streamer = _Streamer(tok, cfg.stop, out) if cfg.stream and cfg.num_samples == 1 else None
    if streamer:
        out.write(prompt)
        out.flush()
    with ctx:
        new = generate(model, [ids] * cfg.num_samples, cfg.max_new_tokens, temperature=cfg.temperature,
                       top_k=cfg.top_k, top_p=cfg.top_p, seed=cfg.seed, stop=cfg.stop, tokenizer=tok,
                       on_token=streamer.on_token if streamer else None, window=cfg.window)
    texts = []
    for ids_out in new:
        text = prompt + cut_at_stop(tok.decode(ids_out), cfg.stop)
        texts.append(text)
        if streamer:
            streamer.finish()
        else:
            print(text, file=out)
        print(SEPARATOR, file=out, flush=True)
    return texts


def interactive(cfg: SampleConfig, model: GPT, tok: Tokenizer, ctx: AbstractContextManager) -> list[str]:
    """A REPL: one prompt per line of stdin until EOF, the model loaded once. A bad prompt prints its
    error and the loop goes on; an empty line reuses --start."""
    texts: list[str] = []
    tty = sys.stdin.isatty()
    while True:
        if tty:
            print(">>> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        try:
            texts += sample_prompt(cfg, model, tok, line.rstrip("\r\n") or read_text_arg(cfg.start, "start"), ctx)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
    return texts


def main(argv: list[str] | None = None) -> list[str]:
    """`python sample.py [config.py] [--key=value ...]`; returns the printed samples (for tests)."""
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(SampleConfig, argv, "sample.py"):
        return []
    cfg = load_config(SampleConfig, argv)
    check_config(cfg)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    torch.manual_seed(cfg.seed)
    model, tok = load_model(cfg, device)
    if cfg.compile:
        # The engine's step shapes change every token and it calls the modules one by one (so hooks
        # fire); compiling the whole model would not be used. Say so rather than pretend.
        print("note: --compile=True is ignored by the KV-cache engine; sampling runs uncompiled", file=sys.stderr)
    ctx = autocast(device, dtype)
    if cfg.interactive:
        return interactive(cfg, model, tok, ctx)
    return sample_prompt(cfg, model, tok, read_text_arg(cfg.start, "start"), ctx)
