"""The run layer: every command opens a trained model (and the data it was trained on) here.

    run = open_run("out-shakespeare-char")      # an out_dir, a ckpt .pt, an HF GPT-2 dir or hub name
    run.model, run.tokenizer, run.corpus, run.fingerprint, run.provenance()

Commands that need the data but no model open a `glassgpt.corpus.Corpus` (the data-directory rule
lives there too). Fingerprints are read from sidecars written when the checkpoint or dataset was
saved, never re-hashed on a query, so `run.stale_reasons(artifact_meta["built_from"])` is a string
comparison. torch is imported only when a model is opened. docs/FORMATS.md describes the files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from glassgpt.artifacts import read_json
from glassgpt.corpus import Corpus, data_stale_reasons, resolve_data_dir
from glassgpt.errors import UserError
from glassgpt.tokenizer import Tokenizer, read_meta, tokenizer_from_meta

# ---------------------------------------------------------------- the tokenizer


def resolve_tokenizer(stored: dict | None, data_dir: Path | None, vocab_dir: str | None = None,
                      vocab_size: int | None = None) -> Tokenizer:
    """THE tokenizer rule: the one stored with the model (glassgpt checkpoints, glassgpt HF exports),
    else the dataset's meta.json / meta.pkl (nanoGPT), else GPT-2 BPE."""
    meta = stored or (read_meta(data_dir) if data_dir is not None and data_dir.is_dir() else None)
    tok = tokenizer_from_meta(meta, vocab_dir)
    if not stored and vocab_size is not None and tok.vocab_size > vocab_size:  # the wrong dataset
        raise UserError(f"tokenizer has {tok.vocab_size} tokens but the model only {vocab_size}; "
                        "point --data_dir at the dataset this model was trained on")
    return tok


# ---------------------------------------------------------------- the run


@dataclass
class Run:
    """A trained model opened for use, with what it came from."""

    model: Any  # glassgpt.model.GPT, eval mode, on `device`
    tokenizer: Tokenizer
    gpt_config: Any  # glassgpt.model.GPTConfig
    config: dict[str, Any]  # the training config ({} for HF models)
    iter_num: int | None
    out_dir: Path  # where artifacts derived from this run (kNN store, neuron baseline) live
    fingerprint: str  # of the weights, recorded when they were saved
    data_dir: Path | None
    source: str = ""  # what was opened, as given
    kind: str = "checkpoint"  # "checkpoint" or "hf"
    device: str = "cpu"
    checkpoint_meta: dict[str, Any] = field(default_factory=dict)  # the checkpoint minus its tensors

    @cached_property
    def corpus(self) -> Corpus:
        if self.data_dir is None:
            raise UserError(f"{self.source} does not say what data it was trained on; pass --data_dir=DIR "
                            "(a prepared dataset directory)")
        return Corpus(self.data_dir)

    @property
    def data_fingerprint(self) -> str | None:
        """None when the run names no data directory, or it is not prepared."""
        if self.data_dir is None or not (self.data_dir / "train.bin").exists():
            return None
        return self.corpus.fingerprint

    def provenance(self) -> dict[str, Any]:
        """What a derived artifact records as `built_from`: the weights' and the data's fingerprints,
        and the data files' sizes and mtimes (glassgpt.corpus.file_stats)."""
        if self.data_fingerprint is None:
            return {"checkpoint": self.fingerprint, "data": None}
        return {"checkpoint": self.fingerprint, **self.corpus.provenance()}

    def stale_reasons(self, built_from: dict[str, Any] | None) -> list[str]:
        """Why an artifact built from `built_from` does not fit this run ([] = fresh)."""
        built_from = built_from or {}
        reasons = []
        then = built_from.get("checkpoint")
        if then is None:
            reasons.append("it records no checkpoint fingerprint (built by an older glassgpt)")
        elif then != self.fingerprint:
            reasons.append(f"the weights changed since it was built ({then[:15]} -> {self.fingerprint[:15]})")
        prepared = self.data_dir if self.data_fingerprint is not None else None
        return reasons + data_stale_reasons(prepared, built_from)


def open_run(source: str | Path, *, device: str = "cpu", data_dir: str | Path | None = None,
             vocab_dir: str | None = None, threads: int | None = None, ckpt_iter: int | str | None = None) -> Run:
    """Open an out_dir (ckpt.pt), a .pt file, or a Hugging Face GPT-2 directory / hub name.
    `ckpt_iter` opens a checkpoint kept beside ckpt.pt instead (ckpt-<iter>.pt, or 'best'; glassgpt.kept)."""
    from glassgpt.kept import resolve_ckpt_iter
    from glassgpt.runtime import choose_threads, resolve_device

    device = resolve_device(device)
    src = resolve_ckpt_iter(Path(source).expanduser(), ckpt_iter)
    if src.suffix == ".pt" or (src / "ckpt.pt").exists() or not _is_hf(str(source), src):
        run = _open_checkpoint(src, device, data_dir, vocab_dir)
    else:
        run = _open_hf(str(source), device, data_dir, vocab_dir)
    run.source = str(source)
    choose_threads(run.model.get_num_params(), device, threads)
    return run


def _is_hf(source: str, src: Path) -> bool:
    from glassgpt.pretrained import PRETRAINED_MODELS

    return (src / "config.json").exists() or source in PRETRAINED_MODELS


def _open_checkpoint(src: Path, device: str, data_dir: str | Path | None, vocab_dir: str | None) -> Run:
    from glassgpt.checkpoint import checkpoint_fingerprint, ckpt_path, load_checkpoint, model_from_checkpoint

    path = ckpt_path(src)
    ckpt = load_checkpoint(path, map_location="cpu")
    model = model_from_checkpoint(ckpt)
    fingerprint = checkpoint_fingerprint(ckpt, path)
    model.eval().to(device)
    config = dict(ckpt.get("config") or {})
    ddir = resolve_data_dir(config, data_dir)
    tok = resolve_tokenizer(ckpt.get("tokenizer"), ddir, vocab_dir, model.config.vocab_size)
    meta = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer")}
    it = ckpt.get("iter_num")
    return Run(model=model, tokenizer=tok, gpt_config=model.config, config=config,
               iter_num=int(it) if it is not None else None, out_dir=path.parent, fingerprint=fingerprint,
               data_dir=ddir, device=device, checkpoint_meta=meta)


def _open_hf(source: str, device: str, data_dir: str | Path | None, vocab_dir: str | None) -> Run:
    from glassgpt.artifacts import fingerprint_file
    from glassgpt.pretrained import WEIGHT_FILES, from_pretrained, pretrained_tokenizer, resolve_model_dir

    model_dir = resolve_model_dir(source)
    model = from_pretrained(source)
    model.eval().to(device)
    weights = next((model_dir / n for n in WEIGHT_FILES if (model_dir / n).exists()), model_dir / "config.json")
    tok = pretrained_tokenizer(source, vocab_dir)  # ids past a small model's vocab are refused where used
    local = Path(source).expanduser().is_dir()
    side = read_json(model_dir / "glassgpt_run.json", default={}, strict=False) if local else {}
    ddir = resolve_data_dir(side.get("config") if isinstance(side, dict) else None, data_dir)
    return Run(model=model, tokenizer=tok, gpt_config=model.config, config={}, iter_num=None,
               out_dir=model_dir if local else Path("out") / source, fingerprint=fingerprint_file(weights),
               data_dir=ddir, kind="hf", device=device)

