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
from glassgpt.copying import CopyingCheck
from glassgpt.errors import UserError
from glassgpt.generate import TextStream
from glassgpt.model import GPT
from glassgpt.run import Run
from glassgpt.runtime import autocast, resolve_device, resolve_dtype
from glassgpt.sampling import generate_from
from glassgpt.tokenizer import Tokenizer

SEPARATOR = "---------------"


def load_model(cfg: SampleConfig, device: str) -> tuple[GPT, Tokenizer]:
    """The model (eval mode, on device) and its tokenizer, from out_dir/ckpt.pt, GPT-2 weights or an
    HF directory: glassgpt.run.open_run resolves each."""
    run = load_run(cfg, device)
    return run.model, run.tokenizer


def load_run(cfg: SampleConfig, device: str) -> Run:
    if cfg.init_from == "scratch":
        raise UserError("init_from=scratch has nothing to sample from; use resume (a checkpoint in --out_dir), "
                        "a GPT-2 name (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a Hugging Face GPT-2 directory")
    from glassgpt.run import open_run

    source = cfg.out_dir if cfg.init_from == "resume" else cfg.init_from
    return open_run(source, device=device, data_dir=cfg.data_dir, vocab_dir=cfg.vocab_dir,
                    threads=getattr(cfg, "threads", None))


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
                  ctx: AbstractContextManager, copying: CopyingCheck | None = None) -> list[str]:
    """Generate cfg.num_samples continuations of `prompt` in one batch and print them nanoGPT-style."""
    out = sys.stdout
    streamer = _Streamer(tok, cfg.stop, out) if cfg.stream and cfg.num_samples == 1 else None
    if streamer:
        tok.encode(prompt)  # a char model's unseen characters fail before the prompt is echoed
        out.write(prompt)
        out.flush()
    with ctx:
        gen = generate_from(model, tok, prompt, cfg, num_samples=cfg.num_samples, stop=cfg.stop,
                            on_token=streamer.on_token if streamer else None)
    texts = []
    for ids_out in gen.outputs:
        text = prompt + cut_at_stop(tok.decode(ids_out), cfg.stop)
        texts.append(text)
        if streamer:
            streamer.finish()
        else:
            print(text, file=out)
        if copying is not None:
            print(copying.line(gen.prompt_ids, ids_out), file=out)
        print(SEPARATOR, file=out, flush=True)
    return texts


def interactive(cfg: SampleConfig, model: GPT, tok: Tokenizer, ctx: AbstractContextManager,
                copying: CopyingCheck | None = None) -> list[str]:
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
            prompt = line.rstrip("\r\n") or read_text_arg(cfg.start, "start")
            texts += sample_prompt(cfg, model, tok, prompt, ctx, copying)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
    return texts


def main(argv: list[str] | None = None) -> list[str]:
    """`python sample.py [config.py] [--key=value ...]`; returns the printed samples (for tests)."""
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(SampleConfig, argv, "sample.py"):
        return []
    cfg = load_config(SampleConfig, argv)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    torch.manual_seed(cfg.seed)
    run = load_run(cfg, device)
    model, tok = run.model, run.tokenizer
    copying = CopyingCheck.open(run) if cfg.copying else None
    if cfg.compile:
        # The engine's step shapes change every token and it calls the modules one by one (so hooks
        # fire); compiling the whole model would not be used. Say so rather than pretend.
        print("note: --compile=True is ignored by the KV-cache engine; sampling runs uncompiled", file=sys.stderr)
    ctx = autocast(device, dtype)
    if cfg.interactive:
        return interactive(cfg, model, tok, ctx, copying)
    return sample_prompt(cfg, model, tok, read_text_arg(cfg.start, "start"), ctx, copying)
