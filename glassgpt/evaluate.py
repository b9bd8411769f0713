"""Zero-shot evaluation: perplexity and bits per byte on held-out text, and multiple-choice accuracy.

    glassgpt eval --out_dir=out-shakespeare --text=heldout.txt            # a trained checkpoint
    glassgpt eval --init_from=gpt2 --dataset=openwebtext --split=val        # OpenAI's weights
    glassgpt eval --init_from=gpt2 --mc=hellaswag_val.jsonl                 # HellaSwag-style JSONL
    glassgpt eval --init_from=gpt2 --lambada=download                       # LAMBADA (glassgpt/lambada.py)

Perplexity slides windows of `block_size` tokens over the text with step `stride`: every token is
scored exactly once, each window scoring only the tokens it adds, so each of them sees at least
block_size - stride tokens of context (stride=1 gives every token the most context the model can
hold; stride=block_size is fastest). With GPT-2 BPE, `<|endoftext|>` is put in front so the first
token is scored too (lm-evaluation-harness's rolling log-likelihood does the same).
https://huggingface.co/docs/transformers/perplexity explains the trade-off.

Bits per byte = total negative log-likelihood / ln 2 / UTF-8 bytes of the scored text: unlike
perplexity it does not depend on the tokenizer, so a char model and a BPE model can be compared.

Multiple choice follows lm-evaluation-harness's HellaSwag task: each ending is scored by the
log-likelihood of " " + ending after the context; `acc` takes the highest sum, `acc_norm` the highest
sum per character of the ending (the harness's length normalisation), `acc_token_norm` the highest
mean per token (build-nanogpt's hellaswag.py "completion style"). docs/gpt2.md lists published numbers.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.nn import functional as F

from glassgpt.config import load_config, wants_help
from glassgpt.errors import UserError
from glassgpt.loglik import continuation_logprobs, encode_pair
from glassgpt.model import GPT
from glassgpt.tokenizer import Tokenizer
from glassgpt.windows import sliding_windows


@dataclass
class EvalConfig:
    """`glassgpt eval` keys. Give at least one of text, dataset/data_dir, mc, lambada."""

    init_from: str = "resume"
    """'resume' (the checkpoint in out_dir), a GPT-2 name (gpt2, gpt2-medium, ...) or a local HF GPT-2 dir."""
    out_dir: str = "out"
    text: str | None = None
    """Held-out text file (UTF-8) to score."""
    dataset: str | None = None
    """Prepared dataset to score (data/<dataset>, or data_dir)."""
    data_dir: str | None = None
    split: Literal["train", "val"] = "val"
    """Split of the prepared dataset to score."""
    block_size: int | None = None
    """Window length; default (None) the model's context."""
    stride: int | None = None
    """Step between windows, 1..block_size; default (None) block_size // 2."""
    max_tokens: int | None = None
    """Score only the first N tokens (a quick look at a big split)."""
    mc: str | None = None
    """Multiple-choice JSON Lines in HellaSwag's format: ctx (or ctx_a + ctx_b), endings, label."""
    lambada: str | None = None
    """LAMBADA last-word prediction: a JSON Lines file of {"text": ...} (OpenAI's lambada_test.jsonl
    format), or 'download' for that file from its canonical URL (sha256-checked; GLASSGPT_MIRROR's
    lambada/lambada_test.jsonl when set)."""
    lambada_limit: int | None = None
    """Score only the first N LAMBADA passages."""
    mc_style: Literal["harness", "plain"] = "harness"
    """'harness': lm-eval's HellaSwag preprocessing (activity_label prefix, [title] cleanup);
    'plain': ctx and endings as written (build-nanogpt's hellaswag.py)."""
    mc_limit: int | None = None
    """Score only the first N examples."""
    on_bad_line: Literal["stop", "skip"] = "stop"
    """A malformed JSONL line: 'stop' with file:line, or 'skip' it with a warning."""
    batch_size: int = 8
    """Windows (perplexity) or examples (multiple choice) per forward pass."""
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    seed: int = 1337
    vocab_dir: str | None = None
    """Directory with GPT-2's encoder.json + vocab.bpe when offline (else GLASSGPT_MIRROR / tiktoken)."""
    json_out: str | None = None
    """Also write the results as JSON to this file."""
    threads: int | None = None
    """CPU threads for torch; None: $OMP_NUM_THREADS if set, else for models under 30M parameters the
    cores other processes leave idle (runtime.choose_threads)."""


