"""Finetune what you have: `--init_from` names a glassgpt run (its out_dir or a ckpt .pt file).

    glassgpt train --init_from=out-english --data_dir=data/shakespeare-english-bpe --out_dir=out-ft

The run's weights and architecture (dropout may change) start a new training run on the new data:
iteration 0, a fresh optimizer and schedule, the new out_dir (the source run is only read). Its
tokenizer comes with it: the checkpoint's, else its dataset's (nanoGPT checkpoints). The new data
must be tokenized the same way (glassgpt/pretrained.py `check_vocab` refuses it otherwise); to
prepare new text with a run's own tokenizer pass its dataset directory or tokenizer.json, as in
`glassgpt prepare new.txt --tokenizer=data/english`. GPT-2 names and Hugging Face directories are
opened by glassgpt/pretrained.py instead.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from glassgpt.errors import UserError


def is_run(init_from: str) -> bool:
    """True when `init_from` names a glassgpt/nanoGPT checkpoint: a .pt file or a directory with ckpt.pt."""
    p = Path(init_from).expanduser()
    return p.suffix == ".pt" or (p / "ckpt.pt").exists()


def model_for_finetune(init_from: str, dropout: float, activation: str | None) -> tuple[Any, dict]:
    """(model, its tokenizer's meta) of the run `init_from`, ready to train on new data."""
    from glassgpt.checkpoint import ckpt_path, load_checkpoint, model_from_checkpoint
    from glassgpt.run import resolve_data_dir, resolve_tokenizer

    path = ckpt_path(Path(init_from).expanduser())
    if not path.exists():
        raise UserError(f"--init_from={init_from}: no checkpoint at {path}; give a run's out_dir or its ckpt.pt")
    ckpt = load_checkpoint(path, map_location="cpu")
    model = model_from_checkpoint(ckpt, dropout=dropout, activation=activation)
    tok = ckpt.get("tokenizer")
    if not tok:  # a nanoGPT checkpoint: the tokenizer of the data it names (else GPT-2's)
        ddir = resolve_data_dir(ckpt.get("config") or {})
        tok = resolve_tokenizer(None, ddir if ddir is not None and ddir.is_dir() else None).meta()
    print(f"finetuning {path} (iteration {ckpt.get('iter_num', '?')}, {model.get_num_params() / 1e6:.2f}M params, "
          f"{tok.get('tokenizer', 'gpt2')} vocab {model.config.vocab_size}) from iteration 0 with a fresh optimizer")
    return model, tok


def init_weights(cfg: Any, refuse_options: Callable[[Any], None]) -> tuple[Any, dict | None]:
    """(model, tokenizer meta or None) for a training config's init_from that is neither scratch nor
    resume: another run's checkpoint, else GPT-2 weights (after `refuse_options` checks that no option
    asks for another architecture)."""
    if is_run(cfg.init_from):
        return model_for_finetune(cfg.init_from, cfg.dropout, cfg.activation)
    from glassgpt.pretrained import from_pretrained

    refuse_options(cfg)
    return from_pretrained(cfg.init_from, {"dropout": cfg.dropout}), None
