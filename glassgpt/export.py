"""`glassgpt export`: a glassgpt/nanoGPT checkpoint as a Hugging Face GPT-2 directory.

    glassgpt export --out_dir=out-shakespeare --to=hf exported/     # = main([...])
    export_hf(model, "exported/")                                   # in Python

The directory holds config.json + model.safetensors (+ GPT-2's tokenizer files) that
`transformers.GPT2LMHeadModel.from_pretrained` loads with the same logits; `transformers` is never
imported here. The four Conv1D weights are transposed on the way out, as glassgpt/pretrained.py
transposes them on the way in.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from glassgpt.errors import UserError
from glassgpt.model import GPT, GPTConfig
from glassgpt.pretrained import CONV1D_SUFFIXES


def hf_config_dict(config: GPTConfig, eos_token_id: int | None = 50256) -> dict[str, Any]:
    """An HF GPT2Config as JSON for a glassgpt model (written by hand: export needs no transformers)."""
    cfg = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        # exact erf GELU ("gelu") for nanoGPT-trained models, tanh ("gelu_new") for OpenAI's
        "activation_function": "gelu_new" if config.activation == "gelu_new" else "gelu",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    if eos_token_id is not None and eos_token_id < config.vocab_size:
        cfg.update(bos_token_id=eos_token_id, eos_token_id=eos_token_id)
    return cfg


def glassgpt_to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """HF GPT2LMHeadModel names and Conv1D layout; zero biases where the model has none (HF's GPT-2
    always has them, and a zero bias is the same function)."""
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    state.pop("lm_head.weight")  # tied to wte; HF re-ties it on load
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        out[k] = (v.t() if k.endswith(CONV1D_SUFFIXES) else v).contiguous().clone()
    if not model.config.bias:
        for k, v in list(out.items()):
            if k.endswith(".weight") and "wte" not in k and "wpe" not in k:
                bias = k[: -len("weight")] + "bias"
                if bias not in out:
                    # Conv1D bias has the output size: columns of (in, out); LayerNorm's = its weight's
                    n = v.shape[1] if k.endswith(CONV1D_SUFFIXES) else v.shape[0]
                    out[bias] = torch.zeros(n)
    return out


def export_hf(model: GPT, out_dir: str | Path, tokenizer_meta: dict | None = None,
              vocab_dir: str | None = None) -> Path:
    """Write config.json + model.safetensors (+ GPT-2 tokenizer files) that
    `transformers.GPT2LMHeadModel.from_pretrained(out_dir)` loads with the same logits.

    A vocab padded past 50257 (nanoGPT's 50304) is written as is: HF scores the pad ids too, and a
    GPT-2 tokenizer never produces them.
    """
    from safetensors.torch import save_file

    not_gpt2 = model.config.non_gpt2_options()
    if not_gpt2:
        name = not_gpt2[0]
        raise UserError(f"cannot export to Hugging Face GPT-2: the model uses {name}={getattr(model.config, name)!r}, "
                        "which GPT-2's architecture has no place for; export only models trained with GPT-2's "
                        "options (sample and trace it with glassgpt instead)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kind = (tokenizer_meta or {}).get("tokenizer", "gpt2")
    eos = {"gpt2": 50256, "bpe": (tokenizer_meta or {}).get("eot_token")}.get(kind)
    cfg = hf_config_dict(model.config, eos_token_id=eos)
    save_file(glassgpt_to_hf_state_dict(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if kind == "gpt2":
        write_gpt2_tokenizer_files(out, model.config.block_size, vocab_dir)
    elif kind == "bpe" and tokenizer_meta:
        from glassgpt.bpe import write_hf_tokenizer_files

        write_hf_tokenizer_files(out, tokenizer_meta, model.config.block_size)
    elif tokenizer_meta:
        # A char vocabulary has no HF tokenizer class; keep it for glassgpt (and people) to read.
        (out / "glassgpt_tokenizer.json").write_text(json.dumps(tokenizer_meta, ensure_ascii=False) + "\n")
    return out


def write_gpt2_tokenizer_files(out: Path, block_size: int, vocab_dir: str | None = None) -> bool:
    """vocab.json/merges.txt (= OpenAI's encoder.json/vocab.bpe, renamed) for transformers'
    GPT2Tokenizer; False (and a note) when the files cannot be had offline."""
    from glassgpt.download import GPT2_ENCODER_JSON, GPT2_VOCAB_BPE, local_or_fetch

    try:
        if vocab_dir:
            src_json, src_bpe = Path(vocab_dir) / "encoder.json", Path(vocab_dir) / "vocab.bpe"
            if not (src_json.exists() and src_bpe.exists()):
                raise UserError(f"{vocab_dir} lacks encoder.json / vocab.bpe")
        else:
            cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "glassgpt"
            src_json, src_bpe = local_or_fetch(GPT2_ENCODER_JSON, cache), local_or_fetch(GPT2_VOCAB_BPE, cache)
    except UserError as e:
        print(f"note: tokenizer files not written ({e}); the weights and config are complete")
        return False
    shutil.copyfile(src_json, out / "vocab.json")
    shutil.copyfile(src_bpe, out / "merges.txt")
    tok_cfg = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": block_size, "bos_token": "<|endoftext|>",
               "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "add_prefix_space": False}
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    return True


@dataclass
class ExportConfig:
    """`glassgpt export --out_dir=CKPT_DIR --to=hf DEST`."""

    out_dir: str = "out"
    """Checkpoint directory (ckpt.pt) to export."""
    to: Literal["hf"] = "hf"
    """Target format; 'hf' (Hugging Face GPT-2 directory) is the only one."""
    dest: str | None = None
    """Where to write; also given as the bare DIR argument."""
    data_dir: str | None = None
    """Dataset the checkpoint was trained on, when its tokenizer is not stored in it (nanoGPT ckpts)."""
    vocab_dir: str | None = None
    """Directory with GPT-2's encoder.json + vocab.bpe to copy as the HF tokenizer."""
    overwrite: bool = False
    """Replace a destination directory that is not empty (else export refuses, so another model's
    files are never overwritten by mistake)."""


def main(argv: list[str] | None = None) -> None:
    from glassgpt.config import load_config, wants_help

    argv = list(argv or [])
    if wants_help(ExportConfig, argv, "glassgpt export", "\n\nexample: glassgpt export --out_dir=out --to=hf hf_out/"):
        return
    # A bare argument that is not a .py config file is the destination directory.
    dests = [a for a in argv if not a.startswith("--") and not a.endswith(".py")]
    cfg = load_config(ExportConfig, [a for a in argv if a not in dests])
    if len(dests) > 1 or (dests and cfg.dest and dests[0] != cfg.dest):
        raise UserError(f"give one destination directory, got {dests + ([cfg.dest] if cfg.dest else [])}")
    dest = dests[0] if dests else cfg.dest
    if not dest:
        raise UserError("say where to write: glassgpt export --out_dir=CKPT_DIR --to=hf DEST_DIR")
    target = Path(dest)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not cfg.overwrite:
        raise UserError(f"{target} already exists and is not empty; choose a new directory, or pass --overwrite "
                        "to replace it")
    from glassgpt.artifacts import write_artifact, write_json_atomic
    from glassgpt.run import open_run

    run = open_run(cfg.out_dir, data_dir=cfg.data_dir, vocab_dir=cfg.vocab_dir)
    model = run.model
    meta = run.checkpoint_meta.get("tokenizer") or run.tokenizer.meta()
    with write_artifact(target) as tmp:  # the old directory (with --overwrite) goes in one rename
        export_hf(model, tmp, meta, cfg.vocab_dir)
        # what glassgpt's open_run needs to find this model's training data again
        write_json_atomic(tmp / "glassgpt_run.json", {
            "config": {k: run.config[k] for k in ("dataset", "data_dir") if k in run.config},
            "checkpoint_fingerprint": run.fingerprint, "iter_num": run.iter_num})
    path = target
    n = sum(p.numel() for p in model.parameters())
    print(f"exported {cfg.out_dir} ({n / 1e6:.2f}M params, activation {model.config.activation}, "
          f"vocab {model.config.vocab_size}) to {path}; load with "
          f"transformers.GPT2LMHeadModel.from_pretrained({str(path)!r}) or init_from={path}")