# ---------------------------------------------------------------------------------------------------
# Perplexity and bits per byte


@torch.no_grad()
def token_nlls(model: GPT, seq: torch.Tensor, block_size: int, stride: int, batch_size: int = 8,
               progress: bool = False) -> torch.Tensor:
    """-ln p(seq[j+1] | context) for every j, in float64, scored window by window (see module doc)."""
    n = seq.numel() - 1
    out = torch.empty(max(n, 0), dtype=torch.float64)
    windows = list(sliding_windows(n, block_size, stride))
    device = next(model.parameters()).device
    bar = _progress(len(windows), progress, "windows")
    # Every window has min(block_size, n) inputs (the first starts at 0, later ones end-aligned), so
    # they stack into batches; only the positions a window scores go through the vocab-sized lm_head.
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size]
        x = torch.stack([seq[b:e] for b, e, _ in chunk]).to(device)
        y = torch.stack([seq[b + 1 : e + 1] for b, e, _ in chunk]).to(device)
        h = model.hidden_states(x)  # (B, T, C)
        rows = torch.cat([torch.full((e - s,), r) for r, (b, e, s) in enumerate(chunk)])
        cols = torch.cat([torch.arange(s - b, e - b) for b, e, s in chunk])
        logits = model.head(h[rows, cols]).float()  # (scored, vocab)
        nll = F.cross_entropy(logits, y[rows, cols], reduction="none")
        out[chunk[0][2] : chunk[-1][1]] = nll.double().cpu()
        bar.update(len(chunk))
    bar.close()
    return out


def token_byte_lengths(tok: Tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for (byte-level BPE tokens, GPT-2's or trained, are byte
    sequences, some of them part of a character; a character's are its UTF-8 encoding).
    `<|endoftext|>` separates documents and stands for no text: 0 bytes."""
    token_bytes = getattr(tok, "token_bytes", None)
    if token_bytes is not None:
        lengths = np.array([len(token_bytes(i)) for i in range(tok.vocab_size)], dtype=np.int64)
    else:
        lengths = np.array([len(tok.decode([i]).encode("utf-8")) for i in range(tok.vocab_size)], dtype=np.int64)
    if tok.eot_token is not None:
        lengths[tok.eot_token] = 0
    return lengths


def perplexity(model: GPT, tokens: np.ndarray | list[int], tok: Tokenizer, block_size: int | None = None,
               stride: int | None = None, batch_size: int = 8, progress: bool = False) -> dict:
    """Loss, perplexity, bits per token and bits per byte of `tokens` under `model` (see module doc)."""
    block_size = block_size or model.config.block_size
    if block_size > model.config.block_size:
        raise UserError(f"block_size={block_size} is larger than the model's context {model.config.block_size}")
    stride = stride or max(1, block_size // 2)
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    if tok.eot_token is not None:  # score the first token too, from "start of document"
        ids = torch.cat([torch.tensor([tok.eot_token]), ids])
    if ids.numel() < 2:
        raise UserError("the text is too short to score: it needs at least two tokens")
    if int(ids.max()) >= model.config.vocab_size:
        raise UserError(f"token id {int(ids.max())} is outside the model's vocabulary of {model.config.vocab_size}; "
                        "the text was tokenized for another model")
    t0 = time.perf_counter()
    nll = token_nlls(model, ids, block_size, stride, batch_size, progress)
    seconds = time.perf_counter() - t0
    n_bytes = int(token_byte_lengths(tok)[ids[1:].numpy()].sum())
    total = float(nll.sum())
    loss = total / nll.numel()
    return {
        "tokens": int(nll.numel()), "bytes": n_bytes, "nll_sum": total, "loss": loss,
        "perplexity": math.exp(min(loss, 700)), "bits_per_token": loss / math.log(2),
        "bits_per_byte": total / math.log(2) / n_bytes if n_bytes else float("nan"),
        "block_size": block_size, "stride": stride, "seconds": seconds, "tokens_per_s": nll.numel() / seconds,
    }


# ---------------------------------------------------------------------------------------------------
# Multiple choice (HellaSwag format)


@dataclass
class MCExample:
    context: str
    endings: list[str]
    label: int
    line: int


def hellaswag_preprocess(text: str) -> str:
    """lm-evaluation-harness's HellaSwag cleanup: WikiHow's "[title]" markers become sentence breaks,
    other [bracketed] markers go, double spaces collapse."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def parse_mc_example(doc: object, style: str = "harness") -> tuple[str, list[str], int]:
    """(context, endings, label) from one HellaSwag-format record; ValueError says what is wrong."""
    if not isinstance(doc, dict):
        raise ValueError(f"expected a JSON object, got {type(doc).__name__}")
    if "ctx_a" in doc:  # the harness joins the two halves and capitalises the second
        ctx = str(doc["ctx_a"]) + (" " + str(doc.get("ctx_b", "")).capitalize() if doc.get("ctx_b") else "")
    elif "ctx" in doc:
        ctx = str(doc["ctx"])
    else:
        raise ValueError("no context: give ctx, or ctx_a (+ ctx_b)")
    endings = doc.get("endings")
    if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) for e in endings):
        raise ValueError("endings must be a list of at least two strings")
    try:
        label = int(doc["label"])  # HellaSwag's files have ints, the HF dataset strings ("3")
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"label must be an int or a numeric string, got {doc.get('label')!r}") from None
    if not 0 <= label < len(endings):
        raise ValueError(f"label {label} is not an index into the {len(endings)} endings")
    if style == "harness":
        if doc.get("activity_label"):
            ctx = f"{doc['activity_label']}: {ctx}"
        ctx, endings = hellaswag_preprocess(ctx), [hellaswag_preprocess(e) for e in endings]
    return ctx, endings, label


