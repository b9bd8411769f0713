"""Shared fixtures: tiny datasets and checkpoints made on the fly, and the offline data mirror."""

from __future__ import annotations

import os
from pathlib import Path

# Tiny models run fastest on one thread, and tests that start subprocesses (DDP ranks, CLI runs)
# would otherwise oversubscribe the 2-core CI machine. Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch

from glassgpt.checkpoint import save_checkpoint
from glassgpt.corpus import write_dataset
from glassgpt.model import GPT, GPTConfig
from glassgpt.tokenizer import CharTokenizer

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

TINY_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\n"
    "All:\nResolved. resolved.\n\n"
) * 8


@pytest.fixture(autouse=True, scope="session")
def _offline_mirror():
    """Tests never touch the network: point GLASSGPT_MIRROR at ../shared/data unless set."""
    if "GLASSGPT_MIRROR" not in os.environ and SHARED_DATA.exists():
        os.environ["GLASSGPT_MIRROR"] = str(SHARED_DATA)
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture
def mirror() -> Path:
    """The offline mirror of public data (../shared/data); CI has it beside the checkout."""
    path = Path(os.environ.get("GLASSGPT_MIRROR", SHARED_DATA))
    assert (path / "tinyshakespeare" / "input.txt").exists(), f"offline data mirror missing at {path}"
    return path


def make_char_dataset(data_dir: Path, text: str = TINY_TEXT, val_fraction: float = 0.1) -> Path:
    """A prepared char-level dataset in glassgpt's layout (see glassgpt/corpus.py), one document, written
    by prepare's own writer. No fingerprint is recorded: tests that edit the files see them re-hashed."""
    tok = CharTokenizer.from_text(text)
    n = int(len(text) * (1 - val_fraction))
    parts = {"train": (text[:n], 0), "val": (text[n:], n)}
    return write_dataset(data_dir, tok.meta(), {s: tok.encode(p) for s, (p, _) in parts.items()},
                         [{"id": "tiny", "source": "tiny.txt", "char_offset": 0, "line": 1}],
                         segments={s: [[0, 0, len(p), c, 1 + text[:c].count("\n")]] for s, (p, c) in parts.items()},
                         fingerprint=False)


@pytest.fixture
def char_dataset(tmp_path: Path) -> Path:
    return make_char_dataset(tmp_path / "data" / "tiny_char")


def make_checkpoint(out_dir: Path, data_dir: Path, block_size: int = 32, n_layer: int = 2, n_head: int = 2,
                    n_embd: int = 32, seed: int = 0) -> Path:
    """A random-weight checkpoint over `data_dir`'s char vocabulary, in glassgpt's ckpt.pt layout."""
    import json

    torch.manual_seed(seed)
    meta = json.loads((data_dir / "meta.json").read_text())
    cfg = GPTConfig(block_size=block_size, vocab_size=meta["vocab_size"], n_layer=n_layer, n_head=n_head,
                    n_embd=n_embd, bias=False)
    model = GPT(cfg)
    ckpt = {"model": model.state_dict(), "optimizer": {}, "model_args": cfg.to_dict(), "iter_num": 0,
            "best_val_loss": 1e9, "config": {"dataset": data_dir.name, "data_dir": str(data_dir)},
            "tokenizer": {k: meta[k] for k in ("tokenizer", "vocab_size", "stoi", "itos")}}
    return save_checkpoint(out_dir / "ckpt.pt", ckpt)


@pytest.fixture
def char_checkpoint(tmp_path: Path, char_dataset: Path) -> Path:
    """out_dir holding a random tiny char-model checkpoint over `char_dataset`."""
    out = tmp_path / "out"
    make_checkpoint(out, char_dataset)
    return out
