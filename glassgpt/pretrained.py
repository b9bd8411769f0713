"""GPT-2 weights in: OpenAI's checkpoints from the Hugging Face hub and local HF directories (the way
out, `glassgpt export`, is glassgpt/export.py).

    model = from_pretrained("gpt2")                       # OpenAI's 124M, downloaded from the hub
    model = from_pretrained("path/to/hf_gpt2_dir", {"dropout": 0.1, "block_size": 256})

Loading a local directory needs only `safetensors` (config.json is read as JSON); `transformers` is
never imported here, and `huggingface_hub` only to download the named OpenAI models. HF's GPT-2 stores
its matmuls as `Conv1D` modules whose weight is (in, out), the transpose of `nn.Linear`'s (out, in):
those four weights are transposed on the way in and out, as nanoGPT's `GPT.from_pretrained` does.

Activations: OpenAI's GPT-2 uses the tanh GELU, which HF calls "gelu_new"; nanoGPT trains with the
exact erf GELU (HF's "gelu"). A loaded model keeps the activation its config.json names and an
exported one writes its own, so logits match transformers' in both directions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from glassgpt.errors import UserError
from glassgpt.model import GPT, GPTConfig

# OpenAI's releases, as nanoGPT names them -> (hub repository, n_layer, n_head, n_embd).
PRETRAINED_MODELS: dict[str, tuple[str, int, int, int]] = {
    "gpt2": ("openai-community/gpt2", 12, 12, 768),  # 124M
    "gpt2-medium": ("openai-community/gpt2-medium", 24, 16, 1024),  # 350M
    "gpt2-large": ("openai-community/gpt2-large", 36, 20, 1280),  # 774M
    "gpt2-xl": ("openai-community/gpt2-xl", 48, 25, 1600),  # 1558M
}
PRETRAINED_NAMES: tuple[str, ...] = tuple(PRETRAINED_MODELS)

# HF Conv1D weights, stored (in, out): transpose to nn.Linear's (out, in).
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# HF activation_function -> ours. "gelu_pytorch_tanh" is the same tanh formula as "gelu_new".
HF_ACTIVATIONS = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu"}
OVERRIDABLE = ("dropout", "block_size", "activation")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
GPT2_TOKENIZER_FILES = ("vocab.json", "merges.txt")


# ---------------------------------------------------------------------------------------------------
# Loading


def from_pretrained(init_from: str, override_args: dict[str, Any] | None = None) -> GPT:
    """A GPT with GPT-2 weights: `init_from` is one of PRETRAINED_NAMES (hub) or a local HF GPT-2 dir.

    `override_args` may set `dropout` (nanoGPT allows only this), `block_size` (smaller crops the
    position embeddings; larger is an error) and `activation`; None values are ignored.
    """
    overrides = {k: v for k, v in (override_args or {}).items() if v is not None}
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise UserError(f"cannot override {', '.join(unknown)} of pretrained GPT-2 weights; "
                        f"only {', '.join(OVERRIDABLE)} can be changed")
    model_dir = resolve_model_dir(init_from)
    hf_config = read_hf_config(model_dir)
    config = gpt_config_from_hf(hf_config, model_dir)
    config.dropout = float(overrides.get("dropout", 0.0))  # nanoGPT: 0 unless asked, whatever HF says
    if "activation" in overrides:
        config.activation = overrides["activation"]
        GPTConfig.__post_init__(config)  # validate the override
    # Build on the meta device (no memory, no random init: gpt2-xl would spend ~30 s on it), then
    # adopt the loaded tensors and tie the embedding to the lm_head again, as GPT.__init__ does.
    with torch.device("meta"):
        model = GPT(config)
    state = hf_to_glassgpt_state_dict(read_hf_weights(model_dir), model, model_dir)
    model.load_state_dict(state, strict=True, assign=True)
    model.transformer.wte.weight = model.lm_head.weight
    print(f"loaded GPT-2 weights from {model_dir}: {config.n_layer} layers, {config.n_head} heads, "
          f"{config.n_embd} wide, vocab {config.vocab_size}, activation {config.activation}")
    if "block_size" in overrides and overrides["block_size"] != config.block_size:
        if overrides["block_size"] > config.block_size:
            raise UserError(f"block_size={overrides['block_size']} is larger than the {config.block_size} "
                            f"positions {init_from} was trained with; use --block_size<={config.block_size}")
        model.crop_block_size(int(overrides["block_size"]))
    return model


def resolve_model_dir(init_from: str) -> Path:
    """A local directory holding config.json + weights: `init_from` itself, or the hub download."""
    path = Path(init_from).expanduser()
    # A bare name means OpenAI's model, unless a directory of that name holds an HF model (as in
    # transformers): a stray ./gpt2 folder of something else must not shadow the hub.
    if init_from in PRETRAINED_MODELS and not (path / "config.json").exists():
        return download_pretrained(init_from)
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"init_from={init_from} is a file; give the directory that holds config.json "
                        "and model.safetensors")
    import difflib

    close = difflib.get_close_matches(init_from, PRETRAINED_NAMES, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    raise UserError(f"unknown model name or missing directory init_from={init_from!r}; {hint}valid names: "
                    f"scratch, resume, {', '.join(PRETRAINED_NAMES)}, or a path to a local HF GPT-2 directory")


def _hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def download_pretrained(name: str) -> Path:
    """Fetch (or find in the HF cache) config.json, the weights and the tokenizer files of an OpenAI
    GPT-2 from the hub; return the snapshot directory. Offline: the cache only, else a clear error."""
    repo = PRETRAINED_MODELS[name][0]
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError:
        raise UserError(f"downloading {name} needs huggingface_hub: pip install 'glassgpt[hf]' "
                        "(or pass init_from=<local HF GPT-2 directory>)") from None
    offline = _hf_offline()
    # Read at call time (huggingface_hub reads its env once, at import) so HF_HUB_CACHE can move.
    kw: dict[str, Any] = dict(repo_id=repo, local_files_only=offline, cache_dir=os.environ.get("HF_HUB_CACHE") or None)
    not_cached = (f"HF_HUB_OFFLINE is set and {name} ({repo}) is not in the Hugging Face cache; download it "
                  "once with a network, or pass init_from=<local HF GPT-2 directory>")
    try:
        config_path = Path(hf_hub_download(filename="config.json", **kw))
        # All four repositories have model.safetensors; pytorch_model.bin is the fallback for old caches.
        # (LocalEntryNotFoundError, "not cached offline", is a subclass of EntryNotFoundError.)
        for weights in ("model.safetensors", "pytorch_model.bin"):
            try:
                hf_hub_download(filename=weights, **kw)
                break
            except EntryNotFoundError:
                continue
        else:
            raise UserError(not_cached if offline else f"hub repository {repo} has neither model.safetensors "
                            "nor pytorch_model.bin")
        for f in GPT2_TOKENIZER_FILES:
            try:
                hf_hub_download(filename=f, **kw)
            except Exception:  # the tokenizer is a convenience for export; tiktoken has its own
                pass
    except UserError:
        raise
    except Exception as e:  # LocalEntryNotFoundError, HTTP and connection errors of several kinds
        if offline:
            raise UserError(not_cached) from None
        why = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:120]
        raise UserError(f"could not download {name} from the Hugging Face hub ({type(e).__name__}: {why}); "
                        "check the network, or pass init_from=<local HF GPT-2 directory>") from None
    return config_path.parent


def read_hf_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.exists():
        raise UserError(f"{model_dir} is not a Hugging Face GPT-2 directory (no config.json); for a glassgpt/"
                        "nanoGPT checkpoint use init_from=resume --out_dir=DIR")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("model_type") != "gpt2":
        kind = cfg.get("model_type") if isinstance(cfg, dict) else type(cfg).__name__
        raise UserError(f"{model_dir} holds a {kind!r} model, not GPT-2 (config.json model_type must be 'gpt2')")
    return cfg


def gpt_config_from_hf(cfg: dict[str, Any], where: Path | str = "") -> GPTConfig:
    """GPTConfig for an HF GPT2Config dict; refuse the HF options our architecture does not have."""
    n_embd = int(cfg.get("n_embd", 768))
    unsupported = {
        "n_inner": cfg.get("n_inner") not in (None, 4 * n_embd),
        "layer_norm_epsilon": abs(float(cfg.get("layer_norm_epsilon", 1e-5)) - 1e-5) > 1e-12,
        "scale_attn_weights": cfg.get("scale_attn_weights", True) is not True,
        "scale_attn_by_inverse_layer_idx": bool(cfg.get("scale_attn_by_inverse_layer_idx", False)),
        "add_cross_attention": bool(cfg.get("add_cross_attention", False)),
        "tie_word_embeddings": cfg.get("tie_word_embeddings", True) is not True,
    }
    bad = [k for k, v in unsupported.items() if v]
    act = cfg.get("activation_function", "gelu_new")
    if act not in HF_ACTIVATIONS:
        bad.append(f"activation_function={act}")
    if bad:
        raise UserError(f"{where}: this GPT-2 variant uses {', '.join(bad)}, which glassgpt's model does not "
                        "implement; only standard GPT-2 configurations load")
    try:
        return GPTConfig(block_size=int(cfg.get("n_positions", 1024)), vocab_size=int(cfg.get("vocab_size", 50257)),
                         n_layer=int(cfg.get("n_layer", 12)), n_head=int(cfg.get("n_head", 12)), n_embd=n_embd,
                         dropout=0.0, bias=True, activation=HF_ACTIVATIONS[act])
    except ValueError as e:
        raise UserError(f"{where}/config.json: {e}") from None


def read_hf_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """The directory's tensors: model.safetensors (or its shards), else pytorch_model.bin loaded with
    weights_only=True so a pickle cannot run code."""
    from safetensors.torch import load_file

    single, index, pt_bin = (model_dir / f for f in WEIGHT_FILES)
    try:
        if single.exists():
            return load_file(str(single))
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(load_file(str(model_dir / shard)))
            return state
        if pt_bin.exists():
            state = torch.load(pt_bin, map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                raise ValueError(f"holds a {type(state).__name__}, not a state dict")
            return state
    except UserError:
        raise
    except Exception as e:
        why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(f"could not read the weights in {model_dir} ({why}); the files are corrupt, "
                        "truncated or not a GPT-2 state dict") from None
    raise UserError(f"{model_dir} has config.json but no weights ({', '.join(WEIGHT_FILES)})")


def hf_to_glassgpt_state_dict(hf: dict[str, torch.Tensor], model: GPT,
                              where: Path | str = "") -> dict[str, torch.Tensor]:
    """Rename and transpose an HF GPT-2 state dict into glassgpt's (= nanoGPT's) names and layout,
    checked against `model`'s names and shapes (a meta-device model is enough)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in hf.items():
        # OpenAI's hub files were saved from GPT2Model, without the "transformer." prefix.
        if not k.startswith(("transformer.", "lm_head.")):
            k = "transformer." + k
        # the causal-mask buffers of older transformers versions are not weights
        if k.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        if k.endswith(CONV1D_SUFFIXES):
            v = v.t()
        out[k] = v.float().contiguous()
    # Tied: HF often omits lm_head.weight; if present it must equal wte (checked: untied is refused).
    lm_head = out.pop("lm_head.weight", None)
    wte = out.get("transformer.wte.weight")
    if lm_head is not None and wte is not None and not torch.equal(lm_head, wte):
        raise UserError(f"{where}: lm_head.weight differs from wte.weight (untied embeddings); glassgpt ties them")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(out))
    unexpected = sorted(set(out) - set(expected))
    if missing or unexpected:
        raise UserError(f"{where}: the weights are not a GPT-2 of the shape config.json describes "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, shape in expected.items():
        if tuple(out[k].shape) != shape:
            raise UserError(f"{where}: {k} has shape {tuple(out[k].shape)}, config.json implies {shape}")
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def pretrained_tokenizer(init_from: str, vocab_dir: str | None = None):
    """The tokenizer for `init_from`: GPT-2's BPE (tiktoken) for OpenAI's models and HF directories
    with GPT-2's vocabulary, the char vocabulary a glassgpt export wrote, and an error for a GPT-2
    architecture trained with some other tokenizer (glassgpt would feed it wrong ids)."""
    from glassgpt.tokenizer import GPT2Tokenizer, complete_meta, tokenizer_from_meta

    path = Path(init_from).expanduser()
    if (init_from in PRETRAINED_MODELS and not (path / "config.json").exists()) or not path.is_dir():
        return GPT2Tokenizer(vocab_dir)
    if (path / "glassgpt_tokenizer.json").exists():
        meta = complete_meta(json.loads((path / "glassgpt_tokenizer.json").read_text()), path)
        return tokenizer_from_meta(meta, vocab_dir)
    vocab_json = path / "vocab.json"
    if vocab_json.exists():
        # HF re-serialises vocab.json on save, so compare entries, not bytes: GPT-2's has these.
        vocab = json.loads(vocab_json.read_text(encoding="utf-8"))
        signature = {"Hello": 15496, "\u0120world": 995, "<|endoftext|>": 50256}
        if len(vocab) != 50257 or any(vocab.get(k) != v for k, v in signature.items()):
            raise UserError(f"{vocab_json} is not GPT-2's BPE vocabulary ({len(vocab)} entries); glassgpt "
                            "tokenizes HF models with GPT-2's BPE only, so this model's ids would be wrong")
    return GPT2Tokenizer(vocab_dir)


# ---------------------------------------------------------------------------------------------------
# Checks the training loop calls


def check_vocab(model_vocab: int, data_meta: dict | None, model_tokenizer: dict | None = None) -> None:
    """Refuse data whose token ids the model cannot embed, or data tokenized another way than the model.

    `data_meta` is the dataset's meta.json/meta.pkl dict (None: nanoGPT data with no meta, assumed
    GPT-2 BPE). `model_tokenizer`, when known (a checkpoint's "tokenizer"), is compared too.
    """
    meta = data_meta or {"tokenizer": "gpt2", "vocab_size": 50257}
    data_vocab = int(meta.get("vocab_size") or 0)
    kind = meta.get("tokenizer", "char" if "stoi" in meta else "gpt2")
    if data_vocab > model_vocab:
        raise UserError(f"the data has {data_vocab} token ids ({kind}) but the model embeds only {model_vocab}; "
                        "prepare the data with the model's tokenizer or pick a model with a large enough vocab_size")
    if kind == "char" and model_vocab >= 50257 and model_tokenizer is None:
        raise UserError(f"the data is character-level ({data_vocab} symbols) but the model has a {model_vocab}-token "
                        "GPT-2 BPE vocabulary; prepare the data with GPT-2 BPE "
                        "(e.g. data/shakespeare, not shakespeare_char)")
    if model_tokenizer:
        mkind = model_tokenizer.get("tokenizer", "gpt2")
        if mkind != kind or (kind == "char" and model_tokenizer.get("stoi") != meta.get("stoi")) \
                or (kind == "bpe" and model_tokenizer.get("bpe") != meta.get("bpe")):
            raise UserError(f"the data was tokenized as {kind} but the model was trained on a different {mkind} "
                            "vocabulary; prepare the text with the model's own tokenizer "
                            "(glassgpt prepare TEXT --tokenizer=RUN_OUT_DIR) and use that")