def read_mc_jsonl(path: str | Path, on_bad_line: str = "stop", style: str = "harness",
                  limit: int | None = None) -> list[MCExample]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"multiple-choice file {path} does not exist")
    examples = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ctx, endings, label = parse_mc_example(json.loads(line), style)
            except (json.JSONDecodeError, ValueError) as e:
                msg = f"{path}:{lineno}: {e}"
                if on_bad_line == "stop":
                    raise UserError(f"{msg}; fix the line or pass --on_bad_line=skip") from None
                print(f"warning: skipping {msg}", file=sys.stderr)
                continue
            examples.append(MCExample(ctx, endings, label, lineno))
            if limit is not None and len(examples) >= limit:
                break
    if not examples:
        raise UserError(f"{path} holds no usable examples")
    return examples


def multiple_choice(model: GPT, tok: Tokenizer, examples: list[MCExample], batch_size: int = 8,
                    progress: bool = False) -> dict:
    """acc / acc_norm / acc_token_norm (with standard errors) over `examples`; see module doc."""
    correct = {"acc": 0, "acc_norm": 0, "acc_token_norm": 0}
    per_example = []
    eot = [tok.eot_token] if tok.eot_token is not None else []
    t0 = time.perf_counter()
    bar = _progress(len(examples), progress, "examples")
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        pairs = []
        for ex in chunk:
            for ending in ex.endings:
                ctx, cont = encode_pair(tok, ex.context, " " + ending)
                pairs.append((ctx or eot, cont))  # an empty context is "start of document"
        if any(not ctx for ctx, _ in pairs):
            raise UserError("an example has an empty context and this tokenizer has no <|endoftext|> to stand in")
        lls = continuation_logprobs(model, pairs)
        k = 0
        for ex in chunk:
            ll = np.array(lls[k : k + len(ex.endings)])
            n_tok = np.array([len(pairs[k + j][1]) for j in range(len(ex.endings))])
            k += len(ex.endings)
            preds = {
                "acc": int(np.argmax(ll)),
                "acc_norm": int(np.argmax(ll / np.array([max(len(e), 1) for e in ex.endings]))),
                "acc_token_norm": int(np.argmax(ll / n_tok)),
            }
            for name, p in preds.items():
                correct[name] += int(p == ex.label)
            per_example.append({"line": ex.line, "label": ex.label, "loglik": ll.round(4).tolist(), **preds})
        bar.update(len(chunk))
    bar.close()
    n = len(examples)
    result: dict[str, Any] = {"examples": n, "seconds": time.perf_counter() - t0}
    for name, c in correct.items():
        acc = c / n
        result[name] = acc
        result[name + "_stderr"] = math.sqrt(acc * (1 - acc) / max(n - 1, 1))  # the harness's sample stderr
    result["per_example"] = per_example
    return result


# ---------------------------------------------------------------------------------------------------
# Command


def _progress(total: int, enabled: bool, unit: str):
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, disable=not enabled or total < 20, file=sys.stderr, leave=False)


def load_model(cfg: EvalConfig, device: str):
    """The opened run (glassgpt.run.open_run): a checkpoint in out_dir, GPT-2 weights or an HF dir."""
    from glassgpt.run import open_run

    source = cfg.out_dir if cfg.init_from == "resume" else cfg.init_from
    run = open_run(source, device=device, data_dir=cfg.data_dir if cfg.init_from == "resume" else None,
                   vocab_dir=cfg.vocab_dir, threads=cfg.threads)
    name = f"{cfg.out_dir} (iter {run.iter_num})" if run.kind == "checkpoint" else cfg.init_from
    return run, name


def evaluate(cfg: EvalConfig) -> dict:
    """Run the evaluations `cfg` asks for; returns (and prints) their results."""
    from glassgpt.runtime import autocast, resolve_device, resolve_dtype

    if not (cfg.text or cfg.dataset or cfg.data_dir or cfg.mc or cfg.lambada):
        raise UserError("nothing to evaluate: give --text=FILE, --dataset=NAME (or --data_dir=DIR), "
                        "--mc=FILE.jsonl or --lambada=FILE.jsonl|download")
    if cfg.text and (cfg.dataset or (cfg.data_dir and cfg.init_from != "resume")):
        raise UserError("give either --text or --dataset/--data_dir to score, not both")
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    run, name = load_model(cfg, device)
    model, tok = run.model, run.tokenizer
    model_tok = run.checkpoint_meta.get("tokenizer") if run.kind == "checkpoint" else tok.meta()
    results: dict = {"model": name, "device": device, "dtype": dtype,
                     "params": sum(p.numel() for p in model.parameters())}
    progress = sys.stderr.isatty()
    with autocast(device, dtype):
        source = None
        if cfg.text:
            path = Path(cfg.text)
            if not path.is_file():
                raise UserError(f"--text={cfg.text} does not exist")
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not text:
                raise UserError(f"{path} is empty")
            tokens, source = np.array(tok.encode(text), dtype=np.int64), str(path)
        elif cfg.dataset or cfg.data_dir:
            from glassgpt.corpus import open_data, resolve_data_dir
            from glassgpt.pretrained import check_vocab

            corpus, _ = open_data(resolve_data_dir({"dataset": cfg.dataset}, cfg.data_dir))  # type: ignore[arg-type]
            check_vocab(model.config.vocab_size, corpus.meta or None, model_tok)
            tokens, source = np.asarray(corpus.tokens(cfg.split), dtype=np.int64), f"{corpus.data_dir}:{cfg.split}"
            tok = corpus.tokenizer if corpus.meta else tok
        if source is not None:
            if cfg.max_tokens:
                tokens = tokens[: cfg.max_tokens]
            r = perplexity(model, tokens, tok, cfg.block_size, cfg.stride, cfg.batch_size, progress)
            results["perplexity"] = {"source": source, **r}
            print(f"{name} on {source}: {r['tokens']:,} tokens ({r['bytes']:,} bytes), loss {r['loss']:.4f} "
                  f"nats/token, perplexity {r['perplexity']:.3f}, {r['bits_per_byte']:.4f} bits/byte "
                  f"(block {r['block_size']}, stride {r['stride']}; {r['tokens_per_s']:,.0f} tokens/s)")
        if cfg.mc:
            examples = read_mc_jsonl(cfg.mc, cfg.on_bad_line, cfg.mc_style, cfg.mc_limit)
            r = multiple_choice(model, tok, examples, cfg.batch_size, progress)
            results["multiple_choice"] = {"source": cfg.mc, "style": cfg.mc_style, **r}
            print(f"{name} on {cfg.mc}: {r['examples']} examples, acc {r['acc']:.4f} ± {r['acc_stderr']:.4f}, "
                  f"acc_norm {r['acc_norm']:.4f} ± {r['acc_norm_stderr']:.4f}, "
                  f"acc_token_norm {r['acc_token_norm']:.4f} ({r['examples'] / r['seconds']:.1f} examples/s)")
        if cfg.lambada:
            from glassgpt.lambada import run_lambada

            results["lambada"] = run_lambada(model, tok, cfg.lambada, cfg.lambada_limit, cfg.batch_size, name)
    if cfg.json_out:
        Path(cfg.json_out).write_text(json.dumps({"config": asdict(cfg), **results}, indent=1) + "\n")
    return results


def main(argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(EvalConfig, argv, "glassgpt eval"):
        return None
    return evaluate(load_config(EvalConfig, argv))
